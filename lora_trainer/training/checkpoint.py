"""Resumable, atomic, verifiable training checkpoints, with no pickles: loading one can never execute code.

``step-NNNNNN/`` holds ``<name>.safetensors``, ``<name>.json`` and ``manifest.json`` (creator, step, size and
sha256 of each file). It is built under a hidden name and renamed into place once every byte is fsync'ed, so
a kill at any moment leaves the complete checkpoint or none. Where training is lives in ``TrainingProgress``
and the manifest's step; directory names are for humans only.
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
import struct
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from ..contract.errors import OutputError
# What a checkpoint is (manifest, names) is read torch-free, so preflight judges checkpoints as the trainer does.
from ..preflight.checkpoints import (DEFAULT_CREATOR, FORMAT, FORMAT_VERSION, MANIFEST,  # noqa: F401
                                     NAME_RE as _NAME_RE, checkpoint_dirs, open_regular as _open_regular,
                                     read_manifest as _read_manifest)

log = logging.getLogger("train_lora.checkpoint")

# Scratch directories of our saves; the pid tells whether the process that made one may still be using it.
_SCRATCH_RE = re.compile(r"\.(tmp|trash)-(step-\d{6,})-(\d+)-[0-9a-f]+")
_WRITE_CHUNK = 1 << 24  # os.write may write less than asked, and huge single writes fail on some systems


@dataclass
class TrainingProgress:
    """Where training is. ``batch_in_epoch``: batches of ``epoch`` already consumed, so a resume skips exactly
    those; ``micro_step``: micro-batches accumulated toward the next optimizer step; ``elapsed_s``: training
    time summed over all runs, so throughput and ETA survive resumes."""

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
        progress = cls(**{**data, "loss_ema": _decode_node(data["loss_ema"], {}, "loss_ema"),
                          "elapsed_s": _decode_node(data["elapsed_s"], {}, "elapsed_s")})
        progress._validate()
        return progress

    def _validate(self) -> None:
        for name in self._INT_FIELDS:  # type(), not isinstance(): True would pass as an int
            if type(getattr(self, name)) is not int or getattr(self, name) < 0:
                raise ValueError(f"training progress {name} must be a non-negative int, got {getattr(self, name)!r}")
        if self.loss_ema is not None and type(self.loss_ema) not in (int, float):
            raise ValueError(f"training progress loss_ema must be a number or None, got {self.loss_ema!r}")
        if type(self.elapsed_s) not in (int, float) or not self.elapsed_s >= 0:
            raise ValueError(f"training progress elapsed_s must be a number >= 0, got {self.elapsed_s!r}")


# Every JSON object in a skeleton is a one-key tag, so a user dict key (even "$tuple") can never be misread.
_T_TUPLE, _T_DICT, _T_ITEMS, _T_FLOAT = "$tuple", "$dict", "$items", "$float"
_T_TENSOR, _T_NDARRAY = "$tensor", "$ndarray"
_CANONICAL_NAN_BITS = struct.pack("<d", float("nan"))


def _encode_float(x: float) -> Any:
    if math.isfinite(x):
        return x  # json writes repr(), which round-trips every finite double exactly, -0.0 included
    if math.isinf(x):
        return {_T_FLOAT: "inf" if x > 0 else "-inf"}
    bits = struct.pack("<d", x)  # NaN sign and payload are kept too: "exact" should not have an asterisk
    return {_T_FLOAT: "nan" if bits == _CANONICAL_NAN_BITS else "0x" + bits[::-1].hex()}


def _decode_float(text: Any, where: str) -> float:
    if text in ("inf", "-inf", "nan"):
        return float(text)
    if isinstance(text, str) and re.fullmatch(r"0x[0-9a-f]{16}", text):
        return struct.unpack("<d", bytes.fromhex(text[2:])[::-1])[0]
    raise ValueError(f"malformed float {text!r} at {where}")


def _savable(t: Any, seen_storages: set[int], name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise TypeError(f"cannot save {name!r}: only dense torch tensors can be saved, got {type(t).__name__}")
    t = t.detach().to("cpu").contiguous()
    if t.numel():
        # safetensors refuses tensors that share storage (views of one buffer, tied weights): copy later ones.
        if t.untyped_storage().data_ptr() in seen_storages:
            t = t.clone()
        seen_storages.add(t.untyped_storage().data_ptr())
    return t


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``obj`` into CPU tensors named ``prefix/path/in/obj`` and a JSON-able skeleton referencing them.

    Tensors are saved contiguous with their dtype and shape; tensors sharing storage are saved as copies.
    Give each object stored in one file its own prefix (e.g. "optimizer") so tensor names stay unique."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    namespace = [prefix.rstrip("/")] if prefix.rstrip("/") else []

    def add_tensor(t: torch.Tensor, path: list[str]) -> str:
        base = "/".join(namespace + path) or "tensor"
        name, n = base, 1
        while name in tensors:  # keys containing "/" can make two paths spell the same name
            name, n = f"{base}#{n}", n + 1
        tensors[name] = _savable(t, storages, name)
        return name

    def encode(obj: Any, path: list[str], key: bool = False) -> Any:
        if obj is None or isinstance(obj, bool):  # before int: bool is an int subclass
            return obj
        if isinstance(obj, (str, int)):
            return str(obj) if isinstance(obj, str) else int(obj)
        if isinstance(obj, float):
            return _encode_float(float(obj))
        if isinstance(obj, np.generic) and not isinstance(obj, (np.void, np.object_)):
            return encode(obj.item(), path, key)  # numpy scalars: the value survives, the numpy type does not
        if isinstance(obj, tuple):
            return {_T_TUPLE: [encode(v, path + [str(i)], key) for i, v in enumerate(obj)]}
        if isinstance(obj, list) and not key:
            return [encode(v, path + [str(i)]) for i, v in enumerate(obj)]
        if isinstance(obj, dict) and not key:
            if all(type(k) is str for k in obj):
                return {_T_DICT: {k: encode(v, path + [k]) for k, v in obj.items()}}
            # JSON keys are strings only; optimizer.state has int keys that load_state_dict needs back as ints.
            return {_T_ITEMS: [[encode(k, path, True), encode(v, path + [str(k)])] for k, v in obj.items()]}
        if isinstance(obj, torch.Tensor) and not key:
            return {_T_TENSOR: add_tensor(obj, path)}
        if isinstance(obj, np.ndarray) and not key and not obj.dtype.hasobject and obj.dtype.fields is None:
            native = np.array(obj, dtype=obj.dtype.newbyteorder("="), order="C", copy=True)
            return {_T_NDARRAY: add_tensor(torch.from_numpy(native), path)}
        raise TypeError(f"cannot serialise {type(obj).__name__} {'as a dict key ' if key else ''}at "
                        f"{'/'.join(path) or '<root>'} (supported: dict, list, tuple, int, float, bool, None, "
                        "str, torch.Tensor, numpy array)")

    skeleton = encode(obj, [])
    return tensors, skeleton


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


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view[:_WRITE_CHUNK])
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress", str(path))
            view = view[n:]
        os.fsync(fd)  # the rename that publishes the checkpoint must never reach the disk before the data
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:  # makes directory entries (new files, a rename) durable, not just data
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_real_dir(entry: os.DirEntry) -> bool:
    return not entry.is_symlink() and entry.is_dir(follow_symlinks=False)


def _check_file(path: Path, entry: dict, *, keep: bool) -> tuple[bytes | None, str]:
    """Hash a listed file; with ``keep`` also return its bytes, so what load parses is what was verified."""
    try:
        with os.fdopen(_open_regular(path), "rb") as f:
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
    manifest, reason = _read_manifest(Path(path), creator)
    for name, entry in (manifest or {}).get("files", {}).items():
        _, reason = _check_file(Path(path) / name, entry, keep=False)
        if reason != "ok":
            break
    return reason == "ok", reason


def _our_checkpoints(root: Path, creator: str) -> list[tuple[int, Path]]:
    """(manifest step, path) of real ``step-*`` directories whose manifest names us, newest first; unverified."""
    return checkpoint_dirs(root, creator)[0]


def find_latest_checkpoint(root: Path, *, creator: str = DEFAULT_CREATOR,
                           rejected: list[tuple[Path, str]] | None = None) -> Path | None:
    """Newest checkpoint that verifies, by manifest step; partial, corrupt, temporary and symlinked ones are skipped,
    and those with our manifest that fail verification are added to ``rejected`` as (path, reason)."""
    for _, path in _our_checkpoints(Path(root), creator):
        ok, reason = verify_checkpoint(path, creator=creator)
        if ok:
            return path
        if rejected is not None:
            rejected.append((path, reason))
    return None


def load_checkpoint(path: Path, *, creator: str = DEFAULT_CREATOR
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """({name: {key: CPU tensor}}, {name: JSON value}); a checkpoint that fails verification raises OutputError."""
    path = Path(path)

    def unusable(reason: str) -> OutputError:
        return OutputError(f"checkpoint {path} is unusable: {reason}",
                           hint="resume from an earlier checkpoint; find_latest_checkpoint skips unusable ones")

    manifest, reason = _read_manifest(path, creator)
    if manifest is None:
        raise unusable(reason)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    json_values: dict[str, Any] = {}
    for name, entry in manifest["files"].items():
        data, reason = _check_file(path / name, entry, keep=True)
        if data is None:
            raise unusable(reason)
        stem, _, ext = name.rpartition(".")
        try:
            if ext == "safetensors":
                tensors[stem] = safetensors.torch.load(data)
            elif ext == "json":
                json_values[stem] = json.loads(data.decode("utf-8"))
            else:
                raise ValueError(f"unknown file type {name!r}")
        except Exception as exc:  # hash-valid but unparseable means it was written wrong: unusable all the same
            raise unusable(f"{name}: {exc}") from exc
    return tensors, json_values


def _serialise(files: dict[str, dict[str, torch.Tensor]], json_files: dict[str, Any]) -> dict[str, bytes]:
    for names, ext in ((files, "safetensors"), (json_files, "json")):
        for name in names:
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or f"{name}.{ext}" == MANIFEST:
                raise ValueError(f"invalid checkpoint file name {name!r}: use letters, digits, '_', '.', '-'")
    blobs: dict[str, bytes] = {}
    for name, tensors in files.items():
        seen: set[int] = set()
        ready = {key: _savable(t, seen, f"{name}/{key}") for key, t in tensors.items()}
        blobs[f"{name}.safetensors"] = safetensors.torch.save(ready, metadata={"format": "pt"})
    for name, value in json_files.items():  # allow_nan=False: NaN/Infinity are not JSON; other readers reject them
        blobs[f"{name}.json"] = json.dumps(value, allow_nan=False, indent=1).encode("ascii")
    return blobs


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would address our whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, it just is not ours to signal
        pass
    return True


def _discard(path: Path, root: Path) -> None:
    """Delete a checkpoint without ever exposing a half-deleted ``step-*``: rename it away first, then rmtree."""
    trash = root / f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_scratch(root: Path, creator: str) -> None:
    """Remove what crashed saves left behind: scratch dirs that no live process owns any more."""
    for entry in list(os.scandir(root)):
        match = _SCRATCH_RE.fullmatch(entry.name)
        if not match or not _is_real_dir(entry):
            continue
        pid = int(match.group(3))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # maybe a concurrent save by another live process
        path, final = Path(entry.path), root / match.group(2)
        try:  # a manifest cut short by the crash is ours; a complete one of another creator is not
            manifest = json.loads((path / MANIFEST).read_bytes())
            if isinstance(manifest, dict) and manifest.get("creator") != creator:
                continue
        except (OSError, ValueError, RecursionError):
            pass
        if match.group(1) == "trash" and not os.path.lexists(final) and verify_checkpoint(path, creator=creator)[0]:
            # Crashed between moving the old checkpoint aside and publishing its replacement: put it back.
            os.rename(path, final)
            log.warning("restored checkpoint %s, left aside by an interrupted save", final)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path, keep_last: int, creator: str, just_saved: Path) -> None:
    ours = _our_checkpoints(root, creator)  # only real step-* dirs with our manifest can ever be deleted
    keep = {just_saved}  # even when newer steps exist (resumed from an older checkpoint)
    for _, path in ours:
        if len(keep) >= keep_last:
            break
        if path not in keep and verify_checkpoint(path, creator=creator)[0]:
            keep.add(path)
    for _, path in ours:
        if path not in keep:
            _discard(path, root)


def _output_error(exc: OSError, step: int, root: Path) -> OutputError:
    what, hint = {errno.ENOSPC: ("disk full", "free disk space or keep fewer checkpoints"),
                  errno.EDQUOT: ("disk quota exceeded", "free disk space or keep fewer checkpoints"),
                  errno.EACCES: ("permission denied", "make the output directory writable"),
                  errno.EPERM: ("permission denied", "make the output directory writable"),
                  errno.EROFS: ("read-only file system", "choose a writable output directory"),
                  }.get(exc.errno, (f"error ({exc.strerror or exc})", "check the output directory and its disk"))
    return OutputError(f"{what} while saving checkpoint step {step} in {root}; the previous checkpoint is intact",
                       hint=hint, details={"errno": exc.errno, "path": exc.filename, "step": step})


def checkpoint_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``root``."""
    return Path(root) / f"step-{step:06d}"


