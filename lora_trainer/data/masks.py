"""Loss masks: where an image's mask comes from, how it follows its image through the bucket resize, crop and flip,
and how it weights the loss on the latent grid. A video clip's mask is one image (mask_path mirror or sidecar, the
clip's stem), cropped as its frames are and applied to every frame ([B, 1, 1, h, w] against [B, C, F, h, w]
latents); alpha_mask does not apply to clips (a video frame has no alpha the scan reads).

A mask is white where the image trains, black where it is ignored, grey in between (weight = value / 255). Sources,
first found wins: a file in ``mask_path`` (a folder mirroring the dataset: same relative folder and stem, any image
extension), a sidecar ``<stem>-masklabel.<ext>`` beside the image (OneTrainer's name), the image's own alpha channel
(``alpha_mask``). The pixel side (finding, reading, geometry) is torch-free so that preflight can use it; the tensor
side imports torch lazily.

Alignment: the mask takes the image's own geometry from its time ids (orig size, crop top/left, bucket), recomputing
the resize with buckets.resize_and_crop, so a random crop or a flip can never pick another window for the mask than
for the pixels, cached or not. It is then area-averaged to the latents' grid (whatever the family's VAE factor): a
latent cell entirely under black averages to exactly 0, so its error, and its gradient, is exactly 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from .buckets import resize_and_crop

ALPHA = "<alpha>"  # the source of a mask read from the image's own alpha channel
SIDECAR_SUFFIX = "-masklabel"
MASK_EXTENSIONS = (".png", ".webp", ".bmp", ".jpg", ".jpeg")  # preferred first when one stem has several
# Modes whose header says "has an alpha channel" (a palette image's transparency is not read: see the README).
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def is_sidecar(stem: str) -> bool:
    """A file named ``<stem>-masklabel.<ext>`` is a mask, never a training image (dataset_scan skips it)."""
    return stem.lower().endswith(SIDECAR_SUFFIX)


def _listing(folder: str, cache: dict) -> dict[str, str]:
    """stem -> file name of a folder's image files (a lower-cased stem too, as captions are matched), listed once."""
    got = cache.get(folder)
    if got is None:
        got = {}
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it if e.is_file() and not e.name.startswith("."))
        except OSError:
            names = []
        rank = {ext: i for i, ext in enumerate(MASK_EXTENSIONS)}
        for name in sorted(names, key=lambda n: rank.get(os.path.splitext(n)[1].lower(), 99)):
            stem, ext = os.path.splitext(name)
            if ext.lower() in rank:
                got.setdefault(stem, name)
                got.setdefault(stem.lower(), name)
        cache[folder] = got
    return got


def find_mask(rel_path: str, image_path: str, mode: str | None, *, mask_root: str | None, alpha: bool,
              cache: dict) -> str | None:
    """The mask source of one image: a file's absolute path, ALPHA, or None (no mask)."""
    rel_dir, name = os.path.split(rel_path)
    stem = os.path.splitext(name)[0]
    if mask_root is not None:
        folder = os.path.join(mask_root, rel_dir)
        listing = _listing(folder, cache)
        found = listing.get(stem) or listing.get(stem.lower())
        if found is not None:
            return os.path.join(folder, found)
    folder = os.path.dirname(image_path)
    listing = _listing(folder, cache)
    found = listing.get(stem + SIDECAR_SUFFIX) or listing.get((stem + SIDECAR_SUFFIX).lower())
    if found is not None:
        return os.path.join(folder, found)
    if alpha and mode in ALPHA_MODES:
        return ALPHA
    return None


def _grey(im: Image.Image) -> Image.Image:
    """A mask file as 8-bit grey: 16-bit and float masks rescaled (convert("L") would clip them to white)."""
    if im.mode in _WIDE:
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    return im.convert("L")


def read_mask(source: str, image_path: str) -> Image.Image:
    """The mask as an 8-bit "L" image, upright (EXIF orientation applied, as to its image)."""
    with Image.open(image_path if source == ALPHA else source) as raw:
        im = ImageOps.exif_transpose(raw)
        if source == ALPHA:
            return im.convert("RGBA").getchannel("A")
        return _grey(im)


def crop_mask(mask: Image.Image, geometry, *, flip: bool):
    """The mask through its image's resize, crop and flip: uint8 [bucket_h, bucket_w]. ``geometry``: the image's
    time ids (orig_h, orig_w, crop_top, crop_left, bucket_h, bucket_w), as load_pixels returns them."""
    oh, ow, top, left, bh, bw = (int(v) for v in geometry)
    rw, rh, _, _ = resize_and_crop(ow, oh, (bw, bh))  # the resize does not depend on the crop's position
    # BOX: an area average, so a region black at full size stays exactly 0 after shrinking (no ringing as LANCZOS).
    mask = mask.resize((rw, rh), Image.Resampling.BOX).crop((left, top, left + bw, top + bh))
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    import numpy as np

    return np.asarray(mask, dtype=np.uint8)


