"""Text-encoder conditioning computed once per distinct caption, kept where it fits: on the accelerator, in host
memory, or on disk.

Why tiers: a FLUX.1 / SD3 entry is T5's full padded sequence, 512 x 4096 x 2 bytes = 4 MiB in bf16, so 50,000
captions are 200 GB. Placement is decided before the cache is filled, from the size of one entry (read from an
existing file's header, or measured on the first encoded chunk) times the number of distinct captions:

* ``"device"``: the whole cache takes at most ``device_fraction`` (0.1) of the accelerator's free memory
  (CUDA only): a step then needs no host-to-device copy;
* ``"host"``: it fits ``host_budget_bytes`` (default: a quarter of the available RAM, at most 16 GiB): a step
  stacks its rows and copies them through pinned memory;
* ``"disk"``: everything else, or on request (``to_disk=True``): one safetensors file per entry, memory-mapped
  and read per step, with a small byte-bounded LRU in host memory (the dropout caption "" stays hot).

Identity: an entry's key is sha256 over the caption, the encoder identity string the caller passes (see
``encoder_identity``), the device type the encoders ran on and this file's format version. With a disk folder,
existing entries are reused whatever the placement (a rerun or a resume skips the text encoders for them); new
entries are written there when ``persist`` is set or the placement is ``"disk"``. Files are written to a temporary
name and moved into place with ``os.replace``, so a reader sees a whole entry or none; an entry whose header,
size, key or checksum does not match is encoded again.

Entries are stored as the family produced them: the encoders' dtype (bf16/fp16 on a GPU; fp32 stays fp32 on the
CPU, so CPU runs stay bitwise reproducible) and every padding position (the families pad on purpose: the
pipelines sample with the same padding). ``batch`` returns exactly those bits.

Captions are plain strings and "" is an entry like any other: with caption dropout but no tag shuffling, the
captions a step can see are the dataset's built captions plus "", so the trainer can cache them all (build with
``captions + [""]``) instead of turning the cache off. Validation prompts may be added the same way.

Only torch and safetensors are needed here; nothing imports the trainer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import sys
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT = "1"  # bump when the entry layout or the key derivation changes: old files then simply miss
GIB = 1024 ** 3
DEFAULT_DEVICE_FRACTION = 0.1
DEFAULT_HOST_FRACTION = 0.25
DEFAULT_HOST_CAP = 16 * GIB
DEFAULT_LRU_BYTES = 256 * 1024 ** 2
_MAX_HEADER = 16 * 1024 ** 2  # a sane bound for an entry's safetensors header (real ones are < 1 KiB)
_TMP_PREFIX = ".tmp-"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
# Config keys that say where/when a model was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_diffusers_version", "_commit_hash",
                         "dtype", "torch_dtype", "_use_default_values"}


class TextCacheError(RuntimeError):
    """A text-cache entry cannot be served (no disk folder for a cache that needs one, a damaged file at step time)."""


# ------------------------------------------------------------------------------------------------ identity
def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _config_dict(module) -> dict | None:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "to_dict"):
        d = cfg.to_dict()
    elif isinstance(cfg, Mapping):
        d = dict(cfg)
    else:
        d = dict(getattr(cfg, "__dict__", {}))
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
    attn = getattr(cfg, "_attn_implementation", None)  # sdpa / eager / flash: the numerics differ
    if attn is not None:
        d["_attn_implementation"] = attn
    return _jsonable(d)


def _weight_fingerprint(module, tensors: int = 8, samples: int = 512) -> dict:
    """A cheap stand-in for hashing the weights: parameter count and dtypes, plus strided samples of a few
    parameters (first, last and evenly between, by name). Two fine-tunes of one architecture differ in these
    samples; reading them costs a few KiB of device-to-host copies, not gigabytes."""
    params = sorted(module.named_parameters(), key=lambda kv: kv[0]) if hasattr(module, "named_parameters") else []
    out: dict[str, Any] = {"count": sum(p.numel() for _, p in params),
                           "dtypes": sorted({str(p.dtype) for _, p in params})}
    if not params:
        return out
    picks = sorted({round(i * (len(params) - 1) / max(1, tensors - 1)) for i in range(min(tensors, len(params)))})
    h = hashlib.sha256()
    for i in picks:
        name, p = params[i]
        if p.device.type == "meta" or not p.is_contiguous():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:unsampled".encode())
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].to("cpu").contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    out["samples_sha256"] = h.hexdigest()
    return out


def _tokenizer_identity(tok) -> dict:
    """Class, lengths, padding/truncation sides, special tokens, and a hash of the whole tokenizer: the fast
    backend's serialisation (vocab, merges, normaliser, pre-tokeniser; a few MB for T5) when there is one, else
    the vocabulary (and a sentencepiece model's bytes)."""
    d: dict[str, Any] = {"class": f"{type(tok).__module__}.{type(tok).__qualname__}"}
    for attr in ("vocab_size", "model_max_length", "padding_side", "truncation_side", "special_tokens_map"):
        # An attribute a tokenizer lacks (or fails to compute) is simply not part of its identity.
        with contextlib.suppress(Exception):
            d[attr] = _jsonable(getattr(tok, attr))
    with contextlib.suppress(TypeError):
        d["len"] = len(tok)
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(b"backend:" + backend.to_str().encode())
    else:
        with contextlib.suppress(Exception):
            h.update(b"vocab:" + json.dumps(tok.get_vocab(), sort_keys=True, ensure_ascii=False).encode())
        sp = getattr(tok, "sp_model", None)
        if sp is not None and hasattr(sp, "serialized_model_proto"):
            h.update(b"sp:" + sp.serialized_model_proto())
    d["sha256"] = h.hexdigest()
    return d


def encoder_identity(family, comps, extra: Mapping[str, Any] | None = None) -> str:
    """The identity string of "what turns a caption into conditioning", for ``TextCache(encoder_key=...)``.

    Covers the family (name, implementation class, variant, T5 max_sequence_length), each text encoder (class,
    config without its save path/version, attention implementation, parameter count and dtypes, a sampled weight
    fingerprint), each tokenizer (see _tokenizer_identity), the torch/transformers versions and the float32 matmul
    precision, plus ``extra`` (what the caller knows about the weight files: e.g. ``weight_files_identity(...)``).
    Nothing hashed here is larger than a tokenizer's JSON: it takes milliseconds, not a pass over the weights.
    Compute it after the encoders are loaded and before build; their device does not matter."""
    try:
        max_len = getattr(family, "max_sequence_length", None)
    except Exception:  # noqa: BLE001 - a family without a T5 may not know one
        max_len = None
    payload = {
        "format": FORMAT,
        "family": getattr(family, "name", None),
        "family_class": f"{type(family).__module__}.{type(family).__qualname__}",
        "variant": getattr(comps, "variant", None) or getattr(family, "variant", None),
        "max_sequence_length": max_len,
        "text_encoders": {name: {"class": f"{type(m).__module__}.{type(m).__qualname__}", "config": _config_dict(m),
                                 "weights": _weight_fingerprint(m)}
                          for name, m in getattr(comps, "text_encoders", {}).items()},
        "tokenizers": {name: _tokenizer_identity(t) for name, t in getattr(comps, "tokenizers", {}).items()},
        "torch": torch.__version__,
        "transformers": getattr(sys.modules.get("transformers"), "__version__", None),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "extra": _jsonable(dict(extra or {})),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _safetensors_header_sha(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 * 1024 ** 2:
                return None
            return hashlib.sha256(fh.read(n)).hexdigest()
    except (OSError, struct.error):
        return None


def weight_files_identity(*paths: os.PathLike | str) -> dict[str, Any]:
    """Cheap identity of weight files, for ``encoder_identity(extra=...)``: per file, its size and (for
    .safetensors) the sha256 of its header (tensor names, dtypes, shapes, offsets, metadata), else its mtime.
    A folder contributes its direct files (a diffusers ``text_encoder/`` folder); hub symlinks are followed."""
    out: dict[str, Any] = {}
    for p in map(Path, paths):
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                out[str(f)] = None
                continue
            label = f"{p.name}/{f.name}" if p.is_dir() else f.name
            if f.suffix == ".safetensors":
                out[label] = [st.st_size, _safetensors_header_sha(f)]
            else:
                out[label] = [st.st_size, st.st_mtime_ns]
    return out


# ------------------------------------------------------------------------------------------------ budgets
def _cgroup_available() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit, usage = int(raw), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # cgroup v1's "unlimited"
            return None
        return max(0, limit - usage)
    return None


def available_host_bytes() -> int | None:
    """Memory a new allocation can get without swapping: MemAvailable (else free pages), bounded by the
    container's cgroup limit when there is one. None when unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    cg = _cgroup_available()
    if cg is not None:
        avail = cg if avail is None else min(avail, cg)
    return avail


def default_host_budget(fraction: float = DEFAULT_HOST_FRACTION, cap: int = DEFAULT_HOST_CAP, share: int = 1) -> int:
    """``fraction`` of the available RAM, at most ``cap``, divided by ``share`` (the processes on this machine:
    each rank holds its own cache). 2 GiB / share when the available memory is unknown."""
    avail = available_host_bytes()
    budget = min(cap, 2 * GIB) if avail is None else min(cap, int(avail * fraction))
    return budget // max(1, share)


def estimate_bytes_per_entry(family: str, *, max_sequence_length: int | None = None, dtype_bytes: int = 2) -> int:
    """An entry's size for the real models, from shapes alone (for preflight, before anything is loaded):
    SD1.x [77, 768]; SD2.x [77, 1024]; SDXL [77, 2048] + pooled 1280; FLUX.1 [L, 4096] + pooled 768 (L 512 dev,
    256 schnell); SD3 [77 + L, 4096] + pooled 2048 (L 256)."""
    if family == "sd15":
        n = 77 * 768
    elif family == "sd2":
        n = 77 * 1024
    elif family == "sdxl":
        n = 77 * 2048 + 1280
    elif family == "flux1":
        n = (max_sequence_length or 512) * 4096 + 768
    elif family == "sd3":
        n = (77 + (max_sequence_length or 256)) * 4096 + 2048
    else:
        raise ValueError(f"unknown family {family!r}")
    return n * dtype_bytes


def choose_placement(total_bytes: int, *, device_budget_bytes: int | None, host_budget_bytes: int,
                     to_disk: bool = False) -> tuple[str, str]:
    """("device" | "host" | "disk", why). ``device_budget_bytes`` is device_fraction x the accelerator's free
    memory, None without a CUDA device."""
    mib = total_bytes / 1024 ** 2
    if to_disk:
        return "disk", "requested (to_disk)"
    if device_budget_bytes is not None and total_bytes <= device_budget_bytes:
        return "device", f"{mib:.1f} MiB fits the device budget ({device_budget_bytes / 1024 ** 2:.1f} MiB)"
    if total_bytes <= host_budget_bytes:
        why = f"{mib:.1f} MiB fits the host budget ({host_budget_bytes / 1024 ** 2:.1f} MiB)"
        if device_budget_bytes is not None:
            why += f" but not the device budget ({device_budget_bytes / 1024 ** 2:.1f} MiB)"
        return "host", why
    return "disk", f"{mib:.1f} MiB exceeds the host budget ({host_budget_bytes / 1024 ** 2:.1f} MiB)"


# ------------------------------------------------------------------------------------------------ entry files
def _crc(t: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes as safetensors stores them (row-major, native little-endian)."""
    return zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


def _read_header(path: Path) -> tuple[dict, dict, int] | None:
    """(tensor headers, metadata, data bytes) of a complete safetensors file, or None if it is not one: short,
    too long, garbage, or its tensors do not end exactly where the file does (a truncated or padded write)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) != 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n <= 1 or n > _MAX_HEADER or 8 + n > size:
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.pop("__metadata__", None) or {}
    end = 0
    try:
        for info in header.values():
            begin, stop = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= int(d)
            if stop - begin != count * _DTYPE_BYTES[info["dtype"]]:
                return None
            end = max(end, stop)
    except (KeyError, TypeError, ValueError):
        return None
    if 8 + n + end != size:
        return None
    return header, meta, end


def _entry_key(encoder_key: str, device_type: str, caption: str) -> str:
    payload = json.dumps(["lora_trainer.text_cache", FORMAT, encoder_key, device_type, caption], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


# ------------------------------------------------------------------------------------------------ the cache
Entry = dict[str, torch.Tensor]


class TextCache:
    """Conditioning per distinct caption, computed once while the text encoders are frozen.

    ``TextCache(encoder_key, disk_dir=..., ...)``, then ``build(family, comps, captions, device=..., batch_size=...,
    progress=...)``, then ``batch(captions)`` per step: a dict of [B, ...] tensors on the training device, rows in
    caption order (duplicates allowed). ``plan()`` says where the entries went and how many were reused.

    Parameters:
      encoder_key: identity of the text encoders (``encoder_identity``); part of every entry's key.
      disk_dir: entry folder. Existing entries there are reused; new ones are written when ``persist`` is set or
        the placement is "disk". None: memory only (a cache over the host budget is then an error).
      persist: write every new entry to ``disk_dir``, whatever the placement (a rerun then skips the encoders).
      to_disk: place on disk whatever the size.
      device_fraction, free_device_bytes: the "device" tier holds at most this fraction of the accelerator's free
        memory (CUDA only; ``free_device_bytes`` None means no device tier, e.g. on the CPU).
      host_budget_bytes: the "host" tier's limit; None: ``default_host_budget()``.
      lru_bytes: host memory for recently read disk entries.
    """

    def __init__(self, encoder_key: str = "", *, disk_dir: os.PathLike | str | None = None, persist: bool = False,
                 to_disk: bool = False, device_fraction: float = DEFAULT_DEVICE_FRACTION,
                 free_device_bytes: int | None = None, host_budget_bytes: int | None = None,
                 lru_bytes: int = DEFAULT_LRU_BYTES) -> None:
        self.encoder_key = encoder_key
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.persist = persist
        self.to_disk = to_disk
        self.device_fraction = device_fraction
        self.free_device_bytes = free_device_bytes
        self.host_budget_bytes = host_budget_bytes
        self.lru_bytes = lru_bytes
        self.device = torch.device("cpu")
        self.placement: str | None = None
        self.bytes_per_entry = 0
        self.total_bytes = 0
        self.hits = 0
        self.encoded = 0
        self.reason = ""
        self._keys: dict[str, str] = {}
        self._sizes: dict[str, int] = {}  # caption -> bytes
        self._mem: dict[str, Entry] = {}  # "device" / "host" placement
        self._lru: OrderedDict[str, Entry] = OrderedDict()  # "disk" placement
        self._lru_used = 0
        self.disk_reads = 0

    # -- reporting ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, caption: object) -> bool:
        return caption in self._keys

    @property
    def captions(self) -> list[str]:
        return list(self._keys)

    def plan(self) -> dict[str, Any]:
        """JSON-ready: where the entries live and why, for the run_started event and the validation summary."""
        return {"placement": self.placement, "entries": len(self), "bytes_per_entry": self.bytes_per_entry,
                "total_bytes": self.total_bytes, "hits": self.hits, "encoded": self.encoded,
                "disk_dir": str(self.disk_dir) if self.disk_dir is not None else None, "persist": self.persist,
                "device_budget_bytes": self._device_budget(), "host_budget_bytes": self.host_budget_bytes,
                "reason": self.reason}

    def _device_budget(self) -> int | None:
        if self.free_device_bytes is None or self.device.type != "cuda":
            return None
        return int(self.free_device_bytes * self.device_fraction)

    # -- files ------------------------------------------------------------------------------------------------
    def path_for(self, caption: str) -> Path:
        if self.disk_dir is None:
            raise TextCacheError("this text cache has no disk folder")
        key = self._keys.get(caption) or _entry_key(self.encoder_key, self.device.type, caption)
        return self.disk_dir / key[:2] / f"{key}.safetensors"

    def _valid_header(self, caption: str) -> tuple[dict, int] | None:
        """(tensor headers, bytes) of this caption's entry file when it is complete and belongs to it."""
        found = _read_header(self.path_for(caption))
        if found is None:
            return None
        header, meta, nbytes = found
        if meta.get("format") != FORMAT or meta.get("key") != self._keys[caption] or meta.get("caption") != caption:
            return None
        try:
            crcs = json.loads(meta.get("crc32", ""))
        except ValueError:
            return None
        if not header or set(crcs) != set(header):
            return None
        return header, nbytes

    def _load(self, caption: str) -> Entry:
        """The entry from its file, checksums verified. Raises TextCacheError when the data is damaged."""
        from safetensors import safe_open

        path = self.path_for(caption)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                crcs = json.loads(meta.get("crc32", "{}"))
                # Cloned: safe_open's tensors are views of a private mapping of the file, which would count
                # against vm.max_map_count per entry and live on in the page cache, not in the host tier.
                entry = {name: f.get_tensor(name).clone() for name in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as exc:  # any reader error means a damaged entry
            raise TextCacheError(f"text cache entry {path} cannot be read: {exc}") from exc
        if meta.get("key") != self._keys[caption] or set(crcs) != set(entry) or any(
                _crc(t) != crcs[name] for name, t in entry.items()):
            # Removed, so the next build (a restart, or a resume from the last checkpoint) encodes it again.
            with contextlib.suppress(OSError):
                path.unlink()
            raise TextCacheError(f"text cache entry {path} was damaged (checksum mismatch) and has been removed; "
                                 "restart (or resume) to encode it again")
        self.disk_reads += 1
        return entry

    def _write(self, caption: str, entry: Entry) -> None:
        """Atomically: a temporary file in disk_dir, then os.replace into its place (same filesystem)."""
        from safetensors.torch import save_file

        key = self._keys[caption]
        final = self.path_for(caption)
        final.parent.mkdir(parents=True, exist_ok=True)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in entry.items()}
        meta = {"format": FORMAT, "key": key, "caption": caption,
                "crc32": json.dumps({k: _crc(v) for k, v in cpu.items()}, sort_keys=True)}
        # Host and pid in the name: ranks (even on other nodes sharing the folder) may write the same entry.
        tmp = self.disk_dir / f"{_TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{key}"
        try:
            save_file(cpu, str(tmp), metadata=meta)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _sweep_stale_tmp(self) -> None:
        """Temporary files of processes on this host that died mid-write (each leaves at most one)."""
        if self.disk_dir is None or not self.disk_dir.is_dir():
            return
        host = socket.gethostname()
        for f in self.disk_dir.glob(f"{_TMP_PREFIX}{host}-*"):
            try:
                pid = int(f.name[len(_TMP_PREFIX) + len(host) + 1:].split("-", 1)[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                with contextlib.suppress(OSError):
                    f.unlink()

    # -- build ------------------------------------------------------------------------------------------------
    def _decide(self, n: int, per_entry: int) -> None:
        self.bytes_per_entry = per_entry
        self.total_bytes = n * per_entry
        if self.host_budget_bytes is None:
            self.host_budget_bytes = default_host_budget()
        self.placement, self.reason = choose_placement(
            self.total_bytes, device_budget_bytes=self._device_budget(), host_budget_bytes=self.host_budget_bytes,
            to_disk=self.to_disk)
        if self.placement == "disk" and self.disk_dir is None:
            self.placement = None
            if self.to_disk:
                raise TextCacheError("to_disk needs a disk folder")
            raise TextCacheError(f"the text cache needs {self.total_bytes / 1024 ** 2:.1f} MiB ({n} caption(s) x "
                                 f"{per_entry} bytes), more than the host budget of "
                                 f"{self.host_budget_bytes / 1024 ** 2:.1f} MiB, and has no disk folder to spill to")

    def _keep(self, caption: str, entry: Entry) -> None:
        """An entry (from the encoder or a file) into its tier. Host copies are owned (not views of a batch)."""
        if self.placement == "device":
            self._mem[caption] = {k: v.detach().to(self.device) for k, v in entry.items()}
        elif self.placement == "host":
            self._mem[caption] = {k: v.detach().to("cpu").contiguous() for k, v in entry.items()}

    @torch.no_grad()
    def build(self, family, comps, captions: Iterable[str], *, device: torch.device | str, batch_size: int = 16,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Make every distinct caption an entry (reusing disk entries), in chunks of ``batch_size`` through
        ``family.encode_text(comps, chunk, device)``; ``progress(done, total)`` counts reused entries as done.
        May be called again with more captions (placement is then kept). Returns ``plan()``."""
        self.device = torch.device(device)
        report = progress or (lambda done, total: None)
        unique = sorted(set(captions))  # sorted: a chunk's composition does not depend on the dataset's order
        new = [c for c in unique if c not in self._keys]
        for c in new:
            self._keys[c] = _entry_key(self.encoder_key, self.device.type, c)
        total, done = len(unique), len(unique) - len(new)
        self._sweep_stale_tmp()

        on_disk: dict[str, int] = {}  # caption -> bytes, for entries whose file header is whole and theirs
        if self.disk_dir is not None:
            for c in new:
                found = self._valid_header(c)
                if found is not None:
                    on_disk[c] = found[1]
        todo = [c for c in new if c not in on_disk]
        chunks = [todo[i:i + max(1, batch_size)] for i in range(0, len(todo), max(1, batch_size))]
        first: list[tuple[str, Entry]] = []
        if self.placement is None:
            if on_disk:
                per_entry = max(on_disk.values())
            elif chunks:
                first = self._encode(family, comps, chunks.pop(0))
                per_entry = max(sum(t.numel() * t.element_size() for t in e.values()) for _, e in first)
            else:
                per_entry = 0
            self._decide(len(self._keys), per_entry)

        if self.placement == "disk":  # headers only: a step reads (and checksums) the data
            self.hits += len(on_disk)
            self._sizes.update(on_disk)
            done += len(on_disk)
        else:
            redo = []
            for i, c in enumerate(on_disk, 1):
                try:
                    self._keep(c, self._load(c))
                    self._sizes[c] = on_disk[c]
                    self.hits += 1
                    done += 1
                except TextCacheError:  # a damaged entry is simply encoded again
                    redo.append(c)
                if i % 256 == 0:
                    report(done, total)
            chunks += [redo[i:i + max(1, batch_size)] for i in range(0, len(redo), max(1, batch_size))]
        for c, entry in first:
            self._store(c, entry)
        done += len(first)
        report(done, total)
        for chunk in chunks:
            for c, entry in self._encode(family, comps, chunk):
                self._store(c, entry)
            done += len(chunk)
            report(done, total)
        self._recount()
        return self.plan()

    def _encode(self, family, comps, chunk: list[str]) -> list[tuple[str, Entry]]:
        cond = family.encode_text(comps, list(chunk), self.device)
        self.encoded += len(chunk)
        return [(c, {k: v[j].detach().clone() for k, v in cond.items() if v is not None}) for j, c in enumerate(chunk)]

    def _store(self, caption: str, entry: Entry) -> None:
        self._sizes[caption] = sum(t.numel() * t.element_size() for t in entry.values())
        if self.disk_dir is not None and (self.persist or self.placement == "disk"):
            self._write(caption, entry)
        self._keep(caption, entry)

    def _recount(self) -> None:
        self.total_bytes = sum(self._sizes.values())

    # -- steps ------------------------------------------------------------------------------------------------
    def get(self, caption: str) -> Entry:
        """One entry (device tensors for "device", host tensors otherwise)."""
        if caption not in self._keys:
            raise KeyError(f"caption not in the text cache: {caption!r}")
        if self.placement != "disk":
            return self._mem[caption]
        entry = self._lru.get(caption)
        if entry is not None:
            self._lru.move_to_end(caption)
            return entry
        entry = self._load(caption)
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if size <= self.lru_bytes:
            self._lru[caption] = entry
            self._lru_used += size
            while self._lru_used > self.lru_bytes:
                _, old = self._lru.popitem(last=False)
                self._lru_used -= sum(t.numel() * t.element_size() for t in old.values())
        return entry

    def batch(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning of ``captions`` stacked in their order, on the training device."""
        rows = {c: self.get(c) for c in dict.fromkeys(captions)}  # a duplicate is read once
        names = rows[captions[0]].keys()
        out = {}
        for name in names:
            parts = [rows[c][name] for c in captions]
            if self.placement == "device" or self.device.type != "cuda":
                out[name] = torch.stack(parts).to(self.device)
                continue
            # Stacked straight into pinned memory from the caching host allocator: the copy is then asynchronous
            # (from pageable memory it would wait for the GPU to drain), and the block is not reused before the
            # copy has finished.
            staged = torch.empty((len(parts), *parts[0].shape), dtype=parts[0].dtype, pin_memory=True)
            torch.stack(parts, out=staged)
            out[name] = staged.to(self.device, non_blocking=True)
        return out
