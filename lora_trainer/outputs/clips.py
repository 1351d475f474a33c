"""Sample clips: a video family's sample is a clip (a list of PIL frames). It is saved twice: as a file that plays
(H.264 mp4 through PyAV, or animated WebP through Pillow: ``validation_video_format``) and as a frame grid PNG, a few
frames side by side, which everything written for images (the step's grid.png, samples_over_steps.png, the model
card, the dashboards) shows unchanged.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Any

GRID_FRAMES = 5  # first, last and three between: enough to see motion, small enough for a report cell
FORMATS = ("mp4", "webp")


def clip_of(result: Any) -> list | None:
    """The clip a pipeline call returned (its ``frames``, first video), or None for an image pipeline or a one-frame
    clip (an image: a video file of one frame would show nothing more than the PNG)."""
    frames = getattr(result, "frames", None)
    if frames is None or len(frames) == 0:
        return None
    clip = list(frames[0])
    return clip if len(clip) > 1 else None


def grid_indices(n: int, count: int = GRID_FRAMES) -> list[int]:
    """``count`` frame indices spread evenly over ``n`` frames, first and last included."""
    k = min(count, n)
    return [round(i * (n - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]


def frame_grid(frames: list, count: int = GRID_FRAMES):
    """``count`` frames of a clip (grid_indices) side by side as one RGB image."""
    from PIL import Image

    picked = [frames[i] for i in grid_indices(len(frames), count)]
    w, h = picked[0].size
    grid = Image.new("RGB", (w * len(picked), h))
    for i, f in enumerate(picked):
        grid.paste(f.convert("RGB"), (i * w, 0))
    return grid


def _mp4(frames: list, path: Path, fps: float) -> None:
    import av

    # yuv420p (what browsers and players decode) halves chroma: both sides must be even. Samples are multiples of 8
    # px, so this crops nothing in practice; an odd side loses its last pixel row / column.
    w, h = frames[0].width // 2 * 2, frames[0].height // 2 * 2
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # One thread: x264's output then depends on nothing but the frames (the same seed gives the same bytes).
        stream.options = {"crf": "18", "preset": "medium", "threads": "1"}
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB").crop((0, 0, w, h)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _webp(frames: list, path: Path, fps: float) -> None:
    first, *rest = [f.convert("RGB") for f in frames]
    first.save(path, format="WEBP", save_all=True, append_images=rest, duration=max(1, round(1000 / fps)), loop=0,
               quality=90, method=4)


def write_clip(frames: list, path: Path, fps: float) -> None:
    """Write ``frames`` as the clip ``path`` names (.mp4 or .webp), playing at ``fps``, atomically (a reader never
    sees half a file)."""
    fmt = path.suffix.lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"unknown clip format {fmt!r}: {FORMATS}")
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the muxer picks nothing from the name, Pillow does
    (_mp4 if fmt == "mp4" else _webp)(frames, tmp, fps)
    os.replace(tmp, path)
