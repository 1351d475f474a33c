"""Resumable, atomic, verifiable training checkpoints, with no pickles anywhere.

A checkpoint is a directory ``step-NNNNNN`` holding ``<name>.safetensors`` (tensors), ``<name>.json``
(everything else) and ``manifest.json`` (creator, step, size and sha256 of every file). It is built under a
hidden temporary name and renamed into place only once every byte is fsync'ed, so a process killed at any
moment leaves either the complete new checkpoint or none at all. Pickle-free state means a checkpoint from
an untrusted source cannot execute code: only safetensors and JSON are ever parsed.

Where training is lives in ``TrainingProgress`` (and the manifest's step); directory names exist for humans.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import struct
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from .errors import OutputError

log = logging.getLogger("train_lora.checkpoint")

DEFAULT_CREATOR = "train_lora"
FORMAT = "lora_trainer.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

_STEP_DIR_RE = re.compile(r"step-\d{6,}")
# Our own scratch directories; the pid says whether the process that made one may still be using it.
_SCRATCH_RE = re.compile(r"\.(tmp|trash)-(step-\d{6,})-(\d+)-[0-9a-f]+")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_WRITE_CHUNK = 1 << 24  # os.write may write less than asked, and huge single writes can hit EINVAL on some systems
_MAX_MANIFEST_BYTES = 16 << 20  # a manifest is small; this stops a garbage file from being slurped whole


# --------------------------------------------------------------------------------------------------- progress
@dataclass
class TrainingProgress:
    """Where training is. ``batch_in_epoch`` counts batches of ``epoch`` already consumed, so a resume skips
    exactly those; ``micro_step`` counts micro-batches accumulated toward the next optimizer step;
    ``elapsed_s`` is training time summed over all runs, so throughput and ETA survive resumes."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    micro_step: int = 0
    loss_ema: float | None = None
    elapsed_s: float = 0.0
    schema: int = 1

    _INT_FIELDS = ("global_step", "epoch", "batch_in_epoch", "samples_seen", "micro_step")

    def to_json(self) -> dict[str, Any]:
        self._validate()
        data = asdict(self)
        # A diverged run can have a NaN loss_ema; JSON has no NaN, and the record must still be writable.
        data["loss_ema"] = None if self.loss_ema is None else _encode_float(float(self.loss_ema))
        data["elapsed_s"] = _encode_float(float(self.elapsed_s))
        return data

    @classmethod
    def from_json(cls, data: Any) -> TrainingProgress:
        if not isinstance(data, dict):
            raise ValueError(f"training progress must be a JSON object, got {type(data).__name__}")
        if data.get("schema") != 1:
            raise ValueError(f"training progress schema {data.get('schema')!r} is not supported (expected 1); "
                             "the checkpoint was written by an incompatible trainer version")
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"training progress fields mismatch: missing {sorted(names - set(data))}, "
                             f"unexpected {sorted(set(data) - names)}")
        values = dict(data)
        for key in ("loss_ema", "elapsed_s"):
            if values[key] is not None:
                values[key] = _decode_node(values[key], {}, key)
        progress = cls(**values)
        progress._validate()
        return progress

    def _validate(self) -> None:
        for name in self._INT_FIELDS:
            value = getattr(self, name)
            if type(value) is not int or value < 0:  # bool is an int subclass and would slip through isinstance
                raise ValueError(f"training progress {name} must be a non-negative int, got {value!r}")
        for name, allow_none in (("loss_ema", True), ("elapsed_s", False)):
            value = getattr(self, name)
            if not ((allow_none and value is None) or (isinstance(value, (int, float)) and not isinstance(value, bool))):
                raise ValueError(f"training progress {name} must be a number, got {value!r}")
        if not self.elapsed_s >= 0:
            raise ValueError(f"training progress elapsed_s must be >= 0, got {self.elapsed_s!r}")


