"""A video clip as a training sample: its windows, which one an epoch trains, and its pixels.

A clip (TrainImage.is_clip) trains at ``TrainImage.frames`` pixel frames (4k+1, its bucket's) sampled at
``video_fps``, on one of a fixed set of windows (data/video.window_starts: ``video_windows`` starts spread over the
slack); ``video_start`` picks the epoch's (data/video.window_index). The set is known before training, so the latent
cache encodes each window once and the batch reads the epoch's entry: a cached run trains exactly the windows an
uncached one decodes, and a resume rebuilds them from (seed, epoch, clip) alone.

Pixels: [3, F, H, W] in [-1, 1], one resize and crop for every frame (the image rules: buckets.resize_and_crop, the
same rng draws), with the image's geometry (orig h/w, crop top/left, bucket h/w) that masks follow. A one-frame clip
loads as an image, [3, H, W], so it stacks, encodes and caches as one.
"""
from __future__ import annotations

import random
from typing import Any

from . import video as V


def starts(cfg: Any, img) -> list[float]:
    """The clip's window starts (seconds); [0.0] for an image."""
    if not img.is_clip:
        return [0.0]
    return V.window_starts(img.duration, cfg.video_fps, img.frames, windows=cfg.video_windows, start=cfg.video_start)


def window(cfg: Any, img, epoch: int) -> int:
    """Which of the clip's windows epoch ``epoch`` trains (0 for an image)."""
    if not img.is_clip:
        return 0
    return V.window_index(len(starts(cfg, img)), start=cfg.video_start, epoch=epoch, seed=cfg.seed, key=img.rel)


def slot(cfg: Any, img, epoch: int):
    """The latent cache's entry for ``img`` in ``epoch``: its index (an image), (index, window) for a clip."""
    return (img.index, window(cfg, img, epoch)) if img.is_clip else img.index


def load_window(cfg: Any, img, index: int, *, random_crop: bool, rng: random.Random | None, flip: bool = False):
    """(pixels, geometry) of window ``index`` of a clip: [3, F, H, W] ([3, H, W] when F is 1) and the image-style
    time ids (orig_h, orig_w, crop_top, crop_left, bucket_h, bucket_w). Raises on a clip that does not decode."""
    import torch

    t0 = starts(cfg, img)[index]
    frames = V.read_frames(img.path, V.sample_times(img.duration, cfg.video_fps, img.frames, t0))
    pix, (left, top) = V.to_tensor(frames, img.bucket, random_crop=random_crop, rng=rng, flip=flip, with_crop=True)
    if pix.shape[1] == 1:
        pix = pix[:, 0]
    bw, bh = img.bucket
    return pix, torch.tensor([img.orig_size[1], img.orig_size[0], top, left, bh, bw], dtype=torch.float32)


def cache_extra(cfg: Any, img, index: int) -> list:
    """What a clip window's latent cache key adds to an image's: the sampling settings and the window's start."""
    return [cfg.video_fps, img.frames, round(starts(cfg, img)[index], 6), cfg.video_short_clip]


def latent_units(img, temporal: int = 4, windows: int = 1) -> int:
    """Latent frames the cache holds for ``img``: latent frames x windows (1 for an image)."""
    return V.latent_frames(img.frames, temporal) * windows if img.is_clip else 1


def decode_failures(cfg: Any, clips: list) -> list[tuple[Any, str]]:
    """Every window of every clip decoded once, as images are fully decoded before an uncached run: a clip whose
    middle is corrupt is skipped now, not met mid-run."""
    failed = []
    for img in clips:
        try:
            for i, t0 in enumerate(starts(cfg, img)):
                V.read_frames(img.path, V.sample_times(img.duration, cfg.video_fps, img.frames, t0))
        except Exception as exc:  # noqa: BLE001 - any decoder error means "skip this clip"
            failed.append((img, f"{type(exc).__name__}: {exc}"))
    return failed
