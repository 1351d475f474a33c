"""Generated clips for tests: a square moving over a background whose grey level encodes the frame index (so a
test can tell which source frame was sampled, through lossy codecs), written with PyAV (mp4/webm/mkv, constant or
variable frame rate) or Pillow (animated GIF / WebP), and a broken clip."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

LEVEL_STEP = 8  # grey level per frame index: lossy codecs keep a flat area within a few levels


def frame(i: int, width: int, height: int) -> np.ndarray:
    """Frame ``i``: background grey ``LEVEL_STEP * i`` (mod 256), a white square moving right by 2 px a frame."""
    img = np.full((height, width, 3), (LEVEL_STEP * i) % 256, dtype=np.uint8)
    side = max(2, min(width, height) // 4)
    x = (2 * i) % max(1, width - side)
    img[:side, x:x + side] = 255
    return img


def frame_index(img: np.ndarray) -> int:
    """Which ``frame`` an (un-resized or resized) decoded frame is, from its bottom rows' grey level."""
    level = float(np.median(img[-max(1, img.shape[0] // 4):, :, :]))
    return int(round(level / LEVEL_STEP))


def write_clip(path: str | Path, *, frames: int, fps: float | Fraction, width: int = 48, height: int = 32,
               codec: str = "libx264", durations: list[float] | None = None) -> Path:
    """A clip through PyAV; ``durations`` (seconds per frame) makes it variable-frame-rate (needs mp4/mkv)."""
    import av

    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=rate)
        s.width, s.height = width, height
        s.pix_fmt = "yuv420p"
        if codec == "libx264":
            s.options = {"crf": "10", "preset": "ultrafast", "g": "4"}  # short GOPs: seeking lands mid-clip
        if durations is not None:
            s.codec_context.time_base = Fraction(1, 1000)
            s.time_base = Fraction(1, 1000)
        t = 0.0
        for i in range(frames):
            vf = av.VideoFrame.from_ndarray(frame(i, width, height), format="rgb24")
            if durations is not None:
                vf.pts = int(round(t * 1000))
                vf.time_base = Fraction(1, 1000)
                t += durations[i]
            for packet in s.encode(vf):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return path


def write_animated(path: str | Path, *, frames: int, durations_ms: int | list[int] = 100, width: int = 40,
                   height: int = 24) -> Path:
    """An animated GIF or WebP (by the suffix) through Pillow."""
    from PIL import Image

    path = Path(path)
    images = [Image.fromarray(frame(i, width, height)) for i in range(frames)]
    kwargs = {"lossless": True} if path.suffix.lower() == ".webp" else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations_ms, loop=0, **kwargs)
    return path


def write_broken(path: str | Path, source: str | Path, keep: float = 0.3) -> Path:
    """``source`` cut to its first ``keep`` fraction with the rest of the header garbled: an interrupted copy."""
    data = Path(source).read_bytes()
    cut = bytearray(data[: max(16, int(len(data) * keep))])
    for i in range(8, min(len(cut), 64)):
        cut[i] ^= 0x5A
    Path(path).write_bytes(bytes(cut))
    return Path(path)
