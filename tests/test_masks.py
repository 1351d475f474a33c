"""Masked loss, the maths and the pixels: a mask follows its image through the bucket resize, crop and flip; area
averaging to the latent grid; a black mask gives exactly zero gradient through the real objectives; where masks are
found; what keys the latent cache."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.data.images import LatentCache, TrainImage, load_pixels
from lora_trainer.data.masks import ALPHA, MaskSet, find_mask, is_sidecar, mask_key, to_grid


def _pattern(h: int, w: int, seed: int, block: int = 4) -> np.ndarray:
    """Random black/white blocks: any shift or mirror of the crop changes it."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 2, size=(-(-h // block), -(-w // block))).astype(np.uint8) * 255
    return np.kron(cells, np.ones((block, block), np.uint8))[:h, :w]


def _image(path: Path, pattern: np.ndarray, mode: str = "RGB") -> Path:
    Image.fromarray(np.stack([pattern] * 3, -1), "RGB").convert(mode).save(path)
    return path


def _train_image(path: Path, size: tuple[int, int], bucket: tuple[int, int]) -> TrainImage:
    return TrainImage(0, path, path.name, "", None, 1, size, bucket)


@pytest.mark.parametrize("seed", range(6))
def test_mask_follows_random_crop_and_flip_exactly(tmp_path, seed):
    """An image 64x112 in a 64x64 bucket needs no resampling, only a crop: the mask (the same pattern as the image)
    must come out equal to the image's pixels, for every random crop and flip."""
    pat = _pattern(112, 64, seed)
    img_path = _image(tmp_path / "img.png", pat)
    Image.fromarray(pat, "L").save(tmp_path / "mask.png")
    img = _train_image(img_path, (64, 112), (64, 64))
    masks = MaskSet(sources={0: str(tmp_path / "mask.png")}, image_paths={0: str(img_path)})
    rng = random.Random(f"aug:{seed}")
    flip = rng.random() < 0.5
    pix, tids = load_pixels(img, random_crop=True, rng=rng, flip=flip)
    mask = masks.pixels(0, tids, flip=flip)
    assert mask.shape == (1, 64, 64)
    grey = (pix[0] + 1.0) / 2.0  # [-1, 1] -> [0, 1]
    assert torch.equal(mask[0], grey), f"crop top {int(tids[2])}, flip {flip}"
    # The check can fail: the unflipped or another crop's mask differs from these pixels.
    other = masks.pixels(0, tids, flip=not flip)
    assert not torch.equal(other[0], grey)


def test_mask_of_another_size_is_scaled_into_the_same_window(tmp_path):
    """A half-size mask of a 128x224 image (bucket 64x64: resize and crop) lands where the image's pattern lands."""
    pat = _pattern(224, 128, 3, block=16)
    img_path = _image(tmp_path / "img.png", pat)
    Image.fromarray(pat, "L").resize((64, 112), Image.Resampling.NEAREST).save(tmp_path / "mask.png")
    img = _train_image(img_path, (128, 224), (64, 64))
    masks = MaskSet(sources={0: str(tmp_path / "mask.png")}, image_paths={0: str(img_path)})
    for seed in range(4):
        rng = random.Random(seed)
        flip = rng.random() < 0.5
        pix, tids = load_pixels(img, random_crop=True, rng=rng, flip=flip)
        grey = (pix[0] + 1.0) / 2.0
        err = (masks.pixels(0, tids, flip=flip)[0] - grey).abs().mean().item()
        wrong = (masks.pixels(0, tids, flip=not flip)[0] - grey).abs().mean().item()
        assert err < 0.05 < wrong, (err, wrong)


def test_alpha_mask_is_the_alpha_channel(tmp_path):
    pat = _pattern(64, 64, 5)
    rgba = np.dstack([np.full((64, 64, 3), 128, np.uint8), pat])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = _train_image(tmp_path / "a.png", (64, 64), (64, 64))
    masks = MaskSet(sources={0: ALPHA}, image_paths={0: str(tmp_path / "a.png")})
    _, tids = load_pixels(img, random_crop=False, rng=None)
    assert torch.equal(masks.pixels(0, tids)[0], torch.from_numpy(pat).float() / 255.0)


