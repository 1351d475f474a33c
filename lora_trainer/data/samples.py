"""A training sample's geometry, torch-free: the TrainImage (an image, or a video clip with its frames) and the
(frames, w, h) it trains at. The trainer (data/datasets.build_run_images) and ``--validate-only``'s step count
(preflight/run.py) build the same TrainImages with this module, so both plan epochs over the same groups.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from .buckets import bucket_finder, make_buckets


@dataclass(frozen=True)
class TrainImage:
    index: int
    path: str | Path  # the scan's str (100,000 Path objects were 1.3 s of a --validate-only); every reader takes both
    rel: str
    folder: str
    caption: str | None
    repeats: int
    orig_size: tuple[int, int]  # (w, h) after EXIF rotation
    bucket: tuple[int, int]  # (w, h) training size
    # Which entry of `datasets` it comes from and that entry's rules (data/datasets.py build_run_images).
    dataset: int = 0
    role: str = "train"
    loss_weight: float = 1.0
    triggers: tuple[str, ...] | None = None  # None: the run's trigger_words; () for a regularisation image
    # A video clip (data/clips.py): the pixel frames it trains at (4k+1, within the token budget; 1 for an image and
    # a one-frame clip) and its duration in seconds (None: an image), from which its windows follow.
    frames: int = 1
    duration: float | None = None

    @property
    def is_clip(self) -> bool:
        return self.duration is not None

    def trigger_words(self, run_triggers: tuple[str, ...]) -> tuple[str, ...]:
        """The trigger words a caption of this image gets: the run's, or its dataset's own (none for regularisation)."""
        return run_triggers if self.triggers is None else self.triggers


@dataclass(frozen=True)
class ClipGeometry:
    """How a family's clips are counted in denoiser tokens: pixels per token side (the variant's: Wan 2.2 TI2V-5B's
    are 32, Wan 2.1's 16) and the VAE's temporal compression (4k + 1 frames -> k + 1 latent frames)."""
    token_pixels: int = 16
    temporal: int = 4

    def tokens(self, frames: int, width: int, height: int) -> int:
        from .video import tokens

        return tokens(frames, width, height, token_pixels=self.token_pixels, temporal=self.temporal)


def clip_geometry(family: str | None, variant: str | None = None) -> ClipGeometry:
    """The family's (and variant's) clip geometry from its spec; the default for an unknown or image family (whose
    datasets hold no clips)."""
    from ..families import SPECS

    spec = SPECS.get(family or "")
    if spec is None or spec.temporal_compression <= 0:
        return ClipGeometry()
    return ClipGeometry(spec.token_pixels_for(variant), spec.temporal_compression)


def build_images(records: Iterable, resolution: int, *, bucketing: bool, min_size: int, max_size: int,
                 token_budget: int | None = None, geometry: ClipGeometry = ClipGeometry()) -> list[TrainImage]:
    """``token_budget``: denoiser tokens a clip's (frames, w, h) bucket may take (data/video.clip_bucket), counted
    with ``geometry``."""
    buckets = make_buckets(resolution, min_size, max_size, 64) if bucketing else [(resolution, resolution)]
    images, nearest = [], bucket_finder(buckets)
    for i, r in enumerate(records):
        w, h = r.width, r.height  # the scan reports the size after EXIF orientation
        bucket = nearest(w, h) if bucketing else (resolution, resolution)
        img = TrainImage(i, r.path, r.rel_path, r.folder, r.caption, r.repeats, (w, h), tuple(bucket))
        clip = getattr(r, "clip", None)  # preflight/video_scan.ClipRecord of a usable clip
        if clip is not None:
            from .video import clip_bucket

            frames, bw, bh = clip_bucket(w, h, clip.train_frames, buckets, token_budget or 1 << 62,
                                         token_pixels=geometry.token_pixels, temporal=geometry.temporal)
            img = replace(img, bucket=(bw, bh), frames=frames, duration=clip.info.duration)
        images.append(img)
    return images


def images_at(cfg: Any, records: Iterable, resolution: int, bucketing: bool, geometry: ClipGeometry
              ) -> list[TrainImage]:
    """``records``' TrainImages at ``resolution`` with the run's bucket range: one dataset's training images
    (data/datasets.build_run_images) and the held-out set's (training/eval_loss.py). A clip's bucket costs at most
    the tokens of video_frames at the resolution's square."""
    from .buckets import bucket_range

    lo, hi = bucket_range(cfg.min_bucket_resolution, cfg.max_bucket_resolution, resolution)
    return build_images(records, resolution, bucketing=bucketing, min_size=lo, max_size=hi,
                        token_budget=geometry.tokens(cfg.video_frames, resolution, resolution), geometry=geometry)