# ------------------------------------------------------------------------------------------ state skeletons
# Every JSON object in a skeleton is a one-key tag, so user dict keys (even "$tuple") can never be misread.
_T_TUPLE, _T_DICT, _T_ITEMS, _T_FLOAT, _T_TENSOR, _T_NDARRAY = "$tuple", "$dict", "$items", "$float", "$tensor", "$ndarray"
_CANONICAL_NAN_BITS = struct.pack("<d", float("nan"))


def _encode_float(x: float) -> Any:
    if math.isfinite(x):
        return x  # Python's repr, which json uses, round-trips every finite double exactly, -0.0 included
    if math.isinf(x):
        return {_T_FLOAT: "inf" if x > 0 else "-inf"}
    bits = struct.pack("<d", x)
    # NaN sign and payload are kept too: "exact" should not have an asterisk.
    return {_T_FLOAT: "nan" if bits == _CANONICAL_NAN_BITS else "0x" + bits[::-1].hex()}


def _decode_float(text: Any, where: str) -> float:
    if text in ("inf", "-inf", "nan"):
        return float(text)
    if isinstance(text, str) and re.fullmatch(r"0x[0-9a-f]{16}", text):
        return struct.unpack("<d", bytes.fromhex(text[2:])[::-1])[0]
    raise ValueError(f"malformed float {text!r} at {where}")


