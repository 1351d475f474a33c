"""The trainer's CPU thread count: explicit settings win in a fixed order; "auto" is one thread per usable core
whatever the neighbours do, because the count decides the order CPU kernels sum in: two runs of one config must give
the same LoRA beside an idle and a busy neighbour (issue 21, item 11). Busy cores are reported, not followed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pathlib import Path

from conftest import ROOT, parse_events, write_config

PROBE = "import json, sys; from lora_trainer.runtime.device import choose_cpu_threads; " \
        "a = json.loads(sys.argv[1]); print(json.dumps(choose_cpu_threads(a[0], saved=a[1])))"


def _choose(requested=None, saved=None, env=None) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    full.update(env or {})
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps([requested, saved])], cwd=ROOT, env=full,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_explicit_sources_in_order():
    config = _choose(3, 2, {"OMP_NUM_THREADS": "4"})
    assert (config["threads"], config["source"]) == (3, "config")
    assert _choose(None, 2, {"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "PASSIVE"}) | {"cores": 0} == \
        {"threads": 4, "cores": 0, "busy_cores": None, "source": "OMP_NUM_THREADS", "wait_policy": "PASSIVE"}
    saved = _choose(None, 2)
    assert (saved["threads"], saved["source"]) == (2, "checkpoint")


def _spinner(core: int) -> subprocess.Popen:
    """A neighbour that keeps one core busy (pinned to it), running once this returns."""
    spinner = subprocess.Popen([sys.executable, "-c", "import os, sys; sys.stdout.write('go\\n'); sys.stdout.flush()\n"
                                "while True: pass"], stdout=subprocess.PIPE, text=True)
    os.sched_setaffinity(spinner.pid, {core})
    assert spinner.stdout.readline() == "go\n"
    return spinner


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


linux_two_cores = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/stat")
    or len(os.sched_getaffinity(0)) < 2, reason="Linux with two usable cores")


@linux_two_cores
def test_auto_takes_every_usable_core_beside_a_busy_neighbour():
    cores = sorted(os.sched_getaffinity(0))
    spinner = _spinner(cores[0])
    try:
        chosen = _choose()
    finally:
        _stop(spinner)
    assert chosen["source"] == "auto" and chosen["cores"] == len(cores)
    assert chosen["busy_cores"] >= 0.8, chosen  # still measured: the spinner's core, at least, for the warning
    assert chosen["threads"] == len(cores), chosen


def test_busy_cores_are_a_warning_on_the_cpu_only():
    from lora_trainer.runtime.device import cpu_warnings

    busy = {"threads": 8, "cores": 8, "busy_cores": 2.6, "source": "auto"}
    warning, = [w for w in cpu_warnings("cpu", "no", busy) if w["code"] == "cpu_cores_busy"]
    assert warning["path"] == "cpu_threads" and "cpu_threads" in warning["message"] and " 5 " in warning["message"]
    assert not [w for w in cpu_warnings("cuda", "bf16", busy) if w["code"] == "cpu_cores_busy"]
    for quiet in ({**busy, "busy_cores": 0.3}, {**busy, "busy_cores": None}, {**busy, "source": "config"}):
        assert not [w for w in cpu_warnings("cpu", "no", quiet) if w["code"] == "cpu_cores_busy"]


def test_a_cgroup_cpu_quota_caps_the_usable_cores(tmp_path):
    from lora_trainer.runtime.cpu_load import quota_cores

    (tmp_path / "cpu.max").write_text("250000 100000\n")  # docker --cpus=2.5
    assert quota_cores(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert quota_cores(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1, --cpus=1
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert quota_cores(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert quota_cores(tmp_path) is None
    assert quota_cores(tmp_path / "absent") is None


def test_busy_cores_make_idle_openmp_threads_sleep():
    """Before torch loads, busy cores set OMP_WAIT_POLICY=PASSIVE (spinning threads collapse beside a busy
    neighbour); a policy the user set is kept."""
    code = ("import json, os, sys; from lora_trainer.runtime.cpu_load import prepare_openmp; "
            "print(json.dumps([prepare_openmp(), os.environ.get('OMP_WAIT_POLICY')]))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}

    def run(**extra):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **extra}, capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)

    assert run(OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "ACTIVE"]
    if linux_two_cores.args[0]:
        return
    spinner = _spinner(sorted(os.sched_getaffinity(0))[0])
    try:
        assert run() == ["PASSIVE", "PASSIVE"]
    finally:
        _stop(spinner)


def _train(tmp_path: Path, model: Path, data: Path, name: str, **env_extra) -> tuple[list[dict], dict, dict]:
    """The real CLI with cpu_threads unset and no OMP_NUM_THREADS (conftest sets it to 1 for every other test)."""
    cfg = write_config(tmp_path / f"{name}.json", dataset_path=str(data), base_model=str(model),
                       output_path=str(tmp_path / name), trigger_words=["ohwx"], resolution=64, max_train_steps=4,
                       checkpointing_steps=None, lora_rank=4, batch_size=2)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **env_extra)
    proc = subprocess.run([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    manifest = json.loads((tmp_path / name / "training_manifest.json").read_text())
    return parse_events(proc.stdout), load_file(tmp_path / name / "lora.safetensors"), manifest


@linux_two_cores
def test_same_lora_beside_an_idle_and_a_busy_neighbour(tmp_path, tiny_models, dataset):
    """Idle, beside a spinning neighbour, and with spinning OpenMP threads forced: one LoRA, bit for bit. (On a box
    that other work keeps busy the first run sleeps its threads too; the third run still spins them.)"""
    import torch

    model = tiny_models["sd15"]
    runs = {"idle": _train(tmp_path, model, dataset, "idle")}
    spinner = _spinner(sorted(os.sched_getaffinity(0))[0])
    try:
        runs["busy"] = _train(tmp_path, model, dataset, "busy")
        runs["spinning"] = _train(tmp_path, model, dataset, "spinning", OMP_WAIT_POLICY="ACTIVE")
    finally:
        _stop(spinner)
    chosen = {name: next(e for e in ev if e["type"] == "run_started")["cpu_threads"] for name, (ev, _, _) in runs.items()}
    cores = len(os.sched_getaffinity(0))
    assert {c["threads"] for c in chosen.values()} == {cores}, chosen
    assert chosen["busy"]["busy_cores"] >= 0.8 and chosen["busy"]["wait_policy"] == "PASSIVE", chosen
    assert chosen["spinning"]["wait_policy"] == "ACTIVE", chosen
    assert [e for e in runs["busy"][0] if e["type"] == "warning" and e["code"] == "cpu_cores_busy"]
    for name, (_, _, manifest) in runs.items():
        assert manifest["device"]["cpu_threads"] == cores, (name, manifest["device"])
    idle = runs["idle"][1]
    for name in ("busy", "spinning"):
        other = runs[name][1]
        assert idle.keys() == other.keys()
        different = sorted(k for k in idle if not torch.equal(idle[k], other[k]))
        assert not different, f"{name}: {len(different)} of {len(idle)} tensors differ (threads chosen: {chosen})"