def mask_key(source: str | None) -> str | None:
    """What a mask contributes to its latent cache entry's key: the file's content (a repainted mask re-caches), or
    the alpha marker (the alpha is part of the image bytes already keyed). None: the entry has no mask."""
    if source is None:
        return None
    if source == ALPHA:
        return "mask:alpha"
    import hashlib

    with open(source, "rb") as fh:
        return "mask:" + hashlib.file_digest(fh, "sha256").hexdigest()


# ------------------------------------------------------------------------------------------------- torch side

@dataclass(frozen=True)
class MaskSet:
    """A run's masks: image index -> source (None: trains unmasked), and how they weight the loss."""

    sources: dict[int, str | None]
    image_paths: dict[int, str]
    min_value: float = 0.0
    normalize: bool = True

    @classmethod
    def for_run(cls, cfg: Any, scan: Any, images: list) -> "MaskSet | None":
        if not getattr(cfg, "masked_loss", False):
            return None
        # A `datasets` run (preflight/datasets.MultiScan): each entry's own audit, its images told apart by dataset.
        scans = [s for _, s in scan.entries] if getattr(scan, "entries", None) else [scan]
        by_rel = {(d, rel): src for d, s in enumerate(scans)
                  for rel, src in (s.masks.sources.items() if getattr(s, "masks", None) is not None else ())}
        return cls(sources={img.index: by_rel.get((img.dataset, img.rel)) for img in images},
                   image_paths={img.index: str(img.path) for img in images},
                   min_value=float(cfg.mask_min_value), normalize=bool(cfg.mask_normalize))

    def key(self, index: int) -> str | None:
        return mask_key(self.sources.get(index))

    def pixels(self, index: int, geometry, *, flip: bool = False):
        """The image's mask at its bucket size, float32 [1, bucket_h, bucket_w] in [0, 1]; None when it has none."""
        import torch

        source = self.sources.get(index)
        if source is None:
            return None
        arr = crop_mask(read_mask(source, self.image_paths[index]), geometry, flip=flip)
        return torch.from_numpy(arr.copy()).float().div_(255.0).unsqueeze(0)

    def stack(self, masks: list, shape) -> "Any | None":
        """[B, 1, h, w] masks on the latent grid ``shape`` (unmasked images: ones); None when no image has one."""
        import torch

        if all(m is None for m in masks):
            return None
        ref = next(m for m in masks if m is not None)
        return torch.stack([to_grid(m, shape) if m is not None else torch.ones((1, *shape), dtype=ref.dtype,
                                                                               device=ref.device) for m in masks])

    def weights(self, masks, latents):
        """The objective's LossWeights for a batch: masks [B, 1, h, w], or a list of per-image masks (None: no
        mask), to the latents' grid, floored at mask_min_value, divided by each sample's mean when mask_normalize;
        None when no image of the batch has a mask."""
        import torch

        from ..objectives.ddpm import LossWeights

        if isinstance(masks, list):
            masks = self.stack(masks, latents.shape[-2:])
        if masks is None:
            return None
        m = to_grid(masks.to(latents.device, torch.float32), latents.shape[-2:])
        if latents.ndim == 5 and m.ndim == 4:  # a clip's one mask, [B, 1, h, w], weights each of its latent frames
            m = m.unsqueeze(2)
        if self.min_value > 0:
            m = m.clamp(min=self.min_value)
        if self.normalize:
            # Each sample's weights average 1, so an image with a small mask trains as strongly as a full one.
            # clamp_min: an all-black mask stays all zeros (and a zero loss), not NaN; no host sync either way.
            m = m / m.mean(dim=tuple(range(1, m.ndim)), keepdim=True).clamp_min(1e-12)
        return LossWeights(elements=m)


def loss_weights(masks: MaskSet | None, batch_masks, latents):
    """The trainer's one call: the batch's LossWeights, or None for a run without masked_loss."""
    return masks.weights(batch_masks, latents) if masks is not None else None


def to_grid(mask, shape):
    """Area-average a mask [..., H, W] to ``shape`` (h, w): each latent cell gets the mean of the pixels it covers."""
    import torch.nn.functional as F

    shape = tuple(int(s) for s in shape)
    if tuple(mask.shape[-2:]) == shape:
        return mask
    lead = mask.shape[:-2]
    out = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=shape, mode="area")
    return out.reshape(*lead, *shape)


def mask_bytes(layout: tuple[int, int], images: list, sources: dict | None) -> int:
    """The fp32 latent-grid masks the latent cache keeps beside the latents (one channel each)."""
    if not sources:
        return 0
    _, factor = layout
    return sum((img.bucket[0] // factor) * (img.bucket[1] // factor) * 4 for img in images
               if sources.get(img.index) is not None)
