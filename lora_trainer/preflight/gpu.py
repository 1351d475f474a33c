"""Which GPU this process will train on and how much of its memory is free: what the memory plan is judged against.

The run's device is CUDA device LOCAL_RANK (accelerate's choice; 0 for a single process) among the GPUs that
CUDA_VISIBLE_DEVICES leaves visible. Where torch is already loaded with CUDA (the trainer's preflight) torch measures
that device itself (runtime/device.py gpu_memory: free memory by mem_get_info, a MIG instance as the device it is).
``--validate-only`` never imports torch, so it asks nvidia-smi for every GPU and picks the one CUDA would give:

* nvidia-smi ignores CUDA_VISIBLE_DEVICES and numbers GPUs by PCI bus. CUDA_VISIBLE_DEVICES lists indices or GPU
  UUIDs (a unique prefix is enough); CUDA stops at the first entry it cannot resolve, so "", "-1" or an index past
  the last GPU hide every GPU (and the run trains on the CPU).
* CUDA numbers GPUs fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID. Identical cards get the same numbers either
  way (ties go by bus id); where the cards differ an index cannot be mapped to nvidia-smi's without PCI_BUS_ID.
* A GPU in MIG mode reaches CUDA as instances, whose memory nvidia-smi's GPU query does not give.

Where the card or its free memory cannot be told (those cases, nvidia-smi failing or printing what we cannot read),
the result says so (``known`` false, ``reason``) and the plan is reported without a verdict: a warning, never a
refusal. Torch-free.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

MIB = 2 ** 20
QUERY = ("index", "uuid", "name", "memory.total", "memory.free", "mig.mode.current")


def local_rank() -> int:
    """This process's device ordinal among the visible GPUs: LOCAL_RANK, which accelerate launch sets (0 alone)."""
    try:
        return max(0, int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        return 0


def detect_gpu() -> dict | None:
    """The GPU this process will use: name, index, uuid, total_bytes, free_bytes, memory_bytes (what the run may take:
    the free memory), source ("torch" or "nvidia-smi") and known (false with a reason where it cannot be told; then
    memory_bytes is None). None when the run will have no NVIDIA GPU (no nvidia-smi, or none visible)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        from ..runtime.device import gpu_memory

        return gpu_memory(local_rank())
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None
    rows = _query(exe)
    if isinstance(rows, str):
        return _unknown(rows)
    return _pick(rows, visible, local_rank(), os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST"))


def _unknown(reason: str, row: dict | None = None) -> dict:
    row = row or {}
    return {"name": row.get("name"), "index": row.get("index"), "uuid": row.get("uuid"),
            "total_bytes": row.get("total_bytes"), "free_bytes": row.get("free_bytes"), "memory_bytes": None,
            "source": "nvidia-smi", "known": False, "reason": reason}


def _mib(text: str) -> int | None:
    try:
        return int(float(text) * MIB)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def _query(exe: str) -> list[dict] | str:
    """Every GPU nvidia-smi lists, in its order; a string saying why not where it cannot be read."""
    try:
        proc = subprocess.run([exe, f"--query-gpu={','.join(QUERY)}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi did not answer ({exc})"
    said = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    if proc.returncode != 0:
        return f"nvidia-smi failed (exit {proc.returncode}): {said[0] if said else 'no output'}"
    rows = []
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        f = [x.strip() for x in line.split(",")]
        if len(f) < len(QUERY) or not f[0].isdigit():
            return f"nvidia-smi printed what this version cannot read: {line.strip()[:200]!r}"
        # A name may hold a comma; the fields around it do not.
        rows.append({"index": int(f[0]), "uuid": f[1], "name": ", ".join(f[2:-3]), "total_bytes": _mib(f[-3]),
                     "free_bytes": _mib(f[-2]), "mig": f[-1] == "Enabled"})
    return sorted(rows, key=lambda r: r["index"]) if rows else "nvidia-smi lists no GPU"


def _visible(rows: list[dict], visible: str | None) -> list:
    """CUDA's visible devices, in its order: a row (named by UUID), an index into CUDA's own numbering, or "MIG"."""
    if visible is None:
        return list(range(len(rows)))
    out: list = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.startswith("MIG-"):
            out.append("MIG")
        elif entry.startswith("GPU-"):
            match = [r for r in rows if r["uuid"].startswith(entry)]
            if len(match) != 1:
                break
            out.append(match[0])
        elif entry.isdigit() and int(entry) < len(rows):
            out.append(int(entry))
        else:
            break  # CUDA ignores this entry and every one after it
    return out


def _pick(rows: list[dict], visible: str | None, rank: int, order: str) -> dict | None:
    devices = _visible(rows, visible)
    if not devices:
        return None
    if rank >= len(devices):
        return _unknown(f"LOCAL_RANK is {rank} but CUDA_VISIBLE_DEVICES={visible!r} leaves {len(devices)} GPU(s)")
    device = devices[rank]
    if device == "MIG":
        return _unknown("CUDA_VISIBLE_DEVICES names a MIG instance, whose memory nvidia-smi's GPU query does not give")
    if isinstance(device, int):
        if any(r["mig"] for r in rows):
            return _unknown("a GPU is in MIG mode: CUDA numbers its instances, nvidia-smi the whole GPUs")
        if order != "PCI_BUS_ID" and len({(r["name"], r["total_bytes"]) for r in rows}) > 1:
            return _unknown(f"CUDA numbers these different GPUs fastest first and nvidia-smi by PCI bus, so CUDA's "
                            f"GPU {device} cannot be told: set CUDA_DEVICE_ORDER=PCI_BUS_ID (or name the GPU by "
                            "UUID in CUDA_VISIBLE_DEVICES)")
        device = rows[device]
    if device["mig"]:
        return _unknown(f"GPU {device['index']} is in MIG mode: the run gets an instance of it, whose memory "
                        "nvidia-smi's GPU query does not give", device)
    if device["free_bytes"] is None or device["total_bytes"] is None:
        return _unknown(f"nvidia-smi gives no free memory for GPU {device['index']}", device)
    return {"name": device["name"], "index": device["index"], "uuid": device["uuid"],
            "total_bytes": device["total_bytes"], "free_bytes": device["free_bytes"],
            "memory_bytes": device["free_bytes"], "source": "nvidia-smi", "known": True}
