"""Aspect-ratio buckets: which (width, height) shape each image is trained at, and how it is cropped.

Pure arithmetic (no PIL, no numpy) so that ``--validate-only`` can print the bucket plan for a large
dataset instantly, and so that the trainer and the preflight can never disagree about an image's shape:
both call these functions.

Bucket shapes follow kohya sd-scripts' ``make_bucket_resolutions``: a pixel budget of resolution**2,
sides stepped by 64 between min_size and max_size, every shape as large as the budget allows, plus the
square. Unlike sd-scripts, a shape whose short side would fall below min_size is dropped rather than
kept (sd-scripts only bounds the long side), and images are matched by log aspect-ratio error, which
treats 2:1 and 1:2 symmetrically (a plain ratio difference favours portrait buckets).
"""
from __future__ import annotations

import functools
import math
import random
from collections import Counter
from typing import Iterable, Sequence

Shape = tuple[int, int]  # (width, height)
DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 256, 2048


def bucket_range(min_size: int | None, max_size: int | None, resolution: int) -> tuple[int, int]:
    """The bucket side range, from the config's min/max_bucket_resolution. An unset bound is a default that follows
    the explicit values: 256-2048 widened to hold the resolution (a 64 px run needs no min spelled out) and never
    crossing the other bound; only two explicit bounds, or an explicit bound and resolution, can conflict."""
    lo = min_size if min_size is not None else min(DEFAULT_MIN_SIZE, resolution,
                                                   max_size if max_size is not None else resolution)
    hi = max_size if max_size is not None else max(DEFAULT_MAX_SIZE, resolution, lo)
    return lo, hi


def make_buckets(resolution: int, min_size: int = 256, max_size: int = 2048, step: int = 64) -> list[Shape]:
    """Bucket shapes (w, h), sorted, each with area <= resolution**2 and sides multiples of step in [min_size, max_size]."""
    if resolution <= 0 or step <= 0:
        raise ValueError("resolution and step must be positive")
    # Work in step-sized cells: the budget is measured in cells so every side stays a multiple of step.
    lo = -(-min_size // step) * step  # round min_size up to the grid
    hi = max_size // step * step
    if lo > hi:
        raise ValueError(f"no multiple of {step} lies between min_size {min_size} and max_size {max_size}")
    max_cells = (resolution // step) ** 2
    if max_cells == 0:
        raise ValueError(f"resolution {resolution} is smaller than the step {step}")
    shapes: set[Shape] = set()
    side = math.isqrt(max_cells) * step
    if lo <= side <= hi:
        shapes.add((side, side))
    width = lo
    while width <= hi:
        height = min(hi, (max_cells // (width // step)) * step)
        if height >= lo:
            shapes.add((width, height))
            shapes.add((height, width))
        width += step
    if not shapes:
        raise ValueError(f"no bucket fits resolution {resolution} within [{min_size}, {max_size}]")
    return sorted(shapes)


def nearest_bucket(width: int, height: int, buckets: Sequence[Shape]) -> Shape:
    """The bucket whose aspect ratio is closest to the image's (log-ratio error); ties go to the larger area."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets")
    # Memoised: a 100,000-image dataset has a few hundred distinct sizes, and the search over ~40 buckets cost 60 us
    # per call, twice per image (too-small check and bucket plan): 12 s of a --validate-only.
    return _nearest(width, height, tuple(map(tuple, buckets)))


def bucket_finder(buckets: Sequence[Shape]):
    """nearest_bucket over one bucket list, for a loop over many images: the list is frozen once and each distinct
    size looked up once (converting the list on every call was 0.7 s of a 100,000-image --validate-only)."""
    frozen, memo = tuple(map(tuple, buckets)), {}

    def find(width: int, height: int) -> Shape:
        found = memo.get((width, height))
        if found is None:
            found = memo[(width, height)] = nearest_bucket(width, height, frozen)
        return found
    return find


@functools.lru_cache(maxsize=65536)
def _nearest(width: int, height: int, buckets: tuple[Shape, ...]) -> Shape:
    target = math.log(width / height)
    # Rounded error so that float noise cannot break a tie differently on another machine.
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 12), -b[0] * b[1], b))


def resize_and_crop(width: int, height: int, bucket: Shape, *, random_crop: bool = False,
                    rng: random.Random | None = None) -> tuple[int, int, int, int]:
    """(resized_w, resized_h, crop_left, crop_top): scale to cover the bucket, then crop it out.

    The resized size never falls below the bucket even after rounding, so the crop is always in bounds.
    crop_left/crop_top are in resized pixels: exactly what SDXL's crop_coords_top_left conditioning wants.
    """
    bw, bh = bucket
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = max(bw / width, bh / height)
    rw = max(bw, int(width * scale + 0.5))
    rh = max(bh, int(height * scale + 0.5))
    if random_crop:
        r = rng if rng is not None else random.Random()
        # Always two draws, even when an axis has no slack, so the stream position does not depend on size.
        left = r.randint(0, rw - bw)
        top = r.randint(0, rh - bh)
    else:
        left = (rw - bw) // 2
        top = (rh - bh) // 2
    return rw, rh, left, top


def square_plan(resolution: int) -> list[Shape]:
    """The single 'bucket' used when bucketing is off: shorter side resized to resolution, center square crop.

    Returned as a one-element bucket list so callers treat both modes alike: resize_and_crop with this
    square scales the shorter side to resolution and crops the center.
    """
    if resolution <= 0:
        raise ValueError("resolution must be positive")
    return [(resolution, resolution)]


def upscale_factor(width: int, height: int, bucket: Shape) -> float:
    """How much an image must be enlarged to cover its bucket (<= 1.0 means it is only shrunk)."""
    return max(bucket[0] / width, bucket[1] / height)


def bucket_plan(records: Iterable, buckets: Sequence[Shape], batch_size: int) -> dict:
    """Images, samples (repeats counted) and batches per bucket.

    ``records`` are objects with ``width``, ``height`` and optionally ``repeats`` (default 1), or
    (width, height[, repeats]) tuples, or built training samples (data/samples.TrainImage: their ``bucket`` and,
    for a clip, ``frames``). Batches never mix buckets (nor a clip's frame counts: a row per (w, h, frames), with
    ``frames`` where it is a clip's) and nothing is dropped: each bucket's last batch may be partial, as the trainer
    does.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    images: Counter = Counter()
    samples: Counter = Counter()
    nearest = bucket_finder(buckets)
    for rec in records:
        if isinstance(rec, tuple):
            shape, reps = nearest(rec[0], rec[1]), rec[2] if len(rec) > 2 else 1
        elif hasattr(rec, "bucket"):  # a TrainImage: bucketed already
            shape, reps = rec.bucket, rec.repeats
        else:
            shape, reps = nearest(rec.width, rec.height), getattr(rec, "repeats", 1)
        b = (*shape, getattr(rec, "frames", 1))
        images[b] += 1
        samples[b] += reps
    rows = []
    for b in sorted(images):
        rows.append({"width": b[0], "height": b[1], **({"frames": b[2]} if b[2] > 1 else {}), "images": images[b],
                     "samples": samples[b], "batches": -(-samples[b] // batch_size)})
    return {
        "num_buckets": len(buckets),
        "used_buckets": len({b[:2] for b in images}),
        "batch_size": batch_size,
        "total_images": sum(images.values()),
        "total_samples": sum(samples.values()),
        "total_batches": sum(r["batches"] for r in rows),
        "buckets": rows,
    }
