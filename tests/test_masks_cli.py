"""Masked loss through the real CLI: a UNet run (uncached latents, flip_aug, random_crop, a mask folder) and a flow
run (cached latents on disk, alpha masks and a sidecar) train, stop on SIGTERM and resume bitwise; --validate-only
reports every kind of bad mask."""
from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import run_cli, write_config


def _half_mask(size: tuple[int, int]) -> Image.Image:
    w, h = size
    m = np.zeros((h, w), np.uint8)
    m[:, : w // 2] = 255
    return Image.fromarray(m, "L")


def _steps(res) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in res.of_type("step")}


def _train_stop_resume(tmp_path: Path, config: dict, name: str, stop: int, lora_file: str):
    """(uninterrupted run, resumed run): the second was stopped by SIGTERM during step ``stop``, then resumed; its
    final files equal the first's bitwise and its losses after the resume point too."""
    ref = run_cli("--config", str(write_config(tmp_path / f"{name}_ref.json", **config,
                                               output_path=str(tmp_path / f"{name}_ref"))))
    assert ref.returncode == 0, ref.stderr[-3000:]
    cfg = write_config(tmp_path / f"{name}.json", **config, output_path=str(tmp_path / name), resume="auto")
    stopped = run_cli("--config", str(cfg), env={"TRAIN_LORA_TEST_SIGTERM_STEP": str(stop)})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert stopped.last("interrupted")["step"] == stop
    resumed = run_cli("--config", str(cfg))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.last("resumed")["step"] == stop
    ref_steps, res_steps = _steps(ref), _steps(resumed)
    assert res_steps and all(loss == ref_steps[step] for step, loss in res_steps.items())
    a, b = load_file(tmp_path / f"{name}_ref" / lora_file), load_file(tmp_path / name / lora_file)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    return ref, resumed


def test_unet_masked_uncached_flip_crop_trains_and_resumes_bitwise(tmp_path, tiny_models):
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "data", n=4, trigger="ohwx", sizes=[(64, 96), (96, 64)])
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):  # img_0003 has none: it trains unmasked
        src = next(p for p in data.glob(f"img_{i:04d}.*") if p.suffix != ".txt")
        _half_mask(Image.open(src).size).save(masks / f"img_{i:04d}.png")
    config = dict(dataset_path=str(data), base_model=str(tiny_models["sd15"]), trigger_words=["ohwx"], resolution=64,
                  max_train_steps=4, checkpointing_steps=2, log_every_n_steps=1, lora_rank=4, learning_rate=1e-3,
                  batch_size=2, cache_latents=False, flip_aug=True, random_crop=True, masked_loss=True,
                  mask_path="masks")  # relative to the config file
    ref, _ = _train_stop_resume(tmp_path, config, "unet", 3, "lora.safetensors")
    missing = [w for w in ref.of_type("warning") if w["code"] == "mask_missing"]
    assert len(missing) == 1 and missing[0]["files"] == ["img_0003.jpg"]
    # The masks change what is learnt: the same run without them has another first loss (same noise, same batch).
    plain = run_cli("--config", str(write_config(tmp_path / "plain.json", **{**config, "masked_loss": False,
                                                                              "mask_path": None, "max_train_steps": 1,
                                                                              "checkpointing_steps": None},
                                                  output_path=str(tmp_path / "plain"))))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert _steps(plain)[1] != _steps(ref)[1]


