"""Training checkpoints as far as they can be checked without torch and without reading a tensor: the manifest
(format, creator, step, each file's size and sha256) and, against it, each listed file's size, every safetensors
header (JSON, dtypes, shapes and offsets that tile the data exactly) and every JSON file.

This catches what usually breaks a checkpoint (a truncated copy, a crash on a filesystem without atomic rename,
bit rot in a header) in milliseconds, so --validate-only can name the checkpoint a resume will really use. A
flipped bit inside tensor data is left to training/checkpoint.py's verify_checkpoint, which hashes every byte.
The manifest is read here for both: the trainer and preflight must agree on what a checkpoint is.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import struct
from pathlib import Path

from .probe.headers import DTYPE_BYTES, MAX_HEADER_BYTES

DEFAULT_CREATOR = "train_lora"
FORMAT = "lora_trainer.training.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STEP_DIR_RE = re.compile(r"step-\d{6,}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is small; this stops a garbage file from being read whole
_MAX_JSON_BYTES = 256 << 20


def open_regular(path: Path) -> int:
    # O_NOFOLLOW: a manifest vouches for the directory's own files, not for whatever a symlink points at.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def read_manifest(path: Path, creator: str = DEFAULT_CREATOR) -> tuple[dict | None, str]:
    """(manifest, "ok") for a checkpoint of ``creator``, else (None, why not)."""
    try:
        with os.fdopen(open_regular(Path(path) / MANIFEST), "rb") as f:
            manifest = json.loads(f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
    except FileNotFoundError:
        return None, "no manifest.json (incomplete, or not a checkpoint)"
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"manifest.json unreadable: {exc}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None, "manifest.json is not a lora_trainer checkpoint manifest"
    if manifest.get("format_version") != FORMAT_VERSION:
        return None, f"unsupported checkpoint format_version {manifest.get('format_version')!r}"
    if manifest.get("creator") != creator:
        return None, f"checkpoint was created by {manifest.get('creator')!r}, not {creator!r}"
    step, files = manifest.get("step"), manifest.get("files")
    if type(step) is not int or step < 0 or not isinstance(files, dict):
        return None, "manifest.json is malformed (step/files)"
    for name, entry in files.items():  # names are checked so a manifest cannot point outside its directory
        if (not NAME_RE.fullmatch(name) or name == MANIFEST or not isinstance(entry, dict)
                or type(entry.get("size")) is not int or not isinstance(entry.get("sha256"), str)):
            return None, f"manifest.json has a malformed entry for {name!r}"
    return manifest, "ok"


def _safetensors_problem(f, size: int) -> str | None:
    """Why a safetensors file's header does not describe exactly its bytes (None: it does). Reads the header only."""
    head = f.read(8)
    if len(head) < 8:
        return "too short for a safetensors header"
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, MAX_HEADER_BYTES):
        return f"header length {n} does not fit the file"
    try:
        header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        spans = []
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            shape, width = entry["shape"], DTYPE_BYTES.get(entry["dtype"])
            if not all(type(v) is int and v >= 0 for v in (begin, end, *shape)) or end < begin:
                raise ValueError(f"bad offsets or shape for {key!r}")
            if width is not None and math.prod(shape) * width != end - begin:
                raise ValueError(f"{key!r}: {entry['dtype']}{shape} needs {math.prod(shape) * width} bytes, "
                                 f"the offsets give {end - begin}")
            spans.append((begin, end))
    except (UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as exc:
        return f"invalid safetensors header ({exc})"
    covered = 0
    for begin, end in sorted(spans):  # safetensors' own loader refuses gaps, overlaps and trailing bytes
        if begin != covered:
            return f"tensor data is not contiguous at byte {begin}"
        covered = end
    if 8 + n + covered != size:
        return f"its header describes {8 + n + covered} bytes, the file has {size}"
    return None


def _file_problem(path: Path, entry: dict) -> str | None:
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry["size"]:
                return f"size {size} != {entry['size']} in manifest (truncated or modified)"
            if path.suffix == ".safetensors":
                return _safetensors_problem(f, size)
            if path.suffix == ".json" and size <= _MAX_JSON_BYTES:
                json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return "listed in manifest but missing"
    except OSError as exc:
        return f"unreadable ({exc})"
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"not valid JSON ({exc})"
    return None


def quick_check(path: Path, *, creator: str = DEFAULT_CREATOR) -> tuple[bool, str]:
    """(ok, reason) from the manifest, sizes and headers; verify_checkpoint's reasons where they overlap."""
    manifest, reason = read_manifest(Path(path), creator)
    if manifest is None:
        return False, reason
    for name, entry in manifest["files"].items():
        problem = _file_problem(Path(path) / name, entry)
        if problem:
            return False, f"{name}: {problem}"
    return True, "ok"


def checkpoint_dirs(root: Path, creator: str = DEFAULT_CREATOR) -> tuple[list[tuple[int, Path]], int]:
    """((manifest step, path) of real ``step-*`` directories whose manifest names ``creator``, newest first by
    manifest step, never by name; the number of other ``step-*`` entries: interrupted saves, foreign folders)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return [], 0
    found, other = [], 0
    for entry in entries:
        if not STEP_DIR_RE.fullmatch(entry.name):
            continue
        manifest = read_manifest(Path(entry.path), creator)[0] \
            if not entry.is_symlink() and entry.is_dir(follow_symlinks=False) else None
        if manifest is None:
            other += 1
        else:
            found.append((manifest["step"], Path(entry.path)))
    return sorted(found, key=lambda sp: (sp[0], sp[1].name), reverse=True), other


def rejection_message(path: Path, reason: str, fallback: Path | None) -> str:
    then = f"resuming from {fallback.name} instead" if fallback is not None else "starting fresh instead"
    return f"checkpoint {path.name} is unusable ({reason}): {then}"


def pick_resume(root: Path, creator: str = DEFAULT_CREATOR) -> dict:
    """The checkpoint resume "auto" will load, as far as the quick check can tell: {checkpoint, step, rejected:
    [{checkpoint, step, reason}] (newer ones that failed), incomplete (step-* folders without our manifest)}."""
    ours, incomplete = checkpoint_dirs(Path(root), creator)
    rejected = []
    for step, path in ours:
        ok, reason = quick_check(path, creator=creator)
        if ok:
            return {"checkpoint": path, "step": step, "rejected": rejected, "incomplete": incomplete}
        rejected.append({"checkpoint": str(path), "step": step, "reason": reason})
    return {"checkpoint": None, "step": None, "rejected": rejected, "incomplete": incomplete}
