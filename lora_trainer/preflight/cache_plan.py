"""How much memory the caches may use and where a cache of a given size goes. Torch-free: the trainer's caches
(text_cache.py, data.LatentCache) and ``--validate-only``'s plan use the same numbers."""
from __future__ import annotations

import os
from pathlib import Path

from ..families import SPECS
from .video_plan import latent_frames, windows

GIB = 1024 ** 3
DEFAULT_DEVICE_FRACTION = 0.1
DEFAULT_HOST_FRACTION = 0.25
DEFAULT_HOST_CAP = 16 * GIB


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


def local_processes() -> int:
    """This run's processes on this machine: LOCAL_WORLD_SIZE (accelerate launch / torchrun set it), else WORLD_SIZE
    (one machine), else 1. Each holds its own caches and pins its own copy of the streamed blocks."""
    for key in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        try:
            n = int(os.environ.get(key, ""))
        except ValueError:
            continue
        if n >= 1:
            return n
    return 1


def default_host_budget(fraction: float = DEFAULT_HOST_FRACTION, cap: int = DEFAULT_HOST_CAP, share: int = 1) -> int:
    """``fraction`` of the available RAM, at most ``cap``, divided by ``share`` (the processes on this machine:
    each rank holds its own cache). 2 GiB / share when the available memory is unknown."""
    avail = available_host_bytes()
    budget = min(cap, 2 * GIB) if avail is None else min(cap, int(avail * fraction))
    return budget // max(1, share)


def estimate_bytes_per_entry(family: str, *, max_sequence_length: int | None = None, dtype_bytes: int = 2) -> int:
    """An entry's size for the real models, from the family's text-cache shapes alone (for preflight, before
    anything is loaded); a T5 sequence takes the family's default length (spec.max_sequence_length) unless given."""
    spec = SPECS.get(family)
    if spec is None:
        raise ValueError(f"unknown family {family!r}")
    length = max_sequence_length or spec.max_sequence_length.get(None, 0)
    return spec.text_entry.elements(length) * dtype_bytes


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


VAE_SCALE = 8  # the spatial downsampling assumed where the VAE's config cannot be read


def vae_config_of(model: str | Path | None) -> dict | None:
    """A diffusers model folder's vae/config.json; None for a single file, a hub id not downloaded, or no VAE."""
    import json

    try:
        return json.loads((Path(model) / "vae" / "config.json").read_text(encoding="utf-8")) if model else None
    except (OSError, ValueError):
        return None


def latent_layout(spec, vae_config: dict | None) -> tuple[int, int]:
    """(channels, spatial downsampling) of a latent as the cache holds it, from the VAE's config.json, torch-free:
    what the families' ``latent_layout`` read from the loaded VAE (Wan 2.2 TI2V-5B: 48 channels at 16x; Wan 2.1: 16
    at 8x). A family that patchifies (FLUX.2's 4x the channels at twice the downsampling) keeps the bytes per pixel,
    which is what the plan counts. Without a config (a single file): the spec's channels at 8x."""
    cfg = vae_config or {}
    channels = int(cfg.get("z_dim") or cfg.get("latent_channels") or spec.latent_channels)
    if cfg.get("scale_factor_spatial"):
        scale = int(cfg["scale_factor_spatial"])
    elif cfg.get("temperal_downsample"):  # the causal 3-D VAEs (Qwen-Image's, Wan's): a 2x stage per entry
        scale = 2 ** len(cfg["temperal_downsample"])
    elif cfg.get("block_out_channels"):
        scale = 2 ** (len(cfg["block_out_channels"]) - 1)
    else:
        scale = VAE_SCALE
    return channels, scale


def _latent_placement(total: int, host_budget: int, device_budget: int | None) -> str:
    """The trainer's rule (data/images.py): over the host budget the latents stay on disk and are read per step;
    otherwise they move to the accelerator when they fit its budget, else stay in host memory."""
    if total > host_budget:
        return "disk"
    return "device" if device_budget is not None and total <= device_budget else "host"


