"""Identities and budgets for the text-embedding cache (text_cache.py): who encoded an entry (configs, sampled
weights, tokenizers, weight-file headers; never the gigabytes themselves), how much memory may hold it, and where
a cache of a given size goes. The latent cache's VAE identity (data.model_key) is built from the same parts."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

FORMAT = "1"  # bump when the entry layout or the key derivation changes: old files then simply miss
# Budgets and placement are torch-free (preflight plans the caches too); re-exported here for the cache's users.
from ..preflight.cache_plan import (DEFAULT_DEVICE_FRACTION, DEFAULT_HOST_CAP, DEFAULT_HOST_FRACTION, GIB,  # noqa: E402,F401
                         available_host_bytes, choose_placement, default_host_budget, estimate_bytes_per_entry)

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "_diffusers_version", "_commit_hash",
                         "dtype", "torch_dtype", "_use_default_values"}


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
        for part, t in _plain_parts(name, p.detach()):
            if t.device.type == "meta" or not t.is_contiguous():
                h.update(f"{part}:{tuple(t.shape)}:{t.dtype}:unsampled".encode())
                continue
            flat = t.reshape(-1)
            step = max(1, flat.numel() // samples)
            sample = flat[::step][:samples].to("cpu").contiguous()
            h.update(f"{part}:{tuple(t.shape)}:{t.dtype}:".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes())
    out["samples_sha256"] = h.hexdigest()
    return out


def _plain_parts(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A weight as plain tensors: itself, or a tensor subclass's inner tensors (torchao's int8 weights are
    qdata / scale / zero_point and implement no reshape or view), via the subclass protocol torch.compile uses."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return [(name, t)]
    inner, _ = t.__tensor_flatten__()
    return [part for attr in inner for part in _plain_parts(f"{name}.{attr}", getattr(t, attr))]


def module_identity(module) -> dict:
    """Class, config (without its save path and versions) and sampled weight fingerprint of a loaded module: what
    data.model_key keys the latent cache by (the VAE)."""
    return {"class": f"{type(module).__module__}.{type(module).__qualname__}", "config": _config_dict(module),
            "weights": _weight_fingerprint(module)}


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


# ------------------------------------------------------------------------------------------------ entry files
