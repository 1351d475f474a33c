"""Safety and hygiene through the real CLI: secrets never leak, existing outputs are not overwritten, a second
signal during the save corrupts nothing, and no config file (fuzzed) produces a traceback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, parse_events, run_cli, write_config
from lora_trainer.checkpoint import find_latest_checkpoint, verify_checkpoint

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


def test_second_sigterm_during_save_leaves_a_valid_checkpoint(tmp_path, tiny_models, dataset):
    cfg = _cfg(tmp_path, tiny_models["sd15"], dataset, max_train_steps=30, checkpointing_steps=10)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if json.loads(line)["type"] == "step" and json.loads(line)["step"] >= 2:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)  # e.g. an impatient operator: must not corrupt the save
            break
    lines += proc.stdout.readlines()
    rc = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    parse_events("".join(lines))
    assert rc == 143, stderr[-2000:]
    latest = find_latest_checkpoint(tmp_path / "out" / "checkpoints")
    if latest is not None:  # the second signal may have arrived before the save began: then no checkpoint
        assert verify_checkpoint(latest)[0]
    for d in (tmp_path / "out" / "checkpoints").glob("step-*"):
        assert verify_checkpoint(d)[0], f"{d} is visible but invalid"
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
