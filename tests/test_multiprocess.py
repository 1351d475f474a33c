"""Data-parallel training with two CPU processes (gloo): one event stream from rank 0, one LoRA, each rank
trains on every 2nd batch, every rank stops at the same step when one is signalled, and a resume with another
number of processes is refused.

On GPUs one runs `accelerate launch --multi_gpu --num_processes N train_lora.py ...`, which starts the ranks
through torch.distributed.run; accelerate's own launcher has no multi-process CPU mode without MPI, so the
test starts the same ranks with torch.distributed.run directly. Accelerator() sees WORLD_SIZE=2 either way."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from _helpers import probe_env, probe_records
from conftest import ROOT, parse_events, write_config
from lora_trainer.training.checkpoint import verify_checkpoint

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
    probe = tmp_path / "probe"
    proc = subprocess.run([*ACCELERATE, str(ROOT / "train_lora.py"), "--config", str(cfg)], capture_output=True,
                          text=True, env={**_env(), **probe_env(probe)}, timeout=600)
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
    # Each rank takes every 2nd batch of the epoch's plan: within an epoch the ranks' batches are disjoint and
    # together they are the whole dataset, each image once (batch_size 1, 4 images: 2 batches per rank).
    records = probe_records(probe)
    assert [r["rank"] for r in records] == [0, 1] and all(r["world"] == 2 for r in records)
    for epoch in range(8):
        mine = [[b for b in r["batches"] if b["epoch"] == epoch] for r in records]
        assert [[b["batch_index"] for b in m] for m in mine] == [[0, 1], [0, 1]], epoch
        seen = sorted(i for m in mine for b in m for i in b["batch"])
        assert seen == [0, 1, 2, 3], (epoch, mine)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, tiny_models, dataset):
    """The ranks are started here with the environment torch.distributed.run gives them (its agent turns its own
    SIGTERM into exit 1 and re-signals the workers, hiding their exit codes). Only rank 1 gets SIGTERM, as when a
    signal reaches one process first: rank 0 must stop at the same step through the agreed flag, and both exit
    143 (128 + SIGTERM) after one checkpoint."""
    cfg = _config(tmp_path, tiny_models, dataset, max_train_steps=40, checkpointing_steps=20)
    port = _free_port()
    procs, logs = [], []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs.append(open(tmp_path / f"rank{rank}.err", "w+"))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg)],
                                      stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, stderr=logs[-1],
                                      text=True, env=env))
    lines = []
    for line in procs[0].stdout:
        lines.append(line)
        if json.loads(line)["type"] == "step" and json.loads(line)["step"] >= 2:
            procs[1].send_signal(signal.SIGTERM)
            break
    lines += procs[0].stdout.readlines()
    rcs = [p.wait(timeout=300) for p in procs]
    stderr = []
    for log in logs:
        log.seek(0)
        stderr.append(log.read())
        log.close()
    assert rcs == [143, 143], "\n".join(e[-2000:] for e in stderr)
    events = parse_events("".join(lines))
    inter = [e for e in events if e["type"] == "interrupted"]
    assert len(inter) == 1 and inter[0]["signal"] == "SIGTERM"
    stopped = [re.findall(r"rank (\d) stopped after step (\d+)", e) for e in stderr]
    assert stopped == [[("0", str(inter[0]["step"]))], [("1", str(inter[0]["step"]))]], stopped
    ckpt = Path(inter[0]["checkpoint"])
    assert ckpt.is_dir() and verify_checkpoint(ckpt)[0]
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["global_step"] == inter[0]["step"]
    assert not [e for e in events if e["type"] == "completed"]


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
    # One process cannot continue a two-process run exactly (another batch split, other generators): refused.
    single = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config",
                             str(write_config(tmp_path / "one.json", **{**json.loads((tmp_path / "c.json").read_text()),
                                                                        "output_path": str(tmp_path / "one"),
                                                                        "resume": str(tmp_path / "step-000003")}))],
                            capture_output=True, text=True, env=_env(), timeout=600)
    assert single.returncode == 2, single.stderr[-3000:]
    err = [e for e in parse_events(single.stdout) if e["type"] == "error"][-1]
    assert [p["path"] for p in err["details"]["problems"]] == ["world_size"], err


def test_two_processes_sdxl_with_text_encoder(tmp_path, tiny_models, dataset):
    """SDXL conditions on CLIP-L's second-to-last hidden state, so a LoRA on CLIP-L's last layer would get no
    gradient, and DDP (find_unused_parameters off) stops the run at step 2 when a parameter got none. The run
    completes, and CLIP-G's last layer (its pooled output is read) still trains."""
    cfg = write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models["sdxl"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64, log_every_n_steps=1,
                       lora_rank=4, max_train_steps=3, checkpointing_steps=None, train_text_encoder=True,
                       text_encoder_lr=1e-3)
    proc = subprocess.run([*ACCELERATE, str(ROOT / "train_lora.py"), "--config", str(cfg)], capture_output=True,
                          text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    events = parse_events(proc.stdout)
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    keys = load_file(tmp_path / "out" / "lora.safetensors").keys()
    layers = {te: {int(k.split("_layers_")[1].split("_")[0]) for k in keys if k.startswith(f"lora_{te}_")}
              for te in ("te1", "te2")}
    last = {te: json.loads((tiny_models["sdxl"] / enc / "config.json").read_text())["num_hidden_layers"] - 1
            for te, enc in (("te1", "text_encoder"), ("te2", "text_encoder_2"))}
    assert layers["te1"] == set(range(last["te1"])), layers  # every layer but CLIP-L's last
    assert layers["te2"] == set(range(last["te2"] + 1)), layers  # all of CLIP-G's