def test_flow_masked_cached_alpha_trains_and_resumes_bitwise(tmp_path, tiny_models):
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "data", n=4, trigger="ohwx")
    for i in range(3):  # alpha masks: the left half opaque
        path = data / f"img_{i:04d}.png"
        im = Image.open(path).convert("RGBA")
        im.putalpha(_half_mask(im.size))
        im.save(path)
    _half_mask((64, 64)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "img_0003-masklabel.png")  # a JPEG's
    config = dict(dataset_path=str(data), base_model=str(tiny_models["flux1-schnell"]), trigger_words=["ohwx"],
                  resolution=64, min_bucket_resolution=64, max_train_steps=3, checkpointing_steps=2,
                  log_every_n_steps=1, lora_rank=4, learning_rate=2e-3, max_sequence_length=32, batch_size=2,
                  cache_latents_to_disk=True, masked_loss=True, alpha_mask=True, require_masks=True)
    ref, resumed = _train_stop_resume(tmp_path, config, "flow", 1, "lora.safetensors")
    assert ref.last("run_started")["num_images"] == 4 and not [w for w in ref.of_type("warning")
                                                                if w["code"].startswith("mask_")]
    assert resumed.last("run_started")["latent_cache"] is not None
    entries = [load_file(p) for p in sorted((tmp_path / "flow" / "cache" / "latents").glob("*.safetensors"))]
    assert len(entries) == 4
    for e in entries:  # each entry's mask is on its latent's own grid: black right half (or left, the sidecar's)
        mask = e["mask"]
        assert mask.shape == (1, *e["latents"].shape[-2:])
        w = mask.shape[-1]
        halves = sorted([float(mask[..., : w // 2].max()), float(mask[..., w // 2:].max())])
        assert halves == [0.0, 1.0] and set(mask.unique().tolist()) == {0.0, 1.0}


def test_validate_only_reports_each_bad_mask(tmp_path, tiny_models):
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "data", n=5, trigger="ohwx", sizes=[(64, 64)])
    masks = tmp_path / "masks"
    masks.mkdir()
    _half_mask((32, 32)).save(masks / "img_0000.png")  # half the size, same aspect: scaled
    (masks / "img_0001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png" * 20)  # unreadable
    _half_mask((64, 32)).save(masks / "img_0002.png")  # another aspect ratio
    Image.new("L", (64, 64), 0).save(masks / "img_0003.jpg")  # all black
    # img_0004: none
    base = dict(dataset_path=str(data), base_model=str(tiny_models["sd15"]), output_path=str(tmp_path / "out"),
                trigger_words=["ohwx"], resolution=64, masked_loss=True, mask_path=str(masks))
    res = run_cli("--config", str(write_config(tmp_path / "a.json", **base)), "--validate-only")
    assert res.returncode == 0, res.stdout[-3000:]
    report = res.last("validation")
    by_code = {w["code"]: w for w in report["warnings"]}
    assert by_code["mask_missing"]["files"] == ["img_0004.png"]
    assert by_code["mask_scaled"]["files"] == ["img_0000.png: mask 32x32, image 64x64"]
    unusable = by_code["mask_unusable"]["files"]
    assert [f.split(":")[0] for f in unusable] == ["img_0001.png", "img_0002.png", "img_0003.jpg"]
    assert "PIL" in unusable[0] or "not an image" in unusable[0]
    assert "aspect ratio" in unusable[1] and "all black" in unusable[2]
    dataset = report["summary"]["dataset"]
    assert dataset["usable"] == 2 and dataset["masks"]["masked"] == 1 and dataset["masks"]["unusable"] == 3

    strict = write_config(tmp_path / "b.json", **base, require_masks=True)
    checked = run_cli("--config", str(strict), "--validate-only")
    assert checked.returncode == 2 and checked.last("validation")["errors"][0]["code"] == "mask_missing"
    trained = run_cli("--config", str(strict))  # refused before the model loads, as a dataset error
    assert trained.returncode == 3 and trained.last("error")["code"] == "dataset_invalid"
    assert "img_0004.png" in trained.last("error")["details"]["problems"][0]["files"]

    nowhere = run_cli("--config", str(write_config(tmp_path / "c.json", **{**base, "mask_path": str(tmp_path / "no")})),
                      "--validate-only")
    assert nowhere.returncode == 2 and nowhere.last("validation")["errors"][0]["code"] == "mask_path_missing"
