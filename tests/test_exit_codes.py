"""The exit codes the README documents and no other test reaches, through the real CLI: 1 (internal_error),
3 (dataset_invalid) and 7 (io_error), each before training (preflight) and, where it can happen, mid-run.
(2, 4, 5, 6, 130 and 143 are in test_trainer.py, test_robustness.py, test_safety.py and test_resume.py.)"""
from __future__ import annotations

import resource
import signal
from pathlib import Path

from _helpers import probe_env
from conftest import run_cli, write_config


def _cfg(tmp_path: Path, model, dataset: Path, **extra) -> Path:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / "out"),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "max_train_steps": 3,
           "log_every_n_steps": 1, "lora_rank": 4, **extra}
    return write_config(tmp_path / "c.json", **cfg)


def _assert_error(res, exit_code: int, code: str) -> dict:
    assert res.returncode == exit_code, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.last("error")
    assert err["code"] == code and err["exit_code"] == exit_code and err["message"], err
    assert "Traceback" not in res.stderr
    return err


def test_a_bug_is_exit_1_internal_error_with_the_debug_hint(tmp_path, tiny_models, dataset):
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset)),
                  env={**probe_env(tmp_path / "probe"), "TRAIN_LORA_PROBE_BUG_STEP": "2"})
    err = _assert_error(res, 1, "internal_error")
    assert err["message"].startswith("KeyError") and "--debug" in err["hint"]
    assert [e["step"] for e in res.of_type("step")] == [1]


def test_unusable_dataset_is_exit_3(tmp_path, tiny_models, dataset):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _assert_error(run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], empty))), 3, "dataset_invalid")
    assert str(empty) in err["message"] or "image" in err["message"]
    # Every image passes the scan (headers and chunk structure intact) but no pixels decode: found when the
    # trainer decodes them after loading the model, still exit 3 (as test_robustness damages one image).
    for jpg in dataset.glob("*.jpg"):
        jpg.unlink()  # JPEG decoders shrug off damaged data; PNG's zlib does not
    for png in sorted(dataset.glob("*.png")):
        raw = bytearray(png.read_bytes())
        start = raw.index(b"IDAT") + 8
        raw[start:start + 40] = b"\x00" * 40
        png.write_bytes(bytes(raw))
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, cache_latents=False)))
    err = _assert_error(res, 3, "dataset_invalid")
    assert "could be decoded" in err["message"] and res.of_type("warning")
    assert not res.of_type("step")


def test_unwritable_output_is_exit_7(tmp_path, tiny_models, dataset):
    # Before training: output_path is a file.
    (tmp_path / "out").write_text("not a folder")
    err = _assert_error(run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset))), 7, "io_error")
    assert "output_path" in {p["path"] for p in err["details"]["problems"]}


def test_write_failure_mid_run_is_exit_7_and_leaves_no_half_checkpoint(tmp_path, tiny_models, dataset):
    """A file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) fails writes past 64 KiB with EFBIG, as a full disk
    or quota would: the first checkpoint cannot be written."""
    import subprocess
    import sys

    from conftest import ROOT, parse_events

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: writes fail instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    cfg = _cfg(tmp_path, tiny_models["sd15"], dataset, checkpointing_steps=1)
    proc = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg)], capture_output=True,
                          text=True, timeout=300, preexec_fn=limit_files,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    events = parse_events(proc.stdout)
    assert proc.returncode == 7, proc.stderr[-3000:]
    err = [e for e in events if e["type"] == "error"][-1]
    assert err["code"] == "io_error" and "checkpoint step 1" in err["message"], err
    assert "Traceback" not in proc.stderr
    ckpts = tmp_path / "out" / "checkpoints"
    assert not ckpts.exists() or not list(ckpts.glob("step-*")), "a failed save must not leave a checkpoint"
