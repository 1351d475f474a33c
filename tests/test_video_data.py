"""data/video.py: header facts, frame choice by time (constant and variable rates, GIF durations), 4k+1 lengths,
the short-clip rules, start choices, decoding and the clip tensor; on clips generated here (testing/video.py)."""
from __future__ import annotations

import numpy as np
import pytest

from lora_trainer.data import video as V
from lora_trainer.testing.video import frame_index, write_animated, write_broken, write_clip


def _av():
    return pytest.importorskip("av", reason="PyAV not installed (the video extra)")


# -- pure sampling rules -------------------------------------------------------------------------------
def test_4k1_lengths_and_short_clip_rules():
    assert [V.largest_4k1(n) for n in (1, 4, 5, 8, 9, 16, 17)] == [1, 1, 5, 5, 9, 13, 17]
    assert V.clip_length(40, 17) == 17
    assert V.clip_length(11, 17, "shorten") == 9
    assert V.clip_length(11, 17, "pad") == 17
    assert V.clip_length(11, 17, "skip") is None
    with pytest.raises(ValueError):
        V.clip_length(11, 16)
    # 1 s at 16 fps: frames show at 0, 1/16 ... 15/16.
    assert V.frames_at(1.0, 16) == 16 and V.frames_at(1.01, 16) == 17 and V.frames_at(0.01, 16) == 1


def test_windows_are_spread_over_the_slack_and_chosen_per_epoch():
    kw = dict(duration=4.0, target_fps=16, frames=17)
    slack = 4.0 - 17 / 16
    assert V.window_starts(**kw, windows=3, start="first") == [0.0]
    assert V.window_starts(**kw, windows=3, start="uniform") == pytest.approx([0.0, slack / 2, slack])
    assert V.window_starts(**kw, windows=1, start="random") == [0.0]
    assert V.window_starts(duration=1.0, target_fps=16, frames=17, windows=3, start="random") == [0.0]  # no slack
    assert [V.window_index(3, start="uniform", epoch=e) for e in range(6)] == [0, 1, 2, 0, 1, 2]
    assert V.window_index(3, start="first", epoch=4) == 0
    r = [V.window_index(3, start="random", epoch=e, seed=3, key="a.mp4") for e in range(12)]
    assert r == [V.window_index(3, start="random", epoch=e, seed=3, key="a.mp4") for e in range(12)]
    assert set(r) == {0, 1, 2}
    assert r != [V.window_index(3, start="random", epoch=e, seed=4, key="a.mp4") for e in range(12)]
    assert r != [V.window_index(3, start="random", epoch=e, seed=3, key="b.mp4") for e in range(12)]


def test_times_clamp_past_the_end_and_pick_the_frame_on_screen():
    assert V.sample_times(1.0, 4, 6)[-2:] == [1.0 - 1e-6] * 2  # a padded clip repeats its last frame
    starts = [0.0, 0.05, 0.1, 0.3]
    assert V.source_indices(starts, [0.0, 0.049, 0.05, 0.2, 0.29, 0.31, 9.0]) == [0, 0, 1, 2, 2, 3, 3]


# -- Pillow: animated GIF / WebP ---------------------------------------------------------------------------
def test_gif_with_variable_durations(tmp_path):
    g = write_animated(tmp_path / "g.gif", frames=10, durations_ms=[50] * 5 + [150] * 5)
    info = V.probe(g)
    assert (info.width, info.height, info.frames, info.vfr) == (40, 24, 10, True)
    assert info.duration == pytest.approx(1.0)
    frames = V.read_frames(g, [0.0, 0.1, 0.2, 0.3, 0.5, 0.99])
    assert frames.shape == (6, 24, 40, 3)
    assert [frame_index(f) for f in frames] == [0, 2, 4, 5, 6, 9]


def test_webp_clip_by_the_short_clip_rules(tmp_path):
    w = write_animated(tmp_path / "w.webp", frames=6, durations_ms=100)
    info = V.probe(w)
    assert (info.fps, info.frames, info.vfr) == (pytest.approx(10.0), 6, False)

    def load(short_clip):  # as the scan sizes a clip (video_scan.audit_clip) and data/clips.py reads its window
        n = V.clip_length(V.frames_at(info.duration, 5), 5, short_clip)
        if n is None:
            return None
        t0 = V.window_starts(info.duration, 5, n)[0]
        return V.read_frames(w, V.sample_times(info.duration, 5, n, t0)), t0

    got, t0 = load("pad")
    # 0.6 s at 5 fps: frames at 0, 0.2, 0.4, then padded with the last one.
    assert t0 == 0.0 and [frame_index(f) for f in got] == [0, 2, 4, 5, 5]
    assert load("skip") is None
    got, _ = load("shorten")
    assert len(got) == 1


