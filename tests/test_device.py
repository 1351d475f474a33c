"""The trainer's CPU thread count: explicit settings win in a fixed order; "auto" leaves the cores that other
processes keep busy (measured with a real spinning neighbour)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

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
    assert _choose(None, 2, {"OMP_NUM_THREADS": "4"}) | {"cores": 0} == \
        {"threads": 4, "cores": 0, "busy_cores": None, "source": "OMP_NUM_THREADS"}
    saved = _choose(None, 2)
    assert (saved["threads"], saved["source"]) == (2, "checkpoint")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/stat"), reason="Linux only")
def test_auto_leaves_a_core_a_neighbour_keeps_busy():
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    spinner = subprocess.Popen([sys.executable, "-c", "import os, sys; sys.stdout.write('go\\n'); sys.stdout.flush()\n"
                                "while True: pass"], stdout=subprocess.PIPE, text=True)
    try:
        os.sched_setaffinity(spinner.pid, {cores[0]})
        assert spinner.stdout.readline() == "go\n"
        chosen = _choose()
    finally:
        spinner.kill()
        spinner.wait()
    assert chosen["source"] == "auto" and chosen["cores"] == len(cores)
    assert chosen["busy_cores"] >= 0.8, chosen  # the spinner's core, at least
    assert chosen["threads"] == max(1, len(cores) - round(chosen["busy_cores"])) < len(cores)
