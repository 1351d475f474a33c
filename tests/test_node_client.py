"""examples/node_client/client.js, the command line over trainer.mjs (the typed module a web app's back end
imports), against the real trainer (broken config, a tiny training run, --stop-after-step) and against a fake
trainer that breaks the protocol. Skipped where Node.js is not installed (outside CI). The module's types, the
Next.js route example and resume: tests/test_event_types.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, write_config

NODE = shutil.which("node")
CLIENT = ROOT / "examples" / "node_client" / "client.js"  # the CLI over trainer.mjs; needs no node_modules
# CI (.ci/run) sets TRAIN_LORA_REQUIRE_NODE_TOOLS=1: there a missing node fails these tests instead of skipping them.
REQUIRED = os.environ.get("TRAIN_LORA_REQUIRE_NODE_TOOLS") == "1"
pytestmark = pytest.mark.skipif(NODE is None and not REQUIRED, reason="Node.js (node) is not installed")


@pytest.fixture(autouse=True)
def _node_present():
    if NODE is None:
        pytest.fail("TRAIN_LORA_REQUIRE_NODE_TOOLS=1 but node is not installed")


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}


def _summary(stdout: str, stderr: str) -> dict:
    lines = stdout.splitlines()
    assert len(lines) == 1, f"the client must print exactly one summary line, got {len(lines)}:\n{stdout[:2000]}\n{stderr[-3000:]}"
    summary = json.loads(lines[0])
    for key in ("exit_code", "signal", "events_by_type", "last_step", "outputs", "error", "interrupted",
                "protocol_errors"):
        assert key in summary, key
    return summary


def run_client(*args: str, timeout: float = 120) -> tuple[int, dict, str]:
    proc = subprocess.run([NODE, str(CLIENT), *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, _summary(proc.stdout, proc.stderr), proc.stderr


def _train_config(tmp_path: Path, model: Path, dataset: Path, **extra) -> Path:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / "out"),
           "trigger_words": ["ohwx"], "resolution": 64, "max_train_steps": 3, "log_every_n_steps": 1,
           "lora_rank": 4, **extra}
    return write_config(tmp_path / "config.json", **cfg)


def test_broken_config_reports_the_error_event(tmp_path):
    cfg = write_config(tmp_path / "bad.json", dataset_path=5, learning_rat=1e-4)
    rc, summary, stderr = run_client("--config", str(cfg), "--quiet", timeout=60)
    assert rc == 2 and summary["exit_code"] == 2, stderr[-3000:]
    assert summary["error"]["code"] == "config_invalid" and summary["error"]["exit_code"] == 2
    assert summary["events_by_type"] == {"error": 1}
    assert summary["protocol_errors"] == [] and summary["interrupted"] is False and summary["outputs"] is None
    assert "ERROR [config_invalid" in stderr


def test_tiny_training_run(tmp_path, tiny_models, dataset):
    cfg = _train_config(tmp_path, tiny_models["sd15"], dataset)
    started = time.monotonic()
    rc, summary, stderr = run_client("--config", str(cfg), timeout=300)
    assert rc == 0 and summary["exit_code"] == 0, stderr[-4000:]
    assert summary["protocol_errors"] == [], summary["protocol_errors"]
    counts = summary["events_by_type"]
    assert counts["step"] == 3 and counts["completed"] == 1 and counts["run_started"] == 1
    assert summary["last_step"] == 3 and summary["error"] is None and summary["interrupted"] is False
    assert summary["signal"] is None and summary["hangs"] == 0
    for kind in ("lora", "peft_lora", "manifest"):
        assert Path(summary["outputs"][kind]).is_file(), kind
    assert "step 3/3" in stderr and "ETA" in stderr  # progress on the client's stderr
    assert "  | " in stderr  # the trainer's own log is forwarded, prefixed
    print(f"tiny run through the client: {time.monotonic() - started:.1f}s")


def test_stop_after_step_interrupts_with_a_checkpoint(tmp_path, tiny_models, dataset):
    cfg = _train_config(tmp_path, tiny_models["sd15"], dataset, max_train_steps=6, checkpointing_steps=3)
    rc, summary, stderr = run_client("--config", str(cfg), "--stop-after-step", "2", "--quiet", timeout=300)
    assert rc == 143 and summary["exit_code"] == 143, stderr[-4000:]
    assert summary["interrupted"] is True and summary["signal"] == "SIGTERM"
    assert summary["forwarded_signals"] == ["SIGTERM"]
    assert summary["protocol_errors"] == [] and summary["outputs"] is None
    assert 2 <= summary["last_step"] < 6
    assert summary["checkpoints"], "a checkpoint must be reported"
    last = summary["checkpoints"][-1]  # the step's interval checkpoint when the stop lands on one, else "interrupt"
    assert last["reason"] == ("interval" if summary["interruption"]["step"] % 3 == 0 else "interrupt"), summary
    assert Path(summary["interruption"]["checkpoint"]).is_dir()


# -- a fake trainer (no torch) for what the real one never does: protocol violations, silence, signals.
FAKE_TRAINER = textwrap.dedent('''\
    import json, signal, sys, time
    from datetime import datetime, timezone
    mode = sys.argv[sys.argv.index("--mode") + 1] if "--mode" in sys.argv else "bad"
    seq = 0
    def emit(type_, run_id="fake", bump=1, **fields):
        global seq
        seq += bump
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        print(json.dumps({"type": type_, "schema_version": "1.0", "run_id": run_id, "seq": seq, "time": now,
                          **fields}), flush=True)
    if mode == "bad":
        emit("status", phase="loading_model", message="loading")
        print("Loading checkpoint shards: 100%", flush=True)            # a library print on stdout
        emit("status", bump=2, phase="training", message="skips a seq")  # seq 1 -> 3
        emit("status", run_id="other", phase="training", message="another run_id")
        emit("step", step=1, total_steps=2, epoch=0, lr=1e-4)             # no loss
        emit("telemetry", gpu_temp=70)                                     # a type from a newer trainer
        time.sleep(2.5)                                                    # silence: a hang
        sys.exit(5)                                                        # exit 5 without an error event
    else:  # "signal": wait for signals, report how many arrived, exit like the trainer
        received = []
        signal.signal(signal.SIGINT, lambda s, f: received.append(s))
        signal.signal(signal.SIGTERM, lambda s, f: received.append(s))
        emit("status", phase="training", message="ready")
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # would a duplicate arrive?
        emit("interrupted", signal=signal.Signals(received[0]).name, step=None, checkpoint=None,
             message=f"{len(received)} signal(s)")
        sys.exit(128 + received[0] if len(received) == 1 else 99)  # 99: the client sent a signal twice
''')


@pytest.fixture()
def fake_trainer(tmp_path) -> Path:
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    write_config(tmp_path / "c.json", heartbeat_seconds=30)
    return path


def test_protocol_errors_unknown_types_and_hang_are_reported(tmp_path, fake_trainer):
    rc, summary, stderr = run_client("--config", str(tmp_path / "c.json"), "--trainer", str(fake_trainer),
                                     "--events-schema", str(ROOT / "events_schema.json"),
                                     "--heartbeat-seconds", "0.2", "--", "--mode", "bad", timeout=60)
    assert rc == 5 and summary["exit_code"] == 5, stderr[-3000:]
    errors = "\n".join(summary["protocol_errors"])
    assert "line 2 is not JSON" in errors
    assert "seq 3 follows 1" in errors
    assert "run_id changed" in errors
    assert "step event lacks loss" in errors
    assert "exit 5 without an error event" in errors
    assert "telemetry" not in errors  # an unknown type is tolerated, only noted
    assert summary["unknown_types"] == ["telemetry"] and summary["events_by_type"]["telemetry"] == 1
    assert summary["hangs"] >= 1 and "HANG" in stderr


def test_sigint_and_sigterm_are_forwarded_once(tmp_path, fake_trainer):
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        proc = subprocess.Popen([NODE, str(CLIENT), "--config", str(tmp_path / "c.json"), "--trainer",
                                 str(fake_trainer), "--", "--mode", "signal"], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        seen = ""
        while "ready" not in seen and time.monotonic() < deadline:  # the client echoes status messages
            seen += proc.stderr.readline()
        assert "ready" in seen, seen
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
        summary = _summary(stdout, seen + stderr)
        assert proc.returncode == code and summary["exit_code"] == code, seen + stderr
        assert summary["interrupted"] is True and summary["signal"] == sig.name
        assert summary["forwarded_signals"] == [sig.name]
        assert summary["protocol_errors"] == []