def test_clip_tensor_layout_and_range():
    frames = np.stack([np.full((30, 50, 3), 255 * (i % 2), np.uint8) for i in range(5)])
    x = V.to_tensor(frames, (32, 16))
    assert x.shape == (3, 5, 16, 32)
    assert float(x[:, 0].max()) == -1.0 and float(x[:, 1].min()) == 1.0
    flipped = V.to_tensor(frames, (32, 16), flip=True)
    assert flipped.shape == x.shape


# -- PyAV: real containers ----------------------------------------------------------------------------
def test_mp4_header_and_window_at_a_lower_fps(tmp_path):
    _av()
    p = write_clip(tmp_path / "a.mp4", frames=30, fps=24, width=50, height=34)
    info = V.probe(p)
    assert (info.codec, info.width, info.height, info.frames, info.frames_estimated, info.vfr) == \
        ("h264", 50, 34, 30, False, False)
    assert info.fps == pytest.approx(24) and info.duration == pytest.approx(1.25)
    # 12 fps from 0.5 s: every other source frame from frame 12 (the decoder seeks to a keyframe before it).
    frames = V.read_frames(p, V.sample_times(info.duration, 12, 9, 0.5))
    assert [frame_index(f) for f in frames] == list(range(12, 30, 2))
    # Upsampling to 48 fps shows each source frame twice.
    frames = V.read_frames(p, V.sample_times(info.duration, 48, 5))
    assert [frame_index(f) for f in frames] == [0, 0, 1, 1, 2]


def test_variable_frame_rate_is_detected_and_sampled_by_time(tmp_path):
    _av()
    durations = [0.04] * 10 + [0.1] * 10
    for suffix in (".mkv", ".mp4"):
        p = write_clip(tmp_path / f"v{suffix}", frames=20, fps=25, durations=durations)
        info = V.probe(p)
        assert info.vfr and info.frames == 20, (suffix, info)
        frames = V.read_frames(p, V.sample_times(info.duration, 10, 9))
        assert [frame_index(f) for f in frames] == [0, 2, 5, 7, 10, 11, 12, 13, 14], suffix


def test_webm_odd_rate_counts_packets_and_broken_files_are_classified(tmp_path):
    _av()
    p = write_clip(tmp_path / "c.webm", frames=9, fps=30000 / 1001, width=34, height=18, codec="libvpx-vp9")
    info = V.probe(p)
    assert (info.codec, info.frames, info.frames_estimated, info.vfr) == ("vp9", 9, False, False)
    assert info.fps == pytest.approx(29.97, abs=0.05)
    broken = write_broken(tmp_path / "b.mp4", write_clip(tmp_path / "ok.mp4", frames=10, fps=10))
    with pytest.raises(V.VideoError) as e:
        V.probe(broken)
    assert e.value.code == "not_a_video"
    (tmp_path / "t.mp4").write_bytes(b"not a video at all")
    with pytest.raises(V.VideoError):
        V.probe(tmp_path / "t.mp4")


# -- the --validate-only audit (preflight/video_scan.py) ---------------------------------------------------------
def test_audit_lists_broken_and_short_clips_and_reads_headers_only(tmp_path, monkeypatch):
    _av()
    from lora_trainer.preflight import video_scan

    ok = write_clip(tmp_path / "a_ok.mp4", frames=40, fps=24)
    write_clip(tmp_path / "b_short.mp4", frames=6, fps=24)  # 0.25 s: 4 frames at 16 fps
    write_broken(tmp_path / "c_broken.mp4", ok)
    (tmp_path / "d_empty.mkv").write_bytes(b"")
    write_animated(tmp_path / "sub" / "e.gif" if (tmp_path / "sub").mkdir() is None else None, frames=12,
                   durations_ms=80)
    (tmp_path / "notes.txt").write_text("x")
    files = video_scan.video_files(tmp_path)
    assert [f[1] for f in files] == ["a_ok.mp4", "b_short.mp4", "c_broken.mp4", "d_empty.mkv", "sub/e.gif"]
    # No frame is decoded past the first: count decode calls through PyAV's container.
    import av.container

    decoded = []
    real = av.container.InputContainer.decode

    def counting(self, *a, **k):
        for f in real(self, *a, **k):
            decoded.append(f)
            yield f
    monkeypatch.setattr(av.container.InputContainer, "decode", counting)
    audit = video_scan.audit_clips(files, target_fps=16, frames=17, short_clip="skip")
    assert len(decoded) == 2  # the two readable mp4s' first frames, nothing else
    s = audit.summary()
    assert (s["clips"], s["usable"]) == (5, 1), s
    # The GIF: 12 x 80 ms = 0.96 s, 16 frames at 16 fps: short of 17.
    assert {b["file"]: b["problem"]["code"] for b in s["bad"]} == {
        "b_short.mp4": "too_short", "c_broken.mp4": "not_a_video", "d_empty.mkv": "zero_byte",
        "sub/e.gif": "too_short"}
    assert s["frame_buckets"] == {"17": 1}
    shortened = video_scan.audit_clips(files, target_fps=16, frames=17, short_clip="shorten").summary()
    assert shortened["usable"] == 3 and shortened["frame_buckets"] == {"1": 1, "13": 1, "17": 1}


