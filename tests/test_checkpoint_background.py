"""Interval checkpoints are written on a thread while training goes on (training/background.py): the snapshot is
taken at the step boundary, the ``checkpoint`` event comes once the files are durable, SIGTERM waits for a write in
flight, a failed write stops the run on the training thread, and the run still resumes bitwise."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, parse_events, run_cli, write_config
from lora_trainer.contract.errors import OutputError
from lora_trainer.training.background import BackgroundWriter
from lora_trainer.training.checkpoint import verify_checkpoint


def test_one_write_in_flight_and_its_error_reaches_the_caller():
    order: list[str] = []
    writer = BackgroundWriter()

    def slow():
        time.sleep(0.3)
        order.append("first done")

    writer.submit(slow)
    assert writer.busy
    writer.submit(lambda: order.append("second started"))  # waits for the first: never two snapshots in flight
    writer.wait()
    assert order == ["first done", "second started"]

    writer.submit(lambda: (_ for _ in ()).throw(OutputError("disk full while saving checkpoint step 4")))
    while writer.busy:
        time.sleep(0.01)
    with pytest.raises(OutputError, match="disk full"):
        writer.check()  # raised on the caller's thread, where errors become exit codes
    assert writer.wait() is None  # reported once


def test_training_goes_on_while_a_checkpoint_is_written_and_sigterm_waits_for_it(tmp_path, tiny_models, dataset):
    def cfg(name, steps):
        return write_config(tmp_path / f"{name}.json", dataset_path=str(dataset), base_model=str(tiny_models["sd15"]),
                            output_path=str(tmp_path / name), trigger_words=["ohwx"], resolution=64,
                            max_train_steps=steps, checkpointing_steps=2, log_every_n_steps=1, lora_rank=4,
                            background_checkpoints=True)

    held = cfg("held", 8)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TRAIN_LORA_TEST_HOLD": "checkpoint_write"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(held)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    announced, stderr = threading.Event(), []

    def read_stderr():
        for line in proc.stderr:
            stderr.append(line)
            if line.strip() == "train_lora test hold: checkpoint_write":
                announced.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    lines, sent = [], False
    for line in proc.stdout:
        lines.append(line)
        ev = json.loads(line)
        # Step 2's write is held on its thread; step 3 finishing proves the loop did not wait for it.
        if not sent and announced.is_set() and ev["type"] == "step" and ev["step"] >= 3:
            proc.send_signal(signal.SIGTERM)  # also releases the hold
            sent = True
    rc = proc.wait(timeout=120)
    assert sent and rc == 143, "".join(stderr)[-3000:]
    events = parse_events("".join(lines))
    kinds = [(e["type"], e.get("step")) for e in events]
    first_ckpt = kinds.index(("checkpoint", 2))
    assert ("step", 3) in kinds[:first_ckpt], kinds  # the event came once the files were durable, after step 3
    interrupted = next(e for e in events if e["type"] == "interrupted")
    for e in events:
        if e["type"] == "checkpoint":
            assert verify_checkpoint(e["path"])[0], e
    assert interrupted["checkpoint"] and verify_checkpoint(interrupted["checkpoint"])[0]
    assert not [p for p in (tmp_path / "held" / "checkpoints").iterdir() if p.name.startswith(".")], "scratch left"

    resumed = run_cli("--config", str(held), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = run_cli("--config", str(cfg("whole", 8)))
    assert whole.returncode == 0, whole.stderr[-3000:]
    a = load_file(tmp_path / "held" / "checkpoints" / "step-000008" / "lora_unet.safetensors")
    b = load_file(tmp_path / "whole" / "checkpoints" / "step-000008" / "lora_unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume after a held write not exact"
