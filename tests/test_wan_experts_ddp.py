"""Two processes (gloo, CPU) training both Wan 2.2 A14B experts: a step whose samples on one process all go to one
expert and on the other to the other expert must neither hang nor pair one expert's gradient reduction with the
other's (DDP would: distributed/routed.py). Each step every process ends with the same LoRA weights, both experts
learn, and the run completes. Started as tests/test_multiprocess.py starts its ranks (torch.distributed.run)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import ROOT, parse_events, write_config
from lora_trainer.families.wan.experts import EXPERTS

LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]

# Records, per process and step, the experts its micro-batch went to and a checksum of its LoRA weights after the
# optimizer step (imported by every rank through PYTHONPATH; patches the modules once the CLI has imported them).
_SITE = r'''
import importlib.abc, importlib.machinery, json, os, sys

_OUT = os.path.join(os.environ["XGAPS_ROUTE_DIR"], f"rank{os.environ.get('RANK', '0')}.jsonl")


def _log(**rec):
    with open(_OUT, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def _patch(name, module):
    if name.endswith("wan.adapter"):
        real = module.Wan.route

        def route(self, t):
            names = real(self, t)
            _log(route=names)
            return names

        module.Wan.route = route
    else:
        real = module.Trainer._optimizer_step

        def step(self, *a, **k):
            out = real(self, *a, **k)
            total = sum(float(p.detach().double().sum()) for m in self.lora_modules.values()
                        for p in m.parameters() if p.requires_grad)
            _log(step=self.progress.global_step + 1, weights=total)
            return out

        module.Trainer._optimizer_step = step


class _After(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in ("lora_trainer.families.wan.adapter", "lora_trainer.training.trainer"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _patch(name, module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _After())
'''


def test_two_processes_train_both_experts_when_a_step_splits_them(tmp_path, tiny_models, dataset):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(_SITE)
    # batch_size 1: each process's step goes to one expert; seed 3 gives steps where the two processes' experts
    # differ (asserted below from what each process routed).
    cfg = write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models["wan22-a14b"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64,
                       min_bucket_resolution=64, log_every_n_steps=1, lora_rank=4, lora_alpha=8, batch_size=1,
                       max_train_steps=6, checkpointing_steps=None, learning_rate=2e-3, max_sequence_length=32,
                       seed=3)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "XGAPS_ROUTE_DIR": str(probe),
           "PYTHONPATH": os.pathsep.join(p for p in (str(probe), str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    # A hang is the failure this guards against: the timeout turns it into one (its own session, so that the ranks
    # go with the launcher).
    proc = subprocess.Popen([*LAUNCH, str(ROOT / "train_lora.py"), "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the two processes hung (a gradient reduction one of them never joined)") from None
    assert proc.returncode == 0, stderr[-4000:]
    events = parse_events(stdout)
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert all(e["loss"] is not None for e in events if e["type"] == "step")

    ranks = [[json.loads(line) for line in (probe / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    routes = [[set(rec["route"]) for rec in recs if "route" in rec] for recs in ranks]
    assert len(routes[0]) == len(routes[1]) == 6
    split = [i + 1 for i, (a, b) in enumerate(zip(*routes)) if a != b]
    assert split, f"no step sent the two processes to different experts: {routes}"
    # the same weights on both processes after every step (the same optimizer step everywhere)
    weights = [[rec["weights"] for rec in recs if "weights" in rec] for recs in ranks]
    assert len(weights[0]) == 6 and weights[0] == weights[1], weights

    for name, expert in EXPERTS.groups:
        state = load_file(tmp_path / "out" / f"pytorch_lora_weights_{name}.safetensors")
        ups = [v for k, v in state.items() if "lora_B" in k]
        assert ups and max(float(u.abs().max()) for u in ups) > 0, f"{expert} did not learn"
        assert all(torch.isfinite(v).all() for v in state.values())
