"""How many cores a run may use and how busy other processes keep them, read without torch: the CLI must decide
OpenMP's wait policy before torch is imported (libgomp reads it once, when it loads).

The thread count is one per usable core whatever the load (device.choose_cpu_threads: CPU kernels split their sums
by it, so a count that followed the load would make the LoRA depend on the neighbours). The load decides only how
the idle threads of a parallel region wait: spinning (OpenMP's default) is fastest on free cores and collapses when
a neighbour holds one, since every region then waits for the thread that shares a core; PASSIVE (sleep) costs a
little on free cores and avoids that. Neither changes a result: work is split by the thread count alone.
Measured on the 2-core box (quarter SDXL, 256 px, bench/RESULTS.md): with other processes busy, 2 spinning threads
30.0 s per step, 2 sleeping threads 2.1 s, 1 thread 1.6-1.9 s; on free cores spinning 0.8-0.9 s, sleeping 1.4-1.6 s.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

_sampled: float | None = None  # prepare_openmp's measurement, reused by busy_cores_now


def busy_cores(cores: list[int], window_s: float = 0.1) -> float | None:
    """How many of ``cores`` other processes keep busy now: /proc/stat sampled over ``window_s`` (this process
    sleeps meanwhile, so the figure is the neighbours'). None where /proc/stat is not available."""
    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                name, *vals = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    ticks = [int(v) for v in vals]
                    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
                    out[int(name[3:])] = (sum(ticks), idle)
        return out

    try:
        first = sample()
        time.sleep(window_s)
        second = sample()
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for c, (total, idle) in second.items():
        d_total, d_idle = total - first[c][0], idle - first[c][1]
        busy += (1 - d_idle / d_total) if d_total > 0 else 0.0
    return busy


def busy_cores_now() -> float | None:
    """Busy cores among those this process may use: the sample prepare_openmp took at start, else a new one. None
    under a CPU quota (the threads then have more cores than they need) or without /proc/stat."""
    if _sampled is not None:
        return _sampled
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return busy_cores(affinity) if affinity and len(affinity) == usable_cores() else None


def prepare_openmp() -> str | None:
    """Before torch is imported: where other processes keep cores busy, let idle OpenMP threads sleep instead of
    spin (OMP_WAIT_POLICY=PASSIVE). An OMP_WAIT_POLICY the user set is kept. Returns the policy in effect."""
    global _sampled
    if os.environ.get("OMP_WAIT_POLICY") or "torch" in sys.modules:
        return os.environ.get("OMP_WAIT_POLICY") or None
    _sampled = busy_cores_now()
    if _sampled is not None and round(_sampled) >= 1:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY") or None


def quota_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPUs a cgroup quota allows (docker --cpus), rounded up; None without a quota. cgroup v2, then v1."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, per = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return max(1, math.ceil(q / per)) if q > 0 and per > 0 else None


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup CPU quota. Fixed for a machine (or
    container) and a launch, whatever other processes are doing."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, quota_cores() or cores)
