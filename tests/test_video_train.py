"""Video clips as training samples through the real CLI (data/clips.py): the tiny Wan 2.1 on a folder of generated
clips (odd fps and sizes, a VP9 WebM, an animated GIF shorter than video_frames, a broken MP4, a masked clip) and two
images. Each window an epoch trains is fixed by (seed, epoch, clip), so a cached and an uncached run train the same
data, and a SIGTERM / --resume ends bitwise where an uninterrupted run does. An image family given the same folder
warns (video_not_trained) and trains on its images."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import run_cli, write_config

pytest.importorskip("av")

from lora_trainer.data import clips, video as V  # noqa: E402
from lora_trainer.testing.video import frame_index, write_animated, write_broken, write_clip  # noqa: E402

FRAMES = 9  # 3 latent frames
STEPS = 6  # 3 batches an epoch at batch size 2: epochs 0 and 1, so the epoch's window changes


def _folder(root: Path) -> Path:
    from lora_trainer.testing.tiny import make_dataset

    data = Path(make_dataset(root, n=2, trigger="ohwx"))
    ok = write_clip(data / "clip_a.mp4", frames=30, fps=24, width=72, height=48)  # 1.25 s: 3 windows of 9 at 16 fps
    (data / "clip_a.txt").write_text("ohwx, a square moving right")
    mask = np.zeros((48, 72), np.uint8)
    mask[:, :36] = 255  # the left half trains, on every frame
    Image.fromarray(mask, "L").save(data / "clip_a-masklabel.png")
    write_clip(data / "clip_b.webm", frames=12, fps=7, width=56, height=40, codec="libvpx-vp9")  # 1.71 s at 7 fps
    write_animated(data / "clip_c.gif", frames=6, durations_ms=80, width=48, height=40)  # 0.48 s: shortened to 5
    write_broken(data / "clip_broken.mp4", ok)
    return data


def _config(tmp: Path, model: Path, data: Path, name: str, **extra) -> Path:
    cfg = {"dataset_path": str(data), "base_model": str(model), "output_path": str(tmp / name),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "batch_size": 2,
           "max_train_steps": STEPS, "checkpointing_steps": 2, "log_every_n_steps": 1, "lora_rank": 4,
           "lora_alpha": 4, "learning_rate": 2e-3, "video_frames": FRAMES, "video_fps": 16, "video_start": "random",
           "masked_loss": True, **extra}
    return write_config(tmp / f"{name}.json", **cfg)


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{STEPS:06d}" / "lora_transformer.safetensors")


def _stop_and_resume(cfg: Path) -> None:
    stopped = run_cli("--config", str(cfg), env={"TRAIN_LORA_TEST_SIGTERM_STEP": "4"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.last("interrupted")["step"] == 4
    resumed = run_cli("--config", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.last("resumed")["step"] == 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    """Uncached and cached runs, each uninterrupted and stopped + resumed, on one folder."""
    tmp = tmp_path_factory.mktemp("video_train")
    data = _folder(tmp / "data")
    model = tiny_models["wan21"]
    out = {"tmp": tmp, "data": data}
    for name, extra in (("uncached", {"cache_latents": False}), ("cached", {})):
        full = run_cli("--config", str(_config(tmp, model, data, name, **extra)))
        assert full.returncode == 0, full.stderr[-4000:]
        out[name] = full
        _stop_and_resume(_config(tmp, model, data, f"{name}_split", **extra))
    return out


def test_clips_train_and_the_broken_one_is_skipped(runs):
    res = runs["uncached"]
    warnings = {w["code"]: w for w in res.of_type("warning")}
    assert [f.split(":")[0] for f in warnings["video_unreadable"]["files"]] == ["clip_broken.mp4"]
    assert "video_not_trained" not in warnings
    started = res.last("run_started")
    assert (started["num_images"], started["num_clips"]) == (5, 3)
    assert [e["step"] for e in res.of_type("step")] == list(range(1, STEPS + 1))


def test_cached_entries_hold_every_window_as_latent_frames(runs):
    entries = [load_file(p) for p in sorted((runs["tmp"] / "cached" / "cache" / "latents").glob("*.safetensors"))]
    shapes = sorted(tuple(e["latents"].shape) for e in entries)
    # Images: [16, h, w]; clip_a and clip_b: 9 frames -> 3 latent frames, 3 windows each; the GIF: 5 -> 2, 3 windows.
    assert shapes == sorted([(16, 8, 8)] * 2 + [(16, 3, 8, 8)] * 6 + [(16, 2, 8, 8)] * 3)
    masked = [e for e in entries if "mask" in e]
    assert len(masked) == 3 and all(e["mask"].shape == (1, 8, 8) for e in masked)  # clip_a's 3 windows
    assert all(torch.equal(e["mask"][0, :, :4], torch.ones(8, 4)) and e["mask"][0, :, 5:].sum() == 0 for e in masked)
    assert runs["cached"].last("run_started")["latent_cache"]["placement"] == "disk"  # clips spill by default


def test_cached_and_uncached_runs_train_the_same_windows(runs):
    # Same data, same draws: only the encode's batching differs (per window up front vs per step).
    a, b = _final(runs["tmp"] / "uncached"), _final(runs["tmp"] / "cached")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    la = [e["loss"] for e in runs["uncached"].of_type("step")]
    lb = [e["loss"] for e in runs["cached"].of_type("step")]
    assert la == pytest.approx(lb, rel=1e-4)


@pytest.mark.parametrize("name", ["uncached", "cached"])
def test_sigterm_resume_is_bitwise(runs, name):
    a, b = _final(runs["tmp"] / name), _final(runs["tmp"] / f"{name}_split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}: resume not exact"


def test_the_epoch_window_is_the_one_decoded(tmp_path):
    """Uncached: epoch e decodes window clips.window(e) (the frames at its start); the cache's slot for e is the same
    window. With start "uniform" window e mod K; "random" the same draw for the same (seed, epoch, clip)."""
    from types import SimpleNamespace

    from lora_trainer.data.images import TrainImage

    path = write_clip(tmp_path / "c.mp4", frames=40, fps=16, width=48, height=32)  # 2.5 s at 16 fps, frame i at i/16
    info = V.probe(path)
    img = TrainImage(0, path, "c.mp4", "", None, 1, (48, 32), (48, 32), frames=9, duration=info.duration)
    for start in ("uniform", "random"):
        cfg = SimpleNamespace(video_fps=16.0, video_windows=3, video_start=start, seed=7, video_short_clip="shorten")
        starts = clips.starts(cfg, img)
        assert starts == pytest.approx([0.0, (40 - 9) / 32, (40 - 9) / 16])
        chosen = [clips.window(cfg, img, e) for e in range(9)]
        if start == "uniform":
            assert chosen == [0, 1, 2] * 3
        else:
            assert len(set(chosen)) > 1 and chosen == [clips.window(cfg, img, e) for e in range(9)]
        for e in (0, 1, 2):
            w = clips.window(cfg, img, e)
            assert clips.slot(cfg, img, e) == (0, w)
            pix, geometry = clips.load_window(cfg, img, w, random_crop=False, rng=random.Random(0))
            assert pix.shape == (3, 9, 32, 48) and geometry.tolist() == [32, 48, 0, 0, 32, 48]
            got = [frame_index(((f.permute(1, 2, 0).numpy() + 1) * 127.5)) for f in pix.unbind(1)]
            first = int(starts[w] * 16 + 1e-6)  # the source frame on screen at the start
            assert got == [i % 32 for i in range(first, first + 9)], (start, e, w)  # the grey level wraps at 32


def test_a_clip_mask_weights_every_latent_frame():
    from lora_trainer.data.masks import MaskSet

    masks = MaskSet(sources={0: "m.png", 1: None}, image_paths={}, normalize=False)
    m = torch.zeros(1, 16, 16)
    m[:, :, :8] = 1
    lat = torch.zeros(2, 16, 3, 2, 2)
    w = masks.weights([m, None], lat).elements
    assert w.shape == (2, 1, 1, 2, 2)
    assert torch.equal((w * torch.ones_like(lat))[0, :, :, :, 1], torch.zeros(16, 3, 2))  # right half, every frame
    assert torch.equal((w * torch.ones_like(lat))[1], torch.ones(16, 3, 2, 2))


def test_seq_len_counts_latent_frames(tiny_models):
    from lora_trainer.objectives.flow import FlowMatchingObjective, FlowSettings

    obj = FlowMatchingObjective(FlowSettings(), patch_size=2)
    assert obj.image_seq_len(torch.zeros(1, 16, 8, 8)) == 16
    assert obj.image_seq_len(torch.zeros(1, 16, 3, 8, 8)) == 48


def test_an_image_family_skips_clips_and_trains_on_its_images(tmp_path, tiny_models, dataset):
    data = tmp_path / "mixed"
    shutil.copytree(dataset, data)
    write_clip(data / "clip.mp4", frames=20, fps=16, width=64, height=48)
    write_animated(data / "anim.gif", frames=4, width=40, height=24)
    cfg = write_config(tmp_path / "c.json", dataset_path=str(data), base_model=str(tiny_models["sd15"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64, max_train_steps=2)
    res = run_cli("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    warned = {w["code"]: w for w in res.of_type("warning")}
    assert sorted(warned["video_not_trained"]["files"]) == ["anim.gif", "clip.mp4"]
    started = res.last("run_started")
    assert (started["num_images"], started["num_clips"]) == (4, 0)
