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

Only torch and safetensors are needed here; nothing imports the trainer (build_run_cache takes what it needs).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

# Re-exported: the cache's public API (the trainer and preflight import them from here).
from .cache_identity import (DEFAULT_DEVICE_FRACTION, DEFAULT_HOST_CAP, DEFAULT_HOST_FRACTION, FORMAT,  # noqa: F401
                             GIB, available_host_bytes, choose_placement, default_host_budget, encoder_identity,
                             estimate_bytes_per_entry, weight_files_identity)

DEFAULT_LRU_BYTES = 256 * 1024 ** 2
_MAX_HEADER = 16 * 1024 ** 2  # a sane bound for an entry's safetensors header (real ones are < 1 KiB)
_TMP_PREFIX = ".tmp-"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
# Config keys that say where/when a model was saved, not what it computes.
class TextCacheError(RuntimeError):
    """A text-cache entry cannot be served (no disk folder for a cache that needs one, a damaged file at step time)."""


# ------------------------------------------------------------------------------------------------ identity
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
    payload = json.dumps(["lora_trainer.data.text_cache", FORMAT, encoder_key, device_type, caption], ensure_ascii=False)
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
        row = getattr(family, "text_cache_row", dict)  # a family may trim its rows (ModelFamily.text_cache_row)
        return [(c, dict(row({k: v[j].detach().clone() for k, v in cond.items() if v is not None})))
                for j, c in enumerate(chunk)]

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
            if len({p.shape for p in parts}) > 1:
                # A family that stores variable-length rows (only the real tokens: Ideogram 4's 53,248-wide
                # features) gets them zero-padded at the end of the first axis to the batch's longest.
                longest = max(p.shape[0] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 1) + (0, longest - p.shape[0]))
                         for p in parts]
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


def host_budget(cfg, world: int) -> int:
    """Bytes of host memory one cache may hold in this process: cache_host_budget_gb, else the default share."""
    if cfg.cache_host_budget_gb is not None:
        return int(cfg.cache_host_budget_gb * GIB)
    return default_host_budget(share=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def build_run_cache(cfg, family, comps, images, *, device: torch.device, world: int, source: Path | None,
                    events) -> TextCache:
    """The training run's cache: every image's built caption, "" with caption dropout, and (for families that
    sample from cached embeddings) the validation prompts and CFG's empty negative, after which the text encoders
    are dropped from ``comps``. Emits the ``text_cache`` status event."""
    import gc

    from .captions import build_caption
    from .captions import prompts_for

    # The trigger words each step's caption gets (none for a regularisation image), as training/batch.py builds it.
    captions = [build_caption(i.caption, i.trigger_words(cfg.trigger_words), prepend=cfg.prepend_trigger_words)
                for i in images]
    if cfg.caption_dropout_rate > 0:
        captions.append("")
    if family.samples_from_cache and cfg.validation_steps:  # sampling then needs no text encoder either
        captions += prompts_for(cfg) + ([""] if family.sample_negative_prompt else [])
    if source is not None and source.is_dir():
        files = weight_files_identity(*(source / n for n in comps.text_encoders if (source / n).is_dir()))
    else:
        files = weight_files_identity(source) if source is not None else {}
    # Always given the folder: a cache too large for memory spills to disk without a setting.
    cache = TextCache(
        encoder_identity(family, comps, {"weight_files": files}),
        disk_dir=cfg.output_path / "cache" / "text_embeddings", persist=cfg.cache_text_embeddings_to_disk,
        free_device_bytes=torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None,
        host_budget_bytes=host_budget(cfg, world))
    plan = cache.build(family, comps, captions, device=device, batch_size=16,
                       progress=lambda n, t: events.emit("progress", phase="caching_text", current=n, total=t,
                                                         unit="captions"))
    if family.samples_from_cache:
        comps.text_encoders.clear()  # every caption and prompt is cached: nothing encodes text again
        gc.collect()
    events.emit("status", phase="text_cache", reused=plan["hits"], encoded=plan["encoded"],
                message=f"text cache: {plan['entries']} caption(s), {plan['total_bytes'] / 1024 ** 2:.1f} MiB on "
                        f"{plan['placement']}; {plan['hits']} reused, {plan['encoded']} encoded"
                        + ("; text encoders released" if family.samples_from_cache else ""))
    return cache
