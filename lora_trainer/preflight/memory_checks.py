"""Preflight's memory checks (no torch): the memory plan judged against the GPU this process will use, with hints
that fit when it does not; a warning where the GPU cannot be told; the streamed blocks' pinned host memory over every
process of the run on this machine; shard_base with one process. Issues have preflight's shape (model_checks._issue).
"""
from __future__ import annotations

import json
import os
from typing import Any

from .model_checks import _issue


def detect_run_gpu(cfg: Any) -> dict | None:
    from .gpu import detect_gpu

    return detect_gpu() if cfg.device != "cpu" else None


def check_memory(cfg: Any, probe: Any, family: str | None, resolution: int | None, gpu: dict | None,
                 caches: dict | None, errors: list, warnings: list, frames: int = 1) -> dict | None:
    """The memory plan (``frames``: the largest clip bucket a video family trains, 1 for images); on a GPU too small
    for it, an error whose hint lists settings that would fit; where the GPU (or its free memory) cannot be told, a
    warning instead of a verdict."""
    from .memory_plan import HINT_HEADROOM, cheaper_settings, plan_memory

    if resolution is None:
        return None
    processes = world_size()
    plan = plan_memory(cfg, probe, family, resolution, gpu=gpu, processes=processes, caches=caches, frames=frames)
    if plan is not None and gpu is not None and not gpu.get("known", True):
        warnings.append(_issue("memory_plan_gpu_unknown", "device",
                               f"the memory plan ({plan['total_gib']} GiB per process) is not judged: {gpu['reason']}",
                               hint="make sure the card has that much free memory, or run --validate-only where "
                                    "the card can be told"))
    if plan is None or plan["fits"] is not False or cfg.ignore_memory_plan:
        return plan
    options = cheaper_settings(cfg, probe, family, resolution, gpu, processes=processes, caches=caches, frames=frames)
    plan["cheaper"] = options
    fitting = [o for o in options if o["fits"]]
    # The key that the first fitting hint (else the first hint) is about: its defining change comes last.
    first = (fitting or options or [{"settings": {"ignore_memory_plan": True}}])[0]

    def verdict(o: dict) -> str:
        if o["fits"]:
            return ""
        if o["total_bytes"] <= gpu["memory_bytes"]:
            return f" (fits, but without the {HINT_HEADROOM:.0%} to spare a hint keeps for the estimate's error)"
        return " (still too much)"

    errors.append(_issue(
        "memory_plan_exceeds", list(first["settings"])[-1],
        f"the run needs about {plan['total_gib']} GiB but {gpu['name']} (GPU {gpu['index']}) has "
        f"{gpu['memory_bytes'] / 2**30:.1f} GiB free of {gpu['total_bytes'] / 2**30:.1f} GiB",
        hint="; ".join(f"{', '.join(f'{k}: {json.dumps(v)}' for k, v in o['settings'].items())} -> about "
                       f"{o['total_gib']} GiB{verdict(o)}" for o in options)
        + "; or set ignore_memory_plan: true to train anyway", options=options))
    return plan


def world_size() -> int:
    """How many processes train together: WORLD_SIZE, as accelerate launch / torch.distributed.run set it (1 when
    run directly; ``WORLD_SIZE=N train_lora.py --validate-only`` plans for N)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_shard(cfg: Any, warnings: list) -> None:
    if cfg.shard_base and world_size() == 1:
        warnings.append({"code": "shard_base_single_process", "path": "shard_base",
                         "message": "shard_base has no effect with one process: start several with accelerate launch "
                                    "--num_processes N (or set WORLD_SIZE=N for --validate-only's memory plan)"})


def check_offload_host(plan: dict | None, warnings: list) -> None:
    """Streamed blocks live in page-locked host memory, which cannot be swapped, and every process of the run on this
    machine pins its own copy: warn when they would take most of what this machine (or container) has available."""
    from . import cache_plan

    offload = (plan or {}).get("offload")
    avail = cache_plan.available_host_bytes()
    local = cache_plan.local_processes()
    if not offload or avail is None or offload["host_bytes"] * local <= 0.8 * avail:
        return
    each = f"{offload['host_bytes'] / 2**30:.1f} GiB"
    held = each if local == 1 else f"{each} in each of {local} processes on this machine " \
                                   f"({offload['host_bytes'] * local / 2**30:.1f} GiB in all)"
    warnings.append({"code": "offload_host_memory", "path": "offload_blocks",
                     "message": f"offload_blocks streams {offload['blocks']} block(s) holding {held} in pinned host "
                                f"memory, but only {avail / 2**30:.1f} GiB is available: the run may be killed by the "
                                "OOM killer; stream fewer blocks or use an 8-bit base"})