def plan_caches(cfg, family: str | None, shapes: list[tuple[int, ...]], captions: list[str], *,
                device_free_bytes: int | None = None, vae_config: dict | None = None) -> dict | None:
    """What ``--validate-only`` expects the two caches to hold and where, before any model is loaded: ``shapes``
    are the training sizes (buckets) of the usable images, (w, h) or, for a video family's clips, (w, h, frames),
    ``captions`` the built captions. A clip's entry is its latent frames (temporal_compression) and is cached once
    per window (video_windows: each epoch's start may differ); the latents report the clips and latent frames. Entries are counted as
    the trainer counts them (distinct captions, plus "" with caption dropout) at bf16 (fp32 on the CPU doubles the
    text figure). The host budget is this process's share (local_processes). With ``device_free_bytes`` (the GPU's
    free memory) a cache that fits a tenth of it goes to the GPU, as the trainer decides with the free memory it
    measures before the denoiser arrives (less than this, so the plan never misses a cache that lands there).
    ``vae_config``: the model's VAE config.json, for the latents' channels and downsampling (latent_layout)."""
    spec = SPECS.get(family or "")
    if spec is None:
        return None
    budget = int(cfg.cache_host_budget_gb * GIB) if cfg.cache_host_budget_gb is not None \
        else default_host_budget(share=local_processes())
    device_budget = None if device_free_bytes is None else int(device_free_bytes * DEFAULT_DEVICE_FRACTION)
    out: dict = {"host_budget_bytes": budget, "device_budget_bytes": device_budget}
    if cfg.cache_latents:
        # masked_loss: each entry also holds its mask, one fp32 channel on the latent grid (counted for every image)
        channels, scale = latent_layout(spec, vae_config)
        channels += 1 if getattr(cfg, "masked_loss", False) else 0
        frames = [_latent_frames(s, spec.temporal_compression, cfg) for s in shapes]
        total = sum(channels * f * (s[0] // scale) * (s[1] // scale) * 4 for s, f in zip(shapes, frames))
        clips = any(len(s) > 2 and s[2] > 1 for s in shapes)
        # Clips' latents (frames x windows) stay on disk, read per step, unless cache_latents_to_disk says false
        # (data/images.py, the trainer's rule).
        disk = clips and getattr(cfg, "cache_latents_to_disk", False) is None
        out["latents"] = {"total_bytes": total,
                          "placement": "disk" if disk else _latent_placement(total, budget, device_budget)}
        if spec.temporal_compression > 0:
            out["latents"].update(clips=sum(1 for s in shapes if len(s) > 2 and s[2] > 1),
                                  latent_frames=sum(frames), windows=windows(cfg))
    if cfg.cache_text_embeddings and not cfg.train_text_encoder and not cfg.shuffle_tags:
        entries = len(set(captions) | ({""} if cfg.caption_dropout_rate > 0 else set()))
        per = estimate_bytes_per_entry(family, max_sequence_length=cfg.max_sequence_length)
        placement, why = choose_placement(entries * per, device_budget_bytes=device_budget, host_budget_bytes=budget,
                                          to_disk=False)
        out["text"] = {"entries": entries, "bytes_per_entry": per, "total_bytes": entries * per,
                       "placement": placement, "reason": why}
    return out


def _latent_frames(shape: tuple[int, ...], temporal: int, cfg) -> int:
    """Latent frames one entry caches: a clip's (4k + 1 frames -> k + 1) times its windows; 1 for an image."""
    frames = shape[2] if len(shape) > 2 else 1
    if temporal <= 0 or frames <= 1:
        return 1
    return latent_frames(frames, temporal) * windows(cfg)


def device_cache_bytes(caches: dict | None, latent_scale: float = 1.0) -> dict:
    """Bytes of each cache that stay on the accelerator for the whole run, from plan_caches' figures;
    ``latent_scale``: the latents at another resolution (the area ratio: buckets scale with it), for the memory
    plan's hints, which may move a cache onto the card by shrinking it."""
    out = {"latents": 0, "text": 0}
    if not caches or caches.get("device_budget_bytes") is None:
        return out
    device, host = caches["device_budget_bytes"], caches["host_budget_bytes"]
    if caches.get("latents"):
        lat = caches["latents"]
        total = int(lat["total_bytes"] * latent_scale)
        pinned = lat.get("clips") and lat["placement"] == "disk"  # clips' default: on disk at any size
        out["latents"] = total if not pinned and _latent_placement(total, host, device) == "device" else 0
    if caches.get("text"):
        total = caches["text"]["total_bytes"]
        out["text"] = total if choose_placement(total, device_budget_bytes=device, host_budget_bytes=host)[0] == \
            "device" else 0
    return out