def test_area_downsampling_averages_each_latent_cell():
    torch.manual_seed(0)
    mask = torch.rand(2, 1, 32, 48)
    mask[:, :, :16, :24] = 0.0  # a block-aligned black region: exactly 0 after averaging
    grid = to_grid(mask, (4, 6))
    expected = mask.reshape(2, 1, 4, 8, 6, 8).mean(dim=(3, 5))
    assert torch.allclose(grid, expected, atol=1e-6)
    assert torch.count_nonzero(grid[:, :, :2, :3]) == 0 and bool((grid[:, :, 2:, :] > 0).all())
    # A region that covers a cell only partly weights it in proportion.
    half = torch.ones(1, 1, 16, 16)
    half[..., :4] = 0.0
    assert torch.allclose(to_grid(half, (2, 2)), torch.tensor([[[[0.5, 1.0], [0.5, 1.0]]]]))


def test_weights_floor_and_normalise():
    latents = torch.zeros(2, 4, 4, 4)
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, :, :2] = 1.0  # half the image
    masks[1] = 1.0
    plain = MaskSet({}, {}, min_value=0.0, normalize=False).weights(masks, latents).elements
    assert torch.equal(plain, masks)
    norm = MaskSet({}, {}, min_value=0.0, normalize=True).weights(masks, latents).elements
    assert torch.allclose(norm.mean(dim=(1, 2, 3)), torch.ones(2)) and torch.equal(norm[0, :, 2:], torch.zeros(1, 2, 4))
    floor = MaskSet({}, {}, min_value=0.25, normalize=False).weights(masks, latents).elements
    assert float(floor.min()) == 0.25 and float(floor.max()) == 1.0
    allblack = MaskSet({}, {}, normalize=True).weights(torch.zeros(1, 1, 4, 4), latents[:1]).elements
    assert torch.equal(allblack, torch.zeros(1, 1, 4, 4))  # no NaN


def _objectives():
    from diffusers import DDPMScheduler

    from lora_trainer.objectives.ddpm import DiffusionObjective, ObjectiveSettings
    from lora_trainer.objectives.flow import FlowMatchingObjective, FlowSettings

    return [DiffusionObjective(DDPMScheduler(num_train_timesteps=1000), ObjectiveSettings("epsilon", min_snr_gamma=5.0)),
            DiffusionObjective(DDPMScheduler(num_train_timesteps=1000), ObjectiveSettings("v_prediction")),
            FlowMatchingObjective(FlowSettings()),
            FlowMatchingObjective(FlowSettings(loss_weighting="cosmap", precondition_outputs=True))]


