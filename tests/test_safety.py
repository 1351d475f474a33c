"""Safety and hygiene through the real CLI: secrets never leak, existing outputs are not overwritten, a second
signal during the save is ignored and one at any other time exits at once, and no config file (fuzzed) produces a traceback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import assert_report
from conftest import ROOT, parse_events, run_cli, write_config
from lora_trainer.training.checkpoint import find_latest_checkpoint, verify_checkpoint

SECRET = "hf_SECRETtoken1234567890"


def _cfg(tmp_path: Path, model, dataset, **extra) -> Path:
    fields = dict(dataset_path=str(dataset), base_model=str(model), output_path=str(tmp_path / "out"),
                  trigger_words=["ohwx"], resolution=64, max_train_steps=2, log_every_n_steps=1, lora_rank=4)
    return write_config(tmp_path / "c.json", **{**fields, **extra})


def test_hf_token_never_leaks(tmp_path, tiny_models, dataset):
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset)), "--debug",
                  env={"HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET})
    assert res.returncode == 0, res.stderr[-2000:]
    assert SECRET not in res.stdout and SECRET not in res.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_existing_final_lora_is_not_overwritten(tmp_path, tiny_models, dataset):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"precious")
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset)))
    assert res.returncode == 2
    assert any(p.get("code") == "output_exists" for p in res.last("error")["details"]["problems"])
    assert (out / "lora.safetensors").read_bytes() == b"precious"


def _second_signal_at(tmp_path: Path, cfg: Path, hold: str, *, first: signal.Signals | None = None):
    """Run the CLI and stop it twice. The first signal comes during step 2 (the TRAIN_LORA_TEST_SIGTERM_STEP hook)
    or, with `first`, from here once step 2 is reported. The trainer then waits at `hold` (TRAIN_LORA_TEST_HOLD,
    see signals.py), announcing it on stderr, until the second signal (SIGTERM) comes. It is sent only after the
    announcement and after a heartbeat event (heartbeat_seconds 1) proves the stream stays alive while the trainer
    is silent. Two back-to-back kill() calls would be one signal (standard signals do not queue); a sleep would race.
    Returns (exit code, events, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TRAIN_LORA_TEST_HOLD": hold}
    if first is None:
        env["TRAIN_LORA_TEST_SIGTERM_STEP"] = "2"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    announced, stderr = threading.Event(), []

    def read_stderr():
        for line in proc.stderr:
            stderr.append(line)
            if line.strip() == f"train_lora test hold: {hold}":
                announced.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    lines, sent_first, sent_second = [], first is None, False
    for line in proc.stdout:
        lines.append(line)
        ev = json.loads(line)
        if not sent_first and ev["type"] == "step" and ev["step"] >= 2:
            proc.send_signal(first)
            sent_first = True
        if not sent_second and announced.is_set() and ev["type"] == "heartbeat":
            proc.send_signal(signal.SIGTERM)
            sent_second = True
    rc = proc.wait(timeout=120)
    reader.join(timeout=30)
    assert sent_second, "the trainer never reached the hold:\n" + "".join(stderr)[-3000:]
    return rc, parse_events("".join(lines)), "".join(stderr)


def _assert_heartbeat_while_held(events: list[dict]) -> None:
    """The trainer was silent in the hold: the heartbeat filled the silence, in the training phase."""
    last_step = max(i for i, e in enumerate(events) if e["type"] == "step")
    beats = [e for e in events[last_step:] if e["type"] == "heartbeat"]
    assert beats and all(b["phase"] == "training" and b["idle_s"] >= 1 for b in beats), beats


def test_sigint_stops_with_exit_130_and_a_second_signal_during_the_save_is_ignored(tmp_path, tiny_models, dataset):
    cfg = _cfg(tmp_path, tiny_models["sd15"], dataset, max_train_steps=30, checkpointing_steps=30,
               heartbeat_seconds=1)
    rc, events, stderr = _second_signal_at(tmp_path, cfg, "saving", first=signal.SIGINT)
    assert rc == 130, stderr[-2000:]  # the first signal's code: the SIGTERM during the save changed nothing
    inter = [e for e in events if e["type"] == "interrupted"]
    assert len(inter) == 1 and inter[0]["signal"] == "SIGINT" and inter[0]["step"] >= 2, inter
    # The save went on to the end: the checkpoint is complete, under its real name, and the interrupt names it.
    ckpt = tmp_path / "out" / "checkpoints" / f"step-{inter[0]['step']:06d}"
    assert inter[0]["checkpoint"] == str(ckpt) and verify_checkpoint(ckpt)[0]
    assert find_latest_checkpoint(tmp_path / "out" / "checkpoints") == ckpt
    assert [d.name for d in (tmp_path / "out" / "checkpoints").iterdir()] == [ckpt.name], "no temporary left"
    _assert_heartbeat_while_held(events)
    assert_report(tmp_path / "out", status="interrupted", step=inter[0]["step"], total_steps=30)  # on interruption too
    assert "Traceback" not in stderr


def test_second_signal_before_the_save_exits_at_once(tmp_path, tiny_models, dataset):
    cfg = _cfg(tmp_path, tiny_models["sd15"], dataset, max_train_steps=30, checkpointing_steps=30,
               heartbeat_seconds=1)
    rc, events, stderr = _second_signal_at(tmp_path, cfg, "stop_requested")
    assert rc == 143, stderr[-2000:]
    inter = [e for e in events if e["type"] == "interrupted"]
    # The operator insisted: no checkpoint is written, and nothing half-written is left either.
    assert len(inter) == 1 and inter[0]["checkpoint"] is None, inter
    assert not [e for e in events if e["type"] == "checkpoint"]
    ckpts = tmp_path / "out" / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir())
    assert "rank 0 stopped after step 2" in stderr
    _assert_heartbeat_while_held(events)
    assert "Traceback" not in stderr


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=120),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                              lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                                  ["dataset_path", "base_model", "output_path", "trigger_words", "training_params",
                                   "lora_rank", "resolution", "resume", "x"]), c, max_size=5), max_leaves=12)
                 .map(lambda v: json.dumps(v).encode())))
def test_fuzzed_config_files_never_crash_the_cli(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("fuzz") / "c.json"
    p.write_bytes(data)
    res = run_cli("--config", str(p), "--validate-only", timeout=60)
    assert res.returncode in (0, 2), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    if res.returncode == 2:
        assert res.last("error")["code"] == "config_invalid"
