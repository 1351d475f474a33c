"""Training data on the torch side: image decoding, bucket geometry, the latent cache (the text cache is
text_cache.py; the epoch plan, a pure function of (seed, epoch), is data/datasets.py's plan_epoch).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import resize_and_crop
# The sample geometry is torch-free (validate-only plans with it); imported from here by the torch side.
from .samples import TrainImage, build_images  # noqa: F401


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white (what a viewer shows)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def load_pixels(img: TrainImage, *, random_crop: bool, rng: random.Random | None, flip: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded, resized, cropped image in [-1, 1] (CHW float32) and SDXL time ids
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    with Image.open(img.path) as raw:
        im = to_rgb(raw)
    bw, bh = img.bucket
    rw, rh, left, top = resize_and_crop(im.width, im.height, (bw, bh), random_crop=random_crop, rng=rng)
    im = im.resize((rw, rh), Image.Resampling.LANCZOS).crop((left, top, left + bw, top + bh))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    time_ids = torch.tensor([img.orig_size[1], img.orig_size[0], top, left, bh, bw], dtype=torch.float32)
    return arr, time_ids


def image_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def decode_failures(images: list[TrainImage], cfg=None) -> list[tuple[TrainImage, str]]:
    """Fully decode every image once (uncached training would otherwise hit a bad one mid-run); a clip's every
    window (data/clips.py, with the run's ``cfg``)."""
    from . import clips

    failed = clips.decode_failures(cfg, [img for img in images if img.is_clip])
    for img in images:
        if img.is_clip:
            continue
        try:
            with Image.open(img.path) as im:
                im.load()
        except Exception as exc:  # noqa: BLE001
            failed.append((img, f"{type(exc).__name__}: {exc}"))
    return failed


def latent_bytes(layout: tuple[int, int], images: list[TrainImage], cfg=None) -> int:
    """The fp32 latents of ``images`` at their buckets (the cache's size); ``layout``: the family's (channels,
    downsampling) (ModelFamily.latent_layout). A clip holds its latent frames for each of its windows (the run's
    ``cfg`` says how many)."""
    from .clips import latent_units, starts

    channels, factor = layout
    return sum(channels * (img.bucket[0] // factor) * (img.bucket[1] // factor) * 4
               * latent_units(img, windows=len(starts(cfg, img))) for img in images)


class LatentCache:
    """VAE latents computed once per image (at its bucket, with its crop fixed at cache time).

    On disk, each entry is keyed by the image bytes, the VAE identity and the geometry, so a rerun reuses
    entries and a changed image (or bucket, or model) is re-encoded.
    """

    def __init__(self, disk_dir: Path | None, model_key: str, *, spill: bool = False):
        """``spill``: keep entries only on disk (``disk_dir``) and read each batch's from there, for a dataset
        whose latents exceed the host memory budget (100,000 FLUX images at 1024 px are 100 GB)."""
        if spill and disk_dir is None:
            raise ValueError("a spilling latent cache needs a disk folder")
        self.disk_dir = disk_dir
        self.model_key = model_key
        self.spill = spill
        self.latents: dict[int, torch.Tensor] = {}
        self.time_ids: dict[int, torch.Tensor] = {}
        self.masks: dict[int, torch.Tensor] = {}  # loss masks on the latent grid (data/masks.py), masked images only
        # Keyed by slot: an image's index, or (index, window) for a clip's window (data/clips.slot).
        self.files: dict = {}  # spill mode: slot -> entry file
        self.hits = 0
        self.encoded = 0

    def _keep(self, index, latents: torch.Tensor, time_ids: torch.Tensor, path: Path | None,
              mask: torch.Tensor | None = None) -> None:
        if self.spill and path is not None:
            self.files[index] = path
        else:
            self.latents[index], self.time_ids[index] = latents, time_ids
            if mask is not None:
                self.masks[index] = mask

    def to(self, device: torch.device) -> None:
        self.latents = {k: v.to(device) for k, v in self.latents.items()}
        self.time_ids = {k: v.to(device) for k, v in self.time_ids.items()}
        self.masks = {k: v.to(device) for k, v in self.masks.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.latents, self.time_ids, self.masks) for t in d.values())

    def place(self, device: torch.device, free_bytes: int) -> str:
        """Where a step finds its latents: on the accelerator when they take at most a tenth of its free memory
        (a step then needs no host-to-device copy, which from pageable memory synchronises the stream), else on
        the host, copied through pinned memory (see batch). An SDXL 1024 px latent is 256 KiB: a tenth of an 80 GiB
        card's free memory holds ~30,000 images. Returns "device" or "host"."""
        if self.spill:
            return "disk"
        if self.nbytes <= free_bytes // 10:
            self.to(device)
            return "device"
        return "host"

    def batch(self, indices: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's latents and time ids on ``device``; ``indices``: the entries' slots (data/clips.slot)."""
        if self.spill:
            from safetensors.torch import load_file

            entries = {i: load_file(self.files[i]) for i in indices}
            tables = ({i: e["latents"] for i, e in entries.items()}, {i: e["time_ids"] for i, e in entries.items()})
        else:
            tables = (self.latents, self.time_ids)
        out = []
        for table in tables:
            x = torch.stack([table[i] for i in indices])
            if x.device.type == "cpu" and device.type == "cuda":
                # Staged through the caching host allocator's pinned memory, the copy is asynchronous; from
                # pageable memory it would wait for the GPU to drain.
                x = x.pin_memory().to(device, non_blocking=True)
            out.append(x.to(device))
        return out[0], out[1]

    def batch_masks(self, indices: list, masks) -> torch.Tensor | None:
        """The batch's loss masks on the latent grid, [B, 1, h, w] (ones for an image without one), or None when no
        image of the batch has a mask; ``masks``: the run's MaskSet (data/masks.py); ``indices``: slots."""
        if masks is None or all(masks.sources.get(_image(i)) is None for i in indices):
            return None
        if self.spill:
            from safetensors import safe_open

            found = {}
            for i in indices:
                if masks.sources.get(_image(i)) is not None:
                    with safe_open(str(self.files[i]), "pt") as f:
                        found[i] = f.get_tensor("mask")  # a few KiB: the latents are not read twice
        else:
            found = self.masks
        shape = next(found[i] for i in indices if i in found).shape[-2:]
        return masks.stack([found.get(i) for i in indices], shape)

    def _key(self, img: TrainImage, seed: int, random_crop: bool, mask: str | None = None,
             clip: list | None = None) -> str:
        parts = [image_digest(img.path), self.model_key, img.bucket, seed if random_crop else None]
        # An unmasked image's entry keeps its old key; a clip window's adds its sampling and start (clips.cache_extra).
        parts += [mask] if mask is not None or clip is not None else []
        payload = json.dumps(parts + [clip] if clip is not None else parts)
        return hashlib.sha256(payload.encode()).hexdigest()[:40]

    def build(self, encode: Callable[[torch.Tensor], torch.Tensor], images: list[TrainImage], *,
              device: torch.device, seed: int, random_crop: bool, batch_size: int,
              progress: Callable[[int, int], None], masks=None, cfg=None) -> list[tuple[TrainImage, str]]:
        """Fill the cache with ``encode(pixels)`` (the family's encode_latents over its VAE); returns the images whose
        pixels failed to decode (they are left out). ``masks``: the run's MaskSet (data/masks.py): each masked
        image's entry also holds its mask, at its latent's crop and grid. A clip (with the run's ``cfg``) has an
        entry per window (data/clips.py)."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        from . import clips

        slots = [(img, w) for img in images for w in (range(len(clips.starts(cfg, img))) if img.is_clip else (None,))]
        todo: list[tuple[TrainImage, int | None, str | None]] = []
        for img, w in slots:
            mkey = masks.key(img.index) if masks is not None else None
            want = {"latents", "time_ids"} | ({"mask"} if mkey is not None else set())
            extra = clips.cache_extra(cfg, img, w) if w is not None else None
            key = self._key(img, seed, random_crop, mkey, extra) if self.disk_dir else None
            path = self.disk_dir / f"{key}.safetensors" if key else None
            at = img.index if w is None else (img.index, w)
            if path is not None and path.is_file():
                try:
                    if self.spill:  # read at step time; here only its header, not 100 GB of latents
                        with safe_open(str(path), "pt") as f:
                            if set(f.keys()) != want:
                                raise ValueError("not a latent cache entry")
                        self._keep(at, None, None, path)
                    else:
                        t = load_file(path)
                        if set(t) != want:
                            raise ValueError("not a latent cache entry")
                        self._keep(at, t["latents"], t["time_ids"], path, t.get("mask"))
                    self.hits += 1
                    continue
                except Exception:  # noqa: BLE001 - a damaged cache entry is simply recomputed
                    pass
            todo.append((img, w, key))
        done = len(slots) - len(todo)
        failed: list[tuple[TrainImage, str]] = []
        progress(done, len(slots))
        by_bucket: dict[tuple[int, ...], list[tuple[TrainImage, int | None, str | None]]] = {}
        for item in todo:
            by_bucket.setdefault((item[0].frames, *item[0].bucket), []).append(item)
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            for i in range(0, len(items), batch_size):
                chunk, pix, tids, pmasks = [], [], [], []
                for img, w, key in items[i:i + batch_size]:
                    try:
                        if any(img is f for f, _ in failed):
                            raise RuntimeError("another window failed to decode")
                        rng = random.Random(f"crop:{seed}:{img.index}")  # one crop for every window of a clip
                        p, t = (clips.load_window(cfg, img, w, random_crop=random_crop, rng=rng) if w is not None
                                else load_pixels(img, random_crop=random_crop, rng=rng))
                        m = masks.pixels(img.index, t) if masks is not None else None
                    except Exception as exc:  # noqa: BLE001 - any decoder error means "skip this image"
                        if not any(img is f for f, _ in failed):
                            failed.append((img, f"{type(exc).__name__}: {exc}"))
                        continue
                    chunk.append((img, w, key))
                    pix.append(p)
                    tids.append(t)
                    pmasks.append(m)
                done += len(items[i:i + batch_size]) - len(chunk)
                if not chunk:
                    continue
                lat = encode(torch.stack(pix)).float().cpu()
                for (img, w, key), latent, tid, m in zip(chunk, lat, tids, pmasks):
                    final = None
                    entry = {"latents": latent.contiguous(), "time_ids": tid}
                    if m is not None:  # to this latent's own grid, whatever the family's VAE factor
                        from .masks import to_grid

                        entry["mask"] = to_grid(m, latent.shape[-2:]).contiguous()
                    if key and self.disk_dir is not None:
                        self.disk_dir.mkdir(parents=True, exist_ok=True)
                        tmp = self.disk_dir / f".{key}.{os.getpid()}.tmp"  # ranks may write the same entry
                        save_file(entry, str(tmp))
                        final = self.disk_dir / f"{key}.safetensors"
                        tmp.replace(final)
                    self._keep(img.index if w is None else (img.index, w), entry["latents"], tid, final,
                               entry.get("mask"))
                    self.encoded += 1
                done += len(chunk)
                progress(done, len(slots))
        bad = {img.index for img, _ in failed}  # a clip with one bad window trains on none of them
        for table in (self.latents, self.time_ids, self.masks, self.files):
            for k in [k for k in table if _image(k) in bad]:
                del table[k]
        return failed


def _image(slot) -> int:
    """The image index of a cache slot (an index, or a clip's (index, window))."""
    return slot[0] if isinstance(slot, tuple) else slot


def model_key(base_model: str, vae, source: Path | str | None = None) -> str:
    """Identity of the latent space, by content: the VAE's class and config, a sampled fingerprint of its loaded
    weights, and its weight files on disk (size, safetensors header hash, mtime) when ``source`` (the model's
    folder or single file) is known. A VAE replaced in the model folder (say a fixed fp16 SDXL VAE: the same
    config, the same tensor names and shapes) then re-encodes instead of reusing stale latents; the path alone
    would not change. Cheap: a few KiB of weights are read, never the files' contents."""
    from .cache_identity import module_identity, weight_files_identity

    files: dict = {}
    if source is not None:
        src = Path(source)
        vae_files = src / "vae" if src.is_dir() else src  # a diffusers folder's vae/, or the single file itself
        if vae_files.exists():
            files = weight_files_identity(vae_files)
            for f in sorted(vae_files.iterdir()) if vae_files.is_dir() else [vae_files]:
                if f.is_file():  # the header hash misses re-saved values of the same shapes: add the mtime
                    files.setdefault(f"mtime/{f.name}", f.stat().st_mtime_ns)
    payload = {"base_model": base_model, "vae": module_identity(vae), "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_latent_cache(cfg, fam, comps, images: list[TrainImage], *, device: torch.device, world: int,
                       source: Path | str | None, events, masks=None) -> tuple[LatentCache, dict, list]:
    """Encode the dataset once with the VAE: (cache, plan, images that failed to decode). The plan says where the
    latents live: on the accelerator when they take at most a tenth of its free memory, in host memory within
    cache_host_budget_gb, else on disk under <output_path>/cache/latents, read per step."""
    from .text_cache import host_budget

    from .masks import mask_bytes

    layout = fam.latent_layout(comps.vae.config)
    total = latent_bytes(layout, images, cfg) + mask_bytes(layout, images, masks.sources if masks is not None else None)
    budget = host_budget(cfg, world)
    # Clips' latents are large (frames x windows): on disk, read per step, unless cache_latents_to_disk says false.
    spill = total > budget or (cfg.cache_latents_to_disk is None and any(img.is_clip for img in images))
    plan = {"placement": "disk" if spill else "host", "total_bytes": total, "host_budget_bytes": budget,
            "reason": f"{total / 2**20:.1f} MiB of latents {'exceed' if total > budget else 'fit'} the host budget of "
                      f"{budget / 2**20:.1f} MiB" + (": read from disk per step" if total > budget else
                                                     ": video clips' latents are read from disk per step" if spill
                                                     else "")}
    events.emit("status", phase="caching_latents", message=f"encoding {len(images)} image(s) with the VAE")
    disk = cfg.output_path / "cache" / "latents" if cfg.cache_latents_to_disk or spill else None
    cache = LatentCache(disk, model_key(cfg.base_model, comps.vae, source), spill=spill)
    comps.vae.to(device)
    failed = cache.build(lambda pix: fam.encode_latents(comps.vae, pix), images, device=device, seed=cfg.seed,
                         random_crop=cfg.random_crop,
                         batch_size=max(1, cfg.batch_size), masks=masks, cfg=cfg,
                         progress=lambda n, t: events.emit("progress", phase="caching_latents", current=n, total=t,
                                                           unit="images"))
    comps.vae.to("cpu")  # not needed again until sampling: the accelerator's memory goes to the denoiser
    if device.type == "cuda":
        plan["placement"] = cache.place(device, torch.cuda.mem_get_info(device)[0])
    events.emit("status", phase="latent_cache", reused=cache.hits, encoded=cache.encoded,
                message=f"latent cache: {cache.hits} reused, {cache.encoded} encoded, {plan['placement']}")
    return cache, plan, failed
