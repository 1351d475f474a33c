"""Toy image/caption datasets for tests, the demo and benchmarks (``python -m lora_trainer.tiny dataset``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
    "purple": (130, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    "pink": (240, 130, 180), "teal": (30, 150, 150),
}
_SHAPES = ("circle", "square", "triangle", "diamond", "ring", "stripe")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape in ("circle", "ring"):
        draw.ellipse(box, fill=fill if shape == "circle" else None, outline=fill, width=max(2, int(r / 3)))
    elif shape in ("square", "stripe"):
        draw.rectangle(box if shape == "square" else [cx - 2 * r, cy - r / 3, cx + 2 * r, cy + r / 3], fill=fill)
    else:
        tri = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        diamond = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
        draw.polygon(tri if shape == "triangle" else diamond, fill=fill)


def make_dataset(out_dir, n: int = 8, *, sizes=None, caption_ext: str = ".txt", trigger: str | None = "ohwx",
                 seed: int = 0, with_captions: bool = True) -> Path:
    """Write `n` toy images (a coloured shape on a solid or gradient background) plus captions.

    `sizes` is a list of (width, height) cycled over the images (default 64x64).
    Every fourth image is a JPEG so loaders see mixed formats. Output is a pure
    function of the arguments (one numpy Generator drives every choice).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [tuple(s) for s in sizes] if sizes else [(64, 64)]
    if not caption_ext.startswith("."):
        caption_ext = "." + caption_ext
    rng = np.random.default_rng(seed)
    names = list(_COLORS)
    for i in range(n):
        w, h = (int(v) for v in sizes[i % len(sizes)])
        bg, fg = rng.choice(len(names), size=2, replace=False)
        bg2 = (bg + 1 + rng.integers(len(names) - 1)) % len(names)
        shape = _SHAPES[rng.integers(len(_SHAPES))]
        gradient = bool(rng.integers(2))
        c0 = np.array(_COLORS[names[bg]], dtype=np.float32)
        if gradient:
            t = np.linspace(0.0, 1.0, w if w >= h else h, dtype=np.float32)
            t = t[None, :, None] if w >= h else t[:, None, None]
            pixels = np.broadcast_to(c0 + t * (np.array(_COLORS[names[bg2]], np.float32) - c0), (h, w, 3))
            bg_text = f"{names[bg]} to {names[bg2]} gradient background"
        else:
            pixels = np.broadcast_to(c0, (h, w, 3))
            bg_text = f"{names[bg]} background"
        # Mild noise so images are not trivially compressible / perfectly flat.
        pixels = np.clip(pixels + rng.normal(0.0, 6.0, size=(h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, "RGB")
        r = float(rng.uniform(0.18, 0.32)) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        _draw_shape(ImageDraw.Draw(img), shape, float(cx), float(cy), r, _COLORS[names[fg]])
        stem = f"img_{i:04d}"
        img.save(out / (stem + (".jpg" if i % 4 == 3 else ".png")), quality=90)  # PNG ignores quality
        if with_captions:
            article = "an" if names[fg][0] in "aeiou" else "a"
            parts = ([trigger] if trigger else []) + [f"{article} {names[fg]} {shape}", bg_text]
            (out / f"{stem}{caption_ext}").write_text(", ".join(parts), encoding="utf-8")
    return out
