"""Reading what a model's files say without loading them: safetensors headers (names, shapes, dtypes) and JSON."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .result import problem

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
PICKLE_MESSAGE = "pickle checkpoints can run code when loaded; convert to .safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
# Bytes per element of each safetensors dtype (the checkpoint check tiles a file's data with it).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable: {exc}"
    return (obj, None) if isinstance(obj, dict) else (None, "not a JSON object")


# A diffusers pipeline folder's index: model_index.json, or modular_model_index.json for a modular pipeline (Anima,
# FLUX.3: ModularPipeline.save_pretrained writes only that, DiffusionPipeline cannot load it).
PIPELINE_INDEX_FILES = ("model_index.json", "modular_model_index.json")


def read_pipeline_index(folder: Path) -> tuple[dict | None, str | None, str]:
    """(index, problem, file name) of a pipeline folder: model_index.json, else modular_model_index.json. A modular
    index's entries ``[library, class, loading spec]`` come back as ``[library, class]``, as model_index.json has
    them, so readers need not know which file it was; its components are loaded from their subfolders all the same."""
    index, err = read_json(folder / PIPELINE_INDEX_FILES[0])
    if index is not None or err != "missing":
        return index, err, PIPELINE_INDEX_FILES[0]
    modular, merr = read_json(folder / PIPELINE_INDEX_FILES[1])
    if modular is None:
        return None, err if merr == "missing" else merr, PIPELINE_INDEX_FILES[0 if merr == "missing" else 1]
    return ({k: (v[:2] if isinstance(v, list) and len(v) == 3 else v) for k, v in modular.items()}, None,
            PIPELINE_INDEX_FILES[1])


def has_pipeline_index(folder: Path) -> bool:
    return any((folder / name).is_file() for name in PIPELINE_INDEX_FILES)


def read_safetensors_header(path: Path) -> tuple[dict | None, dict | None]:
    """(header, problem). Reads 8 + N bytes; checks that the data the header describes fits in the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None, problem("model_incomplete", f"{path.name}: {size} bytes, too short for a safetensors header (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return None, problem("model_incomplete", f"{path.name}: header length {n} is beyond the file size {size} (truncated download?)")
            if n > MAX_HEADER_BYTES:
                return None, problem("model_corrupt", f"{path.name}: header length {n} is implausible; not a safetensors file")
            raw = fh.read(n)
    except PermissionError:  # the caller names the folder: the file's name completes it
        return None, problem("model_unreadable", f"{path.name}: permission denied")
    except OSError as exc:
        return None, problem("model_unreadable", f"{path.name}: cannot read ({exc.strerror or exc})")
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as exc:
        return None, problem("model_corrupt", f"{path.name}: invalid safetensors header ({exc})")
    if 8 + n + data_end > size:
        return None, problem("model_incomplete", f"{path.name}: tensors need {8 + n + data_end} bytes but the file has {size} (truncated download?)")
    return header, None


def weight_headers(root: Path, files) -> dict[str, dict]:
    """tensor name -> its header entry (dtype, shape, offsets) over a component's safetensors files, from their
    headers only (no tensor data read)."""
    entries: dict[str, dict] = {}
    for rel in files or ():
        if str(rel).endswith(".safetensors"):
            header, _ = read_safetensors_header(root / rel)
            entries.update({k: v for k, v in (header or {}).items() if k != "__metadata__" and isinstance(v, dict)})
    return entries


def weight_shapes(root: Path, files) -> dict[str, list[int]]:
    """tensor name -> shape over a component's safetensors files, from their headers only (no tensor data read)."""
    return {k: list(v.get("shape") or ()) for k, v in weight_headers(root, files).items()}
