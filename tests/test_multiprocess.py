"""Data-parallel training with two CPU processes (gloo): one event stream from rank 0, one LoRA, every rank
stops at the same step when the launcher is interrupted.

On GPUs one runs `accelerate launch --multi_gpu --num_processes N train_lora.py ...`, which starts the ranks
through torch.distributed.run; accelerate's own launcher has no multi-process CPU mode without MPI, so the
test starts the same ranks with torch.distributed.run directly. Accelerator() sees WORLD_SIZE=2 either way."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from conftest import ROOT, parse_events, write_config

ACCELERATE = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _config(tmp_path: Path, tiny_models, dataset, **extra) -> Path:
    return write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models["sd15"]),
                        output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64,
                        log_every_n_steps=1, lora_rank=4, **extra)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_two_processes_one_stream_one_lora(tmp_path, tiny_models, dataset):
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]
    cfg = _config(tmp_path, tiny_models, dataset, max_train_steps=16, checkpointing_steps=8, learning_rate=3e-3,
                  target_modules=targets)
    proc = subprocess.run([*ACCELERATE, str(ROOT / "train_lora.py"), "--config", str(cfg)], capture_output=True,
                          text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = parse_events(proc.stdout)  # one process's stream: seq without gaps or duplicates, one run_id
    started = [e for e in events if e["type"] == "run_started"]
    assert len(started) == 1 and started[0]["world_size"] == 2 and started[0]["effective_batch_size"] == 2
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, f"loss must decrease: {losses}"
    assert len([e for e in events if e["type"] == "completed"]) == 1
    lora = load_file(tmp_path / "out" / "lora.safetensors")
    assert lora and sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == [
        "lora.safetensors", "pytorch_lora_weights.safetensors"]


def test_sigterm_to_launcher_stops_all_ranks_with_a_checkpoint(tmp_path, tiny_models, dataset):
    cfg = _config(tmp_path, tiny_models, dataset, max_train_steps=40, checkpointing_steps=20)
    proc = subprocess.Popen([*ACCELERATE, str(ROOT / "train_lora.py"), "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if json.loads(line)["type"] == "step" and json.loads(line)["step"] >= 2:
            os.killpg(proc.pid, signal.SIGTERM)  # what `docker stop` does to the whole container
            break
    lines += proc.stdout.readlines()
    rc = proc.wait(timeout=300)
    stderr = proc.stderr.read()
    events = parse_events("".join(lines))
    inter = [e for e in events if e["type"] == "interrupted"]
    assert inter, stderr[-3000:]
    assert rc != 0
    ckpt = Path(inter[-1]["checkpoint"])
    assert ckpt.is_dir() and (ckpt / "manifest.json").is_file()
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["global_step"] == inter[-1]["step"]


def test_two_process_resume_is_bitwise_identical(tmp_path, tiny_models, dataset):
    """Each rank draws its own noise and LoRA-dropout masks; a checkpoint must restore every rank's generators,
    not rank 0's everywhere, for the resumed run to end on the uninterrupted run's exact weights."""
    def run(cfg):
        proc = subprocess.run([*ACCELERATE, str(ROOT / "train_lora.py"), "--config", str(cfg)], capture_output=True,
                              text=True, env=_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return parse_events(proc.stdout)

    common = dict(max_train_steps=6, checkpointing_steps=3, learning_rate=3e-3, lora_dropout=0.2, seed=5)
    run(_config(tmp_path, tiny_models, dataset, **common))
    ref = tmp_path / "out"
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(ref / "checkpoints" / "step-000003", tmp_path / "step-000003")
    events = run(write_config(tmp_path / "r.json", **{**json.loads((tmp_path / "c.json").read_text()),
                                                      "output_path": str(resumed_dir),
                                                      "resume": str(tmp_path / "step-000003")}))
    assert [e["step"] for e in events if e["type"] == "resumed"] == [3]
    a, b = load_file(ref / "lora.safetensors"), load_file(resumed_dir / "lora.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
