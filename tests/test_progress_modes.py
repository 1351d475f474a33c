"""--progress: JSON when stdout is a pipe, a live progress bar on a terminal, never mixed (pseudo-terminal)."""
from __future__ import annotations

import os
import pty
import subprocess
import sys

from conftest import ROOT, run_cli, write_config


def _run_on_pty(args: list[str], timeout: float = 300) -> tuple[int, str]:
    master, slave = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), *args], stdout=slave,
                            stderr=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    rc = proc.wait(timeout=timeout)
    os.close(master)
    return rc, b"".join(chunks).decode("utf-8", "replace")


def _config(tmp_path, tiny_models, dataset):
    return write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models["sd15"]),
                        output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64,
                        max_train_steps=3, log_every_n_steps=1, lora_rank=4, overwrite_output=True)


def test_terminal_gets_human_progress_and_no_json(tmp_path, tiny_models, dataset):
    cfg = _config(tmp_path, tiny_models, dataset)
    rc, text = _run_on_pty(["--config", str(cfg)])
    assert rc == 0, text[-2000:]
    assert '{"type"' not in text
    assert "training" in text and "3/3" in text and "loss=" in text and "done: 3 step(s)" in text


def test_json_forced_on_a_terminal_and_human_validation(tmp_path, tiny_models, dataset):
    cfg = _config(tmp_path, tiny_models, dataset)
    rc, text = _run_on_pty(["--config", str(cfg), "--validate-only", "--progress", "json"])
    assert rc == 0
    lines = [line for line in text.replace("\r\n", "\n").splitlines() if line.strip()]
    assert lines and all(line.startswith('{"type"') for line in lines)
    rc, text = _run_on_pty(["--config", str(cfg), "--validate-only", "--progress", "human"])
    assert rc == 0 and "validation: config OK" in text and '{"type"' not in text


def test_pipe_gets_json_even_with_human_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{}")
    res = run_cli("--config", str(p))  # auto + a pipe: JSON (validated by run_cli)
    assert res.returncode == 2 and res.last("error")["code"] == "config_invalid"
    human = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config", str(p), "--progress", "human"],
                           capture_output=True, text=True)
    assert human.returncode == 2
    assert "error (config_invalid, exit 2)" in human.stdout and '{"type"' not in human.stdout