def test_clip_buckets_keep_the_token_budget():
    from lora_trainer.data.buckets import make_buckets

    spatial = make_buckets(480, 256, 832, 64)
    budget = V.tokens(81, 480, 480)  # 21 latent frames of 30 x 30 tokens
    assert V.latent_frames(81) == 21 and V.latent_frames(1) == 1
    n, w, h = V.clip_bucket(832, 480, 81, spatial, budget)
    assert w > h and (n - 1) % 4 == 0 and V.tokens(n, w, h) <= budget
    assert V.clip_bucket(480, 480, 81, spatial, budget) == (81, 448, 448)  # 64-px steps: the square is 448
    assert V.clip_bucket(480, 480, 33, spatial, budget)[0] == 33  # shorter clips keep their own length
    assert V.clip_bucket(480, 480, 1, spatial, budget)[0] == 1  # an image
    assert V.clip_bucket(480, 480, 81, spatial, V.tokens(17, 480, 480))[0] == 17  # a tighter budget cuts frames


def test_validate_only_audits_the_clips_beside_the_images(tmp_path, tiny_models, dataset):
    """--validate-only on a folder of images and clips for Wan (a family that trains clips): the clips' header facts
    in summary.dataset.videos, a broken and a too-short clip listed (video_unreadable), the usable one counted as a
    sample (tests/test_video_train.py has an image family's video_not_trained)."""
    import shutil

    from conftest import run_cli, write_config

    _av()
    data = tmp_path / "mixed"
    shutil.copytree(dataset, data)
    ok = write_clip(data / "clip_ok.mp4", frames=40, fps=24, width=64, height=48)
    (data / "clip_ok.txt").write_text("ohwx, a square moving right")
    write_clip(data / "clip_short.webm", frames=3, fps=30, codec="libvpx-vp9")
    write_broken(data / "clip_broken.mp4", ok)
    cfg = write_config(tmp_path / "c.json", dataset_path=str(data), base_model=str(tiny_models["wan21"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64, video_frames=17,
                       video_short_clip="skip")
    res = run_cli("--config", str(cfg), "--validate-only")
    assert res.returncode == 0, res.stderr[-3000:]
    validation = res.last("validation")
    videos = validation["summary"]["dataset"]["videos"]
    assert (videos["clips"], videos["usable"], videos["frame_buckets"]) == (3, 1, {"17": 1})
    assert {b["file"]: b["problem"]["code"] for b in videos["bad"]} == {"clip_broken.mp4": "not_a_video",
                                                                         "clip_short.webm": "too_short"}
    codes = {w["code"]: w for w in validation["warnings"]}
    assert len(codes["video_unreadable"]["files"]) == 2 and "video_not_trained" not in codes
    dataset = validation["summary"]["dataset"]
    images = sum(p.suffix in (".png", ".jpg", ".webp") for p in data.iterdir())
    assert dataset["clips"] == 1 and dataset["samples_per_epoch"] == dataset["usable"] == images + 1
    # The bad clips are not listed as images too.
    assert not any("clip_" in f for w in validation["warnings"] if w["code"] == "image_unreadable" for f in w["files"])


def test_video_frames_must_be_4k_plus_1(tmp_path):
    from lora_trainer.config.config import parse_config
    from lora_trainer.contract.errors import ConfigError

    base = {"dataset_path": str(tmp_path / "d"), "base_model": str(tmp_path / "m"), "output_path": str(tmp_path / "o"),
            "trigger_words": ["ohwx"]}
    assert parse_config({**base, "video_frames": 33}, base_dir=tmp_path)[0].video_frames == 33
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "video_frames": 32}, base_dir=tmp_path)
    assert [p["path"] for p in e.value.problems] == ["video_frames"]
