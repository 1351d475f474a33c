"""Image decoding and epoch plans: every PIL mode becomes correct RGB, EXIF orientation is applied, SDXL time ids
describe the crop, batches come from one bucket, nothing is dropped, and the order depends only on (seed, epoch)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.data.datasets import plan_epoch
from lora_trainer.data.images import TrainImage, load_pixels, to_rgb


def _img(path: Path, size=(64, 64), bucket=(64, 64), repeats=1, index=0) -> TrainImage:
    return TrainImage(index, path, path.name, "", None, repeats, size, bucket)


@pytest.mark.parametrize("mode,color,expected", [
    ("L", 128, (128, 128, 128)),
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),          # fully transparent red -> the white background
    ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
    ("LA", (0, 128), (127, 127, 127)),                   # half-transparent black over white
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("I;16", 65535, (255, 255, 255)),                    # 16-bit white stays white (not clipped garbage)
    ("I;16", 32896, (128, 128, 128)),
])
def test_every_mode_to_rgb(mode, color, expected):
    im = Image.new(mode, (4, 4), color)
    out = to_rgb(im)
    assert out.mode == "RGB"
    got = out.getpixel((1, 1))
    assert all(abs(a - b) <= 1 for a, b in zip(got, expected)), (mode, got, expected)


def test_palette_with_transparency():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    im.info["transparency"] = 0
    assert to_rgb(im).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high, left half red
    arr[:, :32] = (255, 0, 0)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        shown = to_rgb(raw)
    assert shown.size == (32, 64)
    top = shown.getpixel((16, 5))
    assert top[0] > 200 and top[1] < 60, "the red half must be on top after a 90 degree clockwise rotation"


def test_load_pixels_range_shape_and_time_ids(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (200, 100), (255, 255, 255)).save(path)
    pix, tids = load_pixels(_img(path, size=(200, 100), bucket=(128, 64)), random_crop=False, rng=None)
    assert pix.shape == (3, 64, 128) and pix.min() >= -1 and pix.max() <= 1
    assert pix.max().item() == pytest.approx(1.0)
    orig_h, orig_w, top, left, th, tw = tids.tolist()
    assert (orig_h, orig_w, th, tw) == (100, 200, 64, 128)
    assert top == 0 and 0 <= left <= 1  # scaled to 128x64: an exact fit, at most rounding left to crop


def test_plan_epoch_buckets_repeats_and_determinism(tmp_path):
    images = [_img(tmp_path / f"{i}.png", bucket=(64, 64) if i < 5 else (128, 64), repeats=2 if i == 0 else 1,
                   index=i) for i in range(8)]
    plan = plan_epoch(images, 2, seed=1, epoch=0)
    for batch in plan:
        assert len({images[i].bucket for i in batch}) == 1, "a batch must come from one bucket"
    counts = Counter(i for b in plan for i in b)
    assert counts == Counter({0: 2, **{i: 1 for i in range(1, 8)}}), "every sample exactly as often as its repeats"
    assert plan == plan_epoch(images, 2, seed=1, epoch=0)
    assert plan != plan_epoch(images, 2, seed=1, epoch=1)
    assert plan != plan_epoch(images, 2, seed=2, epoch=0)


def test_latent_cache_placement_and_batches():
    import torch

    from lora_trainer.data.images import LatentCache

    cache = LatentCache(None, "m")
    for i in range(3):
        cache.latents[i] = torch.full((4, 8, 8), float(i))
        cache.time_ids[i] = torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0]) + i
    assert cache.nbytes == 3 * (4 * 8 * 8 + 6) * 4
    cpu = torch.device("cpu")
    # Too large for a tenth of the free memory: stays on the host; small enough: moved.
    assert cache.place(cpu, free_bytes=cache.nbytes * 10 - 1) == "host"
    assert cache.place(cpu, free_bytes=cache.nbytes * 10) == "device"
    latents, time_ids = cache.batch([2, 0], cpu)
    assert latents.shape == (2, 4, 8, 8) and latents[0].eq(2).all() and latents[1].eq(0).all()
    assert time_ids[:, 0].tolist() == [66.0, 64.0]