def _savable(t: torch.Tensor, seen_storages: set[int], name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise TypeError(f"cannot save {name!r}: only dense torch tensors can be saved, got {type(t).__name__}")
    t = t.detach().to("cpu").contiguous()
    if t.numel():
        # safetensors refuses tensors that share storage (views of one buffer, tied weights): copy the later ones.
        if t.untyped_storage().data_ptr() in seen_storages:
            t = t.clone()
        seen_storages.add(t.untyped_storage().data_ptr())
    return t


class _Flattener:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()

    def tensor_name(self, path: list[str]) -> str:
        base = self.prefix + "/".join(path) if path else (self.prefix or "tensor")
        name, n = base, 1
        while name in self.tensors:  # keys containing "/" can make two paths spell the same name
            name, n = f"{base}#{n}", n + 1
        return name

    def add_tensor(self, t: torch.Tensor, path: list[str]) -> str:
        name = self.tensor_name(path)
        self.tensors[name] = _savable(t, self._storages, name)
        return name

    def encode(self, obj: Any, path: list[str], *, key: bool = False) -> Any:
        if obj is None or isinstance(obj, bool):  # before int: bool is an int subclass
            return obj
        if isinstance(obj, str):
            return str(obj)
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return _encode_float(float(obj))
        if isinstance(obj, np.generic) and not isinstance(obj, (np.void, np.object_)):
            return self.encode(obj.item(), path, key=key)  # numpy scalars: the value survives, the numpy type does not
        if isinstance(obj, list) and not key:
            return [self.encode(v, path + [str(i)]) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {_T_TUPLE: [self.encode(v, path + [str(i)], key=key) for i, v in enumerate(obj)]}
        if isinstance(obj, dict) and not key:
            if all(type(k) is str for k in obj):
                return {_T_DICT: {k: self.encode(v, path + [k]) for k, v in obj.items()}}
            # JSON keys are strings only; optimizer.state has int keys that load_state_dict needs back as ints.
            return {_T_ITEMS: [[self.encode(k, path, key=True), self.encode(v, path + [str(k)])]
                               for k, v in obj.items()]}
        if isinstance(obj, torch.Tensor) and not key:
            return {_T_TENSOR: self.add_tensor(obj, path)}
        if isinstance(obj, np.ndarray) and not key:
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise TypeError(f"cannot serialise a numpy array of dtype {obj.dtype} at {'/'.join(path)}")
            native = np.array(obj, dtype=obj.dtype.newbyteorder("="), order="C", copy=True)
            return {_T_NDARRAY: self.add_tensor(torch.from_numpy(native), path)}
        where = "/".join(path) or "<root>"
        raise TypeError(f"cannot serialise {type(obj).__name__} {'as a dict key ' if key else ''}at {where} "
                        "(supported: dict, list, tuple, int, float, bool, None, str, torch.Tensor, numpy array)")


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``obj`` into CPU tensors (named ``prefix + path``) and a JSON-able skeleton referencing them.

    Tensors come back contiguous with their dtype and shape; tensors sharing storage are saved as copies.
    Give each object saved into one file its own prefix (e.g. "optimizer/") so tensor names stay unique."""
    flattener = _Flattener(prefix)
    skeleton = flattener.encode(obj, [])
    return flattener.tensors, skeleton


def _decode_node(node: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode_node(v, tensors, f"{where}/{i}") for i, v in enumerate(node)]
    if not (isinstance(node, dict) and len(node) == 1):
        raise ValueError(f"malformed state skeleton at {where}: {type(node).__name__}")
    (tag, value), = node.items()
    if tag == _T_FLOAT:
        return _decode_float(value, where)
    if tag == _T_TUPLE and isinstance(value, list):
        return tuple(_decode_node(v, tensors, f"{where}/{i}") for i, v in enumerate(value))
    if tag == _T_DICT and isinstance(value, dict):
        return {k: _decode_node(v, tensors, f"{where}/{k}") for k, v in value.items()}
    if tag == _T_ITEMS and isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        return {_decode_node(k, tensors, where): _decode_node(v, tensors, f"{where}/{k}") for k, v in value}
    if tag in (_T_TENSOR, _T_NDARRAY) and isinstance(value, str):
        if value not in tensors:
            raise ValueError(f"state skeleton at {where} references tensor {value!r}, which is missing")
        return tensors[value] if tag == _T_TENSOR else tensors[value].numpy().copy()
    raise ValueError(f"malformed state skeleton at {where}: unknown tag {tag!r}")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``flatten_state``: tuples, int keys, non-finite floats and numpy arrays come back as they were."""
    return _decode_node(skeleton, tensors, "<root>")


# -------------------------------------------------------------------------------------------- file plumbing
def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view[:_WRITE_CHUNK])
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress", str(path))
            view = view[n:]
        os.fsync(fd)  # the rename that publishes the checkpoint must never reach disk before the data
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_regular(path: Path) -> int:
    # O_NOFOLLOW: a manifest must describe the directory's own files, not whatever a symlink points at.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def _dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _is_real_dir(entry: os.DirEntry) -> bool:
    return not entry.is_symlink() and entry.is_dir(follow_symlinks=False)


def _read_manifest(path: Path, creator: str) -> tuple[dict | None, str]:
    try:
        fd = _open_regular(path / MANIFEST)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(_MAX_MANIFEST_BYTES + 1)
        manifest = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        return None, "no manifest.json (incomplete or not a checkpoint)"
    except (OSError, ValueError) as exc:
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
    for name, entry in files.items():
        if (not _NAME_RE.fullmatch(name) or name == MANIFEST or not isinstance(entry, dict)
                or type(entry.get("size")) is not int or not isinstance(entry.get("sha256"), str)):
            return None, f"manifest.json has a malformed entry for {name!r}"
    return manifest, "ok"


def _check_file(path: Path, entry: dict, *, keep: bool) -> tuple[bytes | None, str]:
    """Hash a listed file; returns its bytes too when ``keep`` (load), so what is parsed is what was verified."""
    try:
        fd = _open_regular(path)
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry["size"]:
                return None, f"{path.name}: size {size} != {entry['size']} in manifest (truncated or modified)"
            digest, chunks = hashlib.sha256(), []
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                if keep:
                    chunks.append(chunk)
    except FileNotFoundError:
        return None, f"{path.name}: listed in manifest but missing"
    except OSError as exc:
        return None, f"{path.name}: unreadable ({exc})"
    if digest.hexdigest() != entry["sha256"]:
        return None, f"{path.name}: sha256 mismatch (corrupted)"
    return (b"".join(chunks) if keep else None), "ok"


def verify_checkpoint(path: Path, *, creator: str = DEFAULT_CREATOR) -> tuple[bool, str]:
    """(ok, reason): manifest present and ours, every listed file present with the right size and sha256."""
    path = Path(path)
    manifest, reason = _read_manifest(path, creator)
    if manifest is None:
        return False, reason
    for name, entry in manifest["files"].items():
        _, reason = _check_file(path / name, entry, keep=False)
        if reason != "ok":
            return False, reason
    return True, "ok"


def _our_checkpoints(root: Path, creator: str) -> list[tuple[int, Path]]:
    """(manifest step, path) of real ``step-*`` directories whose manifest names us; unverified."""
    found = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    for entry in entries:
        if _STEP_DIR_RE.fullmatch(entry.name) and _is_real_dir(entry):
            manifest, _ = _read_manifest(Path(entry.path), creator)
            if manifest is not None:
                found.append((manifest["step"], Path(entry.path)))
    # Sorting by manifest step, never by name: step-1000000 sorts before step-999999 as text.
    return sorted(found, key=lambda sp: (sp[0], sp[1].name), reverse=True)


def find_latest_checkpoint(root: Path, *, creator: str = DEFAULT_CREATOR) -> Path | None:
    """Newest checkpoint that verifies, by manifest step; partial, corrupt, temporary and symlinked ones are skipped."""
    for _, path in _our_checkpoints(Path(root), creator):
        if verify_checkpoint(path, creator=creator)[0]:
            return path
    return None


def load_checkpoint(path: Path, *, creator: str = DEFAULT_CREATOR
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """({name: tensors on CPU}, {name: JSON value}) of a checkpoint; anything that fails verification raises OutputError."""
    path = Path(path)

    def corrupt(reason: str) -> OutputError:
        return OutputError(f"checkpoint {path} is unusable: {reason}",
                           hint="resume from an earlier checkpoint; find_latest_checkpoint skips unusable ones")

    manifest, reason = _read_manifest(path, creator)
    if manifest is None:
        raise corrupt(reason)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    json_values: dict[str, Any] = {}
    for name, entry in manifest["files"].items():
        data, reason = _check_file(path / name, entry, keep=True)
        if data is None:
            raise corrupt(reason)
        stem, _, ext = name.rpartition(".")
        try:
            if ext == "safetensors":
                tensors[stem] = safetensors.torch.load(data)
            elif ext == "json":
                json_values[stem] = json.loads(data.decode("utf-8"))
            else:
                raise ValueError(f"unknown file type {name!r}")
        except Exception as exc:  # a hash-valid file that does not parse was written wrong: still unusable
            raise corrupt(f"{name}: {exc}") from exc
    return tensors, json_values


# ------------------------------------------------------------------------------------------------------ save
def _serialise(files: dict[str, dict[str, torch.Tensor]], json_files: dict[str, Any]) -> dict[str, bytes]:
    blobs: dict[str, bytes] = {}
    for names, ext in ((files, "safetensors"), (json_files, "json")):
        for name in names:
            if not _NAME_RE.fullmatch(name) or f"{name}.{ext}" == MANIFEST:
                raise ValueError(f"invalid checkpoint file name {name!r}: use letters, digits, '_', '.', '-'")
    for name, tensors in files.items():
        seen: set[int] = set()
        ready = {key: _savable(t, seen, f"{name}/{key}") for key, t in tensors.items()}
        blobs[f"{name}.safetensors"] = safetensors.torch.save(ready, metadata={"format": "pt"})
    for name, value in json_files.items():
        # allow_nan=False: NaN/Infinity are not JSON and other readers would reject the file.
        blobs[f"{name}.json"] = json.dumps(value, allow_nan=False, indent=1).encode("ascii")
    return blobs


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would address our whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, it is just not ours to signal
        return True
    return True


def _discard(path: Path, root: Path) -> None:
    """Delete a checkpoint directory without ever exposing a half-deleted ``step-*``: rename first, then rmtree."""
    trash = root / f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _foreign_manifest(path: Path, creator: str) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
    except (OSError, ValueError):  # none yet, or cut short by the crash: an unfinished save of ours
        return False
    return isinstance(manifest, dict) and manifest.get("creator") != creator


def _clean_scratch(root: Path, creator: str) -> None:
    """Remove what crashed saves left behind (no live process owns it any more)."""
    for entry in list(os.scandir(root)):
        match = _SCRATCH_RE.fullmatch(entry.name)
        if not match or not _is_real_dir(entry):
            continue
        pid = int(match.group(3))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # maybe a concurrent save by another live process
        path, final = Path(entry.path), root / match.group(2)
        if _foreign_manifest(path, creator):
            continue  # another creator's files under our naming pattern: not ours to delete
        if match.group(1) == "trash" and not os.path.lexists(final) and verify_checkpoint(path, creator=creator)[0]:
            # A crash between moving the old checkpoint aside and publishing its replacement: put it back.
            os.rename(path, final)
            log.warning("restored checkpoint %s left aside by an interrupted save", final)
            continue
        shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path, keep_last: int, creator: str, just_saved: Path) -> None:
    ours = _our_checkpoints(root, creator)  # only real step-* dirs with our manifest can ever be deleted
    keep = {just_saved}
    for _, path in ours:
        if len(keep) >= keep_last:
            break
        if path not in keep and verify_checkpoint(path, creator=creator)[0]:
            keep.add(path)
    for _, path in ours:
        if path not in keep:
            _discard(path, root)


def _output_error(exc: OSError, step: int, root: Path) -> OutputError:
    where = f"checkpoint step {step} in {root}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        message, hint = f"disk full while saving {where}", "free disk space or lower the number of checkpoints kept"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        message, hint = f"permission denied while saving {where}", "make the output directory writable"
    else:
        message, hint = f"could not save {where}: {exc.strerror or exc}", "check the output directory and the disk"
    return OutputError(f"{message}; the previous checkpoint is intact", hint=hint,
                       details={"errno": exc.errno, "path": exc.filename, "step": step})


def save_checkpoint(root: Path, step: int, files: dict[str, dict[str, torch.Tensor]], json_files: dict[str, Any],
                    *, keep_last: int | None, creator: str = DEFAULT_CREATOR) -> Path:
    """Atomically write ``root/step-NNNNNN`` (replacing an earlier save of the same step) and return its path.

    ``files`` become ``<name>.safetensors``, ``json_files`` ``<name>.json``. Afterwards keeps the newest
    ``keep_last`` valid checkpoints of ``creator`` (the new one always among them); None keeps all.
    Raises OutputError on any OS error, after removing the partial directory; earlier checkpoints are untouched."""
    if type(step) is not int or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
        raise ValueError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
    root = Path(root)
    blobs = _serialise(files, json_files)  # unserialisable state fails here, before the disk is touched
    final = root / _dir_name(step)
    tmp: Path | None = None
    aside: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.mkdir(tmp)
        listed = {}
        for name, data in blobs.items():
            _write_file(tmp / name, data)
            listed[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "creator": creator, "step": step,
                    "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "created_unix": time.time(), "files": listed}
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode("ascii"))  # last: marks completeness
        _fsync_dir(tmp)
        if os.path.lexists(final):
            if final.is_symlink() or _read_manifest(final, creator)[0] is None:
                raise OutputError(f"cannot save checkpoint step {step}: {final} exists and is not a checkpoint "
                                  f"of {creator!r}", hint="move it away or use another output directory")
            # rename() cannot replace a non-empty directory, so the old one steps aside until the new one is in.
            aside = root / f".trash-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except OSError:
            if aside is not None:
                try:
                    os.rename(aside, final)
                except OSError:
                    log.error("could not move checkpoint %s back to %s", aside, final)
            raise
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _output_error(exc, step, root) from exc
        raise
    # Committed: the checkpoint is complete under its final name. What follows is housekeeping, and its
    # failure must not turn a successful save into a reported failure.
    try:
        _fsync_dir(root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        _clean_scratch(root, creator)
        if keep_last is not None:
            _prune(root, keep_last, creator, final)
    except OSError as exc:
        log.warning("checkpoint %s saved, but cleaning up old checkpoints failed: %s", final, exc)
    return final