def save_checkpoint(root: Path, step: int, files: dict[str, dict[str, torch.Tensor]], json_files: dict[str, Any],
                    *, keep_last: int | None, creator: str = DEFAULT_CREATOR) -> Path:
    """Atomically write ``root/step-NNNNNN`` (replacing an earlier save of the same step); return its path.

    ``files`` become ``<name>.safetensors``, ``json_files`` ``<name>.json``. Then keeps the newest ``keep_last``
    valid checkpoints of ``creator``, the new one always among them (None: keep all). Any OS error raises
    OutputError after the partial directory is removed; earlier checkpoints are never touched by a failed save."""
    if type(step) is not int or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
        raise ValueError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
    root = Path(root)
    blobs = _serialise(files, json_files)  # unserialisable state fails here, before the disk is touched
    final = checkpoint_dir(root, step)
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
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode("ascii"))
        _fsync_dir(tmp)
        if os.path.lexists(final):
            if final.is_symlink() or _read_manifest(final, creator)[0] is None:
                raise OutputError(f"cannot save checkpoint step {step}: {final} exists and is not a checkpoint "
                                  f"of {creator!r}", hint="move it away or use another output directory")
            # rename() cannot replace a non-empty directory: the old one steps aside until the new one is in.
            aside = root / f".trash-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except BaseException:
            if aside is not None:
                try:
                    os.rename(aside, final)
                except OSError:  # the next save's scratch cleanup restores it
                    log.error("could not move checkpoint %s back to %s", aside, final)
            raise
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _output_error(exc, step, root) from exc
        raise
    # Committed. What follows is housekeeping: its failure must not report a successful save as failed.
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