@pytest.mark.parametrize("objective", _objectives(), ids=["ddpm-eps-minsnr", "ddpm-v", "flow", "flow-precond"])
@pytest.mark.parametrize("normalize", [True, False])
def test_black_mask_gives_exactly_zero_gradient(objective, normalize):
    """Through the real objective: the gradient w.r.t. the prediction, and w.r.t. the model input, is exactly 0 on
    every latent element whose cell lies fully under black, and non-zero elsewhere."""
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    pixel_mask = torch.ones(2, 1, 64, 64)
    pixel_mask[0, :, :, :32] = 0.0  # left half of the first image: black
    pixel_mask[1, :, 16:40, 8:48] = 0.0  # a block of the second: 8-aligned, so whole latent cells
    pixel_mask[1, :, 40:48, 48:56] = 0.5  # grey
    weights = MaskSet({}, {}, normalize=normalize).weights(pixel_mask, latents)
    grid = to_grid(pixel_mask, (8, 8)).expand_as(latents)
    pred = torch.randn_like(latents, requires_grad=True)
    seen = {}

    def model_fn(noisy, t):
        seen["input"] = noisy
        noisy.requires_grad_(True)
        return pred * 1.0 + 0.5 * noisy

    loss = objective(model_fn, latents, generator=torch.Generator().manual_seed(1), extra=weights)
    g_pred, g_in = torch.autograd.grad(loss, [pred, seen["input"]])
    black = grid == 0
    assert int(black.sum()) == 4 * (32 + 15)  # the cells counted above: 4 x 8 and 3 x 5 per channel
    for g in (g_pred, g_in):
        assert torch.count_nonzero(g[black]) == 0
        assert torch.count_nonzero(g[~black]) == int((~black).sum())
    unmasked = objective(model_fn, latents, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(loss, unmasked)


def test_sources_first_found_wins(tmp_path):
    data, masks_dir = tmp_path / "data" / "sub", tmp_path / "masks" / "sub"
    data.mkdir(parents=True)
    masks_dir.mkdir(parents=True)
    for name in ("a", "b", "c", "d"):
        Image.new("RGBA", (8, 8)).save(data / f"{name}.png")
    Image.new("L", (8, 8)).save(masks_dir / "a.webp")  # mask_path, any extension
    Image.new("L", (8, 8)).save(data / "a-masklabel.png")
    Image.new("L", (8, 8)).save(data / "b-masklabel.png")
    cache: dict = {}

    def find(name, root=str(tmp_path / "masks"), alpha=True, mode="RGBA"):
        return find_mask(f"sub/{name}.png", str(data / f"{name}.png"), mode, mask_root=root, alpha=alpha, cache=cache)

    assert find("a") == str(masks_dir / "a.webp")
    assert find("b") == str(data / "b-masklabel.png")
    assert find("c") == ALPHA and find("c", alpha=False) is None and find("c", mode="RGB") is None
    assert is_sidecar("b-masklabel") and not is_sidecar("b")


def test_dataset_scan_does_not_train_on_sidecar_masks(tmp_path, dataset):
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.dataset_scan import scan_dataset

    cfg, _ = parse_config({"dataset_path": str(dataset), "base_model": "m", "output_path": str(tmp_path / "o"),
                           "trigger_words": ["ohwx"]})
    before = scan_dataset(cfg)
    Image.new("L", (64, 64), 255).save(dataset / "img_0000-masklabel.png")
    after = scan_dataset(cfg)
    assert [r.rel_path for r in after.records] == [r.rel_path for r in before.records]
    assert after.ignored_files == before.ignored_files + 1


def test_cache_key_follows_the_mask_content(tmp_path):
    img_path = _image(tmp_path / "i.png", _pattern(64, 64, 0))
    img = _train_image(img_path, (64, 64), (64, 64))
    cache = LatentCache(tmp_path / "c", "model")
    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    plain = cache._key(img, 0, False)
    assert cache._key(img, 0, False, mask_key(None)) == plain  # unmasked entries keep their key
    white = cache._key(img, 0, False, mask_key(str(tmp_path / "m.png")))
    Image.new("L", (64, 64), 128).save(tmp_path / "m.png")
    grey = cache._key(img, 0, False, mask_key(str(tmp_path / "m.png")))
    assert len({plain, white, grey, cache._key(img, 0, False, mask_key(ALPHA))}) == 4


@pytest.mark.parametrize("spill", [False, True])
def test_latent_cache_keeps_masks_on_the_latent_grid(tmp_path, spill):
    """The cache stores each masked image's mask at its latent's crop and grid (a fake 8x encoder), reuses it from
    disk, and batch_masks gives ones for an unmasked image of the batch and None for a batch without masks."""
    paths, sources = [], {}
    for i in range(3):
        pat = _pattern(64, 96, i, block=8)
        paths.append(_image(tmp_path / f"i{i}.png", pat))
        if i < 2:
            Image.fromarray(pat, "L").save(tmp_path / f"m{i}.png")
            sources[i] = str(tmp_path / f"m{i}.png")
    images = [TrainImage(i, p, p.name, "", None, 1, (96, 64), (64, 64)) for i, p in enumerate(paths)]
    masks = MaskSet(sources={i: sources.get(i) for i in range(3)}, image_paths={i: str(p) for i, p in enumerate(paths)})

    def encode(pix):  # the 8x8 block mean of the red channel: a "latent" that shows the crop
        return torch.nn.functional.avg_pool2d((pix[:, :1] + 1) / 2, 8)

    for run in range(2):  # the second run reads every entry back from disk
        cache = LatentCache(tmp_path / "cache", "model", spill=spill)
        failed = cache.build(encode, images, device=torch.device("cpu"), seed=3, random_crop=True, batch_size=2,
                             progress=lambda n, t: None, masks=masks)
        assert not failed and (cache.hits, cache.encoded) == ((0, 3) if run == 0 else (3, 0))
        lat, _ = cache.batch([0, 1, 2], torch.device("cpu"))
        got = cache.batch_masks([0, 1, 2], masks)
        assert got.shape == (3, 1, 8, 8)
        assert torch.allclose(got[:2], lat[:2], atol=1e-6)  # the mask is the image's pattern: the same crop
        assert torch.equal(got[2], torch.ones(1, 8, 8))
        assert cache.batch_masks([2], masks) is None and cache.batch_masks([0], None) is None


def test_memory_plan_counts_the_masks(tmp_path):
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.cache_plan import plan_caches

    base = {"dataset_path": "d", "base_model": "m", "output_path": "o", "trigger_words": ["ohwx"]}
    plain, masked = (parse_config({**base, **extra}, base_dir=tmp_path)[0] for extra in ({}, {"masked_loss": True}))
    shapes, captions = [(64, 64), (128, 64)], ["a", "b"]
    a, b = (plan_caches(c, "sd15", shapes, captions)["latents"]["total_bytes"] for c in (plain, masked))
    assert b == a * 5 // 4  # one fp32 mask channel beside SD's four latent channels
