"""Clips' loose ends (issue 25): --validate-only plans the trainer's batches (clips of different frame counts never
share one), an animated GIF / WebP is a clip for a video family and a one-frame one an image (frame timing read from
the block headers, no frame decoded), held-out clips in eval_dataset_path are evaluated, and the latent cache plan
reads the VAE's layout (Wan 2.2 TI2V-5B: 48 channels at 16x)."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageFile

from conftest import run_cli, write_config

pytest.importorskip("av")

from lora_trainer.data import animated, video as V  # noqa: E402
from lora_trainer.testing.video import write_animated, write_clip  # noqa: E402


def _data(root: Path) -> Path:
    """2 images + a one-frame WebP (3 images: 2 batches at batch size 2), a 9-frame MP4 clip and a 5-frame animated
    WebP, all in one 64 x 64 bucket: the trainer plans 4 batches, a spatial-only count 3."""
    from lora_trainer.testing.tiny import make_dataset

    data = Path(make_dataset(root, n=2, trigger="ohwx"))
    write_clip(data / "clip.mp4", frames=20, fps=16, width=72, height=48)  # 1.25 s: 9 frames at 16 fps
    write_animated(data / "anim.webp", frames=6, durations_ms=[80, 80, 40, 120, 80, 80], width=48, height=40)
    write_animated(data / "still.webp", frames=1, width=64, height=64)
    for name in ("clip", "anim", "still"):
        (data / f"{name}.txt").write_text(f"ohwx, {name}")
    return data


def _config(tmp: Path, model: Path, data: Path, name: str, **extra) -> Path:
    cfg = {"base_model": str(model), "output_path": str(tmp / name), "trigger_words": ["ohwx"], "resolution": 64,
           "min_bucket_resolution": 64, "batch_size": 2, "num_epochs": 1, "lora_rank": 4, "lora_alpha": 4,
           "video_frames": 9, "video_fps": 16, "checkpointing_steps": 100, "validation_steps": None,
           "log_every_n_steps": 1, **extra}
    if "datasets" not in cfg:
        cfg["dataset_path"] = str(data)
    return write_config(tmp / f"{name}.json", **cfg)


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("clip_gaps")
    data = _data(tmp / "data")
    held = tmp / "held"
    held.mkdir()
    write_clip(held / "held_clip.mp4", frames=20, fps=16, width=64, height=64)
    (held / "held_clip.txt").write_text("ohwx, held out")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(held / "held.png")
    model = tiny_models["wan21"]
    eval_keys = {"eval_dataset_path": str(held), "eval_steps": 2, "eval_timesteps": [0.5]}
    res = run_cli("--config", str(_config(tmp, model, data, "train", **eval_keys)))
    assert res.returncode == 0, res.stderr[-4000:]
    return {"tmp": tmp, "data": data, "model": model, "run": res, "eval_keys": eval_keys}


def _validate(tmp: Path, model: Path, data: Path, name: str, **extra) -> dict:
    res = run_cli("--config", str(_config(tmp, model, data, name, **extra)), "--validate-only")
    assert res.returncode == 0, res.stderr[-3000:]
    return res.last("validation")["summary"]["dataset"]


def test_validate_only_plans_the_trainers_batches(wan_run):
    started = wan_run["run"].last("run_started")
    assert (started["num_images"], started["num_clips"]) == (5, 2)  # anim.webp a clip, still.webp an image
    # Images (3 samples: 2 batches), the 9-frame clip, the 5-frame WebP: 4 batches, one epoch.
    assert started["total_steps"] == 4 and len(wan_run["run"].of_type("step")) == 4
    d = _validate(wan_run["tmp"], wan_run["model"], wan_run["data"], "plan", **wan_run["eval_keys"])
    assert (d["batches_per_epoch"], d["steps_per_epoch"], d["total_steps"]) == (4, 4, started["total_steps"])
    rows = {(r["width"], r["height"], r.get("frames", 1)): r["batches"] for r in d["bucket_plan"]["buckets"]}
    assert rows == {(64, 64, 1): 2, (64, 64, 5): 1, (64, 64, 9): 1}
    # A `datasets` run plans through the same images and epoch plan.
    multi = _validate(wan_run["tmp"], wan_run["model"], wan_run["data"], "plan_multi",
                      datasets=[{"path": str(wan_run["data"])}])
    assert (multi["batches_per_epoch"], multi["total_steps"]) == (4, 4)


def test_held_out_clips_in_eval_dataset_path_are_evaluated(wan_run):
    evals = wan_run["run"].of_type("eval_loss")
    assert evals and all(e["images"] == 2 for e in evals)  # held_clip.mp4 and held.png
    d = _validate(wan_run["tmp"], wan_run["model"], wan_run["data"], "eval", **wan_run["eval_keys"])
    assert (d["eval"]["found"], d["eval"]["images"]) == (2, 2)


def test_animated_images_are_clips_for_a_video_family_only(tmp_path):
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.dataset_scan import scan_dataset

    data = tmp_path / "d"
    data.mkdir()
    write_animated(data / "anim.webp", frames=5, width=40, height=24)
    write_animated(data / "anim.gif", frames=5, width=40, height=24)
    write_animated(data / "still.webp", frames=1, width=40, height=24)
    write_animated(data / "still.gif", frames=1, width=40, height=24)
    raw = {"dataset_path": str(data), "base_model": "org/model", "output_path": str(tmp_path / "out"),
           "trigger_words": ["ohwx"]}
    cfg = parse_config(raw, base_dir=tmp_path)[0]
    wan = {r.rel_path: r for r in scan_dataset(cfg, family="wan").records}
    assert {k: (r.usable, r.clip is not None) for k, r in wan.items()} == {
        "anim.gif": (True, True), "anim.webp": (True, True), "still.gif": (True, False), "still.webp": (True, False)}
    assert wan["anim.webp"].clip.info.frames == 5 and wan["still.gif"].format == "GIF"
    image_family = {r.rel_path: r for r in scan_dataset(cfg, family="sd15").records}
    assert {k: r.clip for k, r in image_family.items()} == {"anim.webp": None, "still.webp": None}  # GIFs: not images


@pytest.mark.parametrize("ext", ["gif", "webp"])
def test_frame_timing_comes_from_the_headers_without_decoding(tmp_path, ext, monkeypatch):
    ms = [40, 80, 0, 120, 60, 70, 50]  # variable frame rate; a 0 delay shows ~100 ms, as browsers do
    path = write_animated(tmp_path / f"v.{ext}", frames=len(ms), durations_ms=ms, width=48, height=32)
    with Image.open(path) as im:  # Pillow's own durations, each frame decoded
        decoded = []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()
            decoded.append(im.info.get("duration"))
    assert animated.durations(path) == decoded
    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real(self))
    info = V.probe(path)
    assert len(loads) == 1  # the first frame (it must decode), no other
    assert info.frames == len(ms) and info.vfr
    assert info.duration == pytest.approx(sum(V.frame_seconds(d) for d in decoded))


def test_the_latent_cache_plan_reads_the_vaes_layout(tiny_models):
    from lora_trainer.families import SPECS
    from lora_trainer.preflight.cache_plan import latent_layout, vae_config_of

    spec = SPECS["wan"]
    wan21, wan22 = (vae_config_of(tiny_models[name]) for name in ("wan21", "wan22-5b"))
    assert latent_layout(spec, wan21) == (16, 8) and latent_layout(spec, wan22) == (48, 16)
    assert latent_layout(spec, None) == (spec.latent_channels, 8)  # a single file: the spec's, at 8x


def test_the_cache_plan_counts_ti2v_5b_latents(tmp_path, tiny_models):
    from lora_trainer.families.wan.adapter import Wan
    from lora_trainer.preflight.cache_plan import vae_config_of

    model = tiny_models["wan22-5b"]
    data = tmp_path / "data"
    data.mkdir()
    write_clip(data / "clip.mp4", frames=20, fps=16, width=64, height=64)
    Image.new("RGB", (64, 64)).save(data / "img.png")
    res = run_cli("--config", str(_config(tmp_path, model, data, "v5b")), "--validate-only")
    assert res.returncode == 0, res.stderr[-3000:]
    latents = res.last("validation")["summary"]["caches"]["latents"]
    channels, scale = Wan.latent_layout(None, vae_config_of(model))  # what the trainer's cache is sized with
    # The image: 1 latent frame; the 9-frame clip: 3 for each of its windows. fp32, at 64 x 64.
    assert latents["latent_frames"] == 1 + 3 * latents["windows"]
    assert latents["total_bytes"] == channels * latents["latent_frames"] * (64 // scale) ** 2 * 4
    assert (channels, scale) == (48, 16)


def test_a_variants_clip_tokens_are_its_own():
    """TI2V-5B's tokens are 32 px (VAE 16x, patch 2): its clip budget counts them so, Wan 2.1's 16 px."""
    from lora_trainer.data.samples import clip_geometry

    five_b, wan21, image = clip_geometry("wan", "ti2v-5b"), clip_geometry("wan", "t2v-1.3b"), clip_geometry("sd15")
    assert (five_b.token_pixels, five_b.temporal, wan21.token_pixels) == (32, 4, 16)
    assert five_b.tokens(33, 832, 480) == 9 * 26 * 15 and wan21.tokens(33, 832, 480) == 9 * 52 * 30
    assert image.tokens(1, 512, 512) == 32 * 32  # an image family's: one frame of 16 px tokens (holds no clips)
