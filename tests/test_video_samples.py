"""Samples of a video family are clips (outputs/clips.py, training/sampling.py): through the real CLI on the tiny
Wan 2.1, each sample is an mp4 (or animated WebP) of validation_frames frames beside a PNG of its frames, the
``sample`` events name both, a resumed run draws the same clips as an uninterrupted one, and the report plays them.
An image family's samples stay images (video null) and the two keys are reported as unused there."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import run_cli, write_config
from lora_trainer.outputs.clips import frame_grid, grid_indices, write_clip

av = pytest.importorskip("av")

FRAMES, RES = 5, 64


def _config(tmp, model, data, out: str, **extra):
    fields = dict(dataset_path=str(data), base_model=str(model), output_path=str(tmp / out), trigger_words=["ohwx"],
                  resolution=RES, lora_rank=4, learning_rate=1e-3, log_every_n_steps=1, max_train_steps=4,
                  checkpointing_steps=2, validation_steps=2, validation_inference_steps=2,
                  validation_prompts=["ohwx, a red square moves"], validation_frames=FRAMES)
    return write_config(tmp / f"{out}.json", **{**fields, **extra})


@pytest.fixture(scope="module")
def wan_runs(tmp_path_factory, tiny_models):
    """The uninterrupted 4-step run (mp4 clips at steps 0, 2, 4), and the same run stopped at step 2 (mp4) and
    resumed to step 4 with webp clips: the PNGs hold every frame (5 <= the grid's 5), so they compare across formats."""
    from lora_trainer.testing.tiny import make_dataset

    tmp = tmp_path_factory.mktemp("video_samples")
    data = make_dataset(tmp / "data", n=2, trigger="ohwx")
    model = tiny_models["wan21"]
    ref = run_cli("--config", str(_config(tmp, model, data, "ref")))
    assert ref.returncode == 0, ref.stderr[-3000:]
    first = run_cli("--config", str(_config(tmp, model, data, "run", max_train_steps=2)))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli("--config", str(_config(tmp, model, data, "run", resume="auto", overwrite_output=True,
                                              validation_video_format="webp")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.last("resumed")["step"] == 2
    return tmp, ref, first, resumed


def _decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        facts = (stream.codec_context.name, stream.codec_context.pix_fmt, float(stream.average_rate))
        return facts, [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


def _blocks(a):
    return a.astype(float).reshape(RES // 8, 8, RES // 8, 8, 3).mean(axis=(1, 3))


def _tiles(png):
    """The frames of a sample's PNG (side by side, RES wide each)."""
    with Image.open(png) as im:
        a = np.asarray(im.convert("RGB"))
    return [a[:, i * RES:(i + 1) * RES] for i in range(a.shape[1] // RES)]


def test_samples_are_clips_beside_a_frame_grid(wan_runs):
    tmp, ref, _, _ = wan_runs
    samples = ref.of_type("sample")
    assert sorted(e["step"] for e in samples) == [0, 2, 4]
    for ev in samples:
        assert ev["frames"] == FRAMES and ev["video"].endswith(".mp4"), ev
        (codec, pix_fmt, fps), frames = _decode(ev["video"])
        assert (codec, pix_fmt, fps) == ("h264", "yuv420p", 16.0)  # video_fps's default: the clip plays in time
        assert len(frames) == FRAMES and all(f.shape == (RES, RES, 3) for f in frames)
        tiles = _tiles(ev["path"])
        assert len(tiles) == FRAMES  # every frame of a 5-frame clip is in its grid
        # The clip is the PNG's frames in order, H.264-compressed (yuv420p halves the chroma of the tiny model's
        # pixel noise): on 8x8 block means each decoded frame is within ~1 level of its own tile, ~20 of the others.
        dist = [[np.abs(_blocks(f) - _blocks(t)).mean() for t in tiles] for f in frames]
        assert all(min(row) == row[i] < 3 < sorted(row)[1] for i, row in enumerate(dist)), np.round(dist, 1)
    step_grid = tmp / "ref" / "samples" / "step-000004" / "grid.png"
    with Image.open(step_grid) as im:
        assert im.size == (FRAMES * RES, RES)
    report = (tmp / "ref" / "report.html").read_text()
    assert len(re.findall(r'<video src="data:video/mp4;base64,', report)) == 1  # the newest round's clip plays
    assert "step-000004" not in report and "Clips at step 4" in report


def test_a_resumed_run_draws_the_same_clips(wan_runs):
    tmp, ref, first, resumed = wan_runs
    same_step = [e for e in first.of_type("sample") if e["step"] == 2]
    want = {e["step"]: e for e in ref.of_type("sample")}
    # The same seed and weights give the same clip, byte for byte, in another process.
    assert same_step and open(same_step[0]["video"], "rb").read() == open(want[2]["video"], "rb").read()
    after = [e for e in resumed.of_type("sample")]
    assert [e["step"] for e in after] == [4]
    ev = after[0]
    assert ev["video"].endswith(".webp") and ev["frames"] == FRAMES
    with Image.open(ev["video"]) as im:
        assert im.n_frames == FRAMES and im.size == (RES, RES) and im.is_animated
    assert open(ev["path"], "rb").read() == open(want[4]["path"], "rb").read()  # every frame, exactly
    a, b = load_file(tmp / "run" / "lora.safetensors"), load_file(tmp / "ref" / "lora.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_an_image_family_samples_images_and_ignores_the_clip_keys(tmp_path, tiny_models, dataset):
    cfg = write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models["sd15"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64, lora_rank=4,
                       max_train_steps=1, validation_steps=1, validation_inference_steps=2,
                       validation_prompts=["ohwx"], validation_frames=9, validation_video_format="webp")
    res = run_cli("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    samples = res.of_type("sample")
    assert samples and all(e["video"] is None and e["frames"] == 1 for e in samples)
    unused = {w["path"] for w in res.of_type("warning") if w["code"] == "unused_setting"}
    assert {"validation_frames", "validation_video_format"} <= unused
    assert not list((tmp_path / "out" / "samples").rglob("*.webp"))


@pytest.mark.parametrize("frames", [0, 6, 16])
def test_validation_frames_must_be_4k_plus_1(tmp_path, frames):
    from lora_trainer.config.config import parse_config
    from lora_trainer.contract.errors import ConfigError

    raw = dict(dataset_path=str(tmp_path / "d"), base_model="m", output_path=str(tmp_path / "o"), trigger_words=["x"],
               validation_frames=frames)
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert [p["path"] for p in info.value.problems] == ["validation_frames"]
    parse_config({**raw, "validation_frames": 17})  # and 4k+1 passes


def test_grid_takes_first_last_and_evenly_spaced_frames():
    assert grid_indices(17) == [0, 4, 8, 12, 16]
    assert grid_indices(81) == [0, 20, 40, 60, 80]
    assert grid_indices(3) == [0, 1, 2] and grid_indices(1) == [0]
    frames = [Image.new("RGB", (6, 4), (10 * i, 0, 0)) for i in range(9)]
    grid = np.asarray(frame_grid(frames))
    assert grid.shape == (4, 30, 3) and list(grid[0, ::6, 0]) == [0, 20, 40, 60, 80]


def test_odd_sides_are_cropped_to_even_for_h264(tmp_path):
    frames = [Image.new("RGB", (33, 21), (40 * i, 90, 200 - 40 * i)) for i in range(5)]
    write_clip(frames, tmp_path / "c.mp4", 12.5)
    (_, _, fps), decoded = _decode(tmp_path / "c.mp4")
    assert fps == 12.5 and [f.shape for f in decoded] == [(20, 32, 3)] * 5
    assert not list(tmp_path.glob(".*"))  # the temporary file was renamed into place


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: .ci/run installs Debian's chromium package")
def test_the_report_plays_the_clip_in_a_real_browser(wan_runs):
    tmp, *_ = wan_runs
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND",
                          "--no-first-run", "--virtual-time-budget=10000", "--dump-dom",
                          (tmp / "ref" / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    # The mp4 decoded its first frame (report.py's check counts "loadeddata"); the PNGs loaded.
    assert 'data-videos="1"' in body and 'data-videos-ready="1"' in body and 'data-videos-broken="0"' in body, body
    assert 'data-images-broken="0"' in body, body
