"""A stand-in ``nvidia-smi`` on PATH: answers ``--query-gpu=<fields> --format=csv[,noheader][,nounits]`` for a table
of GPUs as the real one prints it (driver 535-570): one line per GPU in nvidia-smi's own order (PCI bus id, whatever
CUDA_VISIBLE_DEVICES says: nvidia-smi ignores it), fields joined by ", ", memory in MiB (" MiB" appended without
nounits), "[N/A]" where a field does not apply (mig.mode.current on a GPU without MIG), a header line without
noheader, and exit 2 with its message for a field it does not know. ``failure`` makes it print the driver error
and exit 9, as it does when it cannot talk to the driver.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

RTX4090 = {"index": 0, "uuid": "GPU-5b7d1c3e-2f4a-4e6b-9a1d-0c8e7f6a5b4c", "name": "NVIDIA GeForce RTX 4090",
           "memory.total": 24564, "memory.free": 24108}
A6000 = {"index": 1, "uuid": "GPU-a1b2c3d4-e5f6-4789-8abc-def012345678", "name": "NVIDIA RTX A6000",
         "memory.total": 49140, "memory.free": 48669}

_SCRIPT = r'''#!{python}
import json, sys
gpus, failure = json.loads({table!r}), {failure!r}
if failure:
    print(failure)
    sys.exit(9)
args = sys.argv[1:]
query = next((a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")), None)
fmt = next((a.split("=", 1)[1] for a in args if a.startswith("--format=")), "")
if query is None:
    print("+-----------------------------------------------------------------------------+")
    sys.exit(0)
fields = [f.strip() for f in query.split(",")]
known = {{"index", "uuid", "name", "memory.total", "memory.free", "memory.used", "mig.mode.current", "pci.bus_id",
          "driver_version"}}
for f in fields:
    if f not in known:
        print(f'Field "{{f}}" is not a valid field to query.')
        print()
        print("Please run 'nvidia-smi --help-query-gpu' for more information.")
        sys.exit(2)
units = "nounits" not in fmt
if "noheader" not in fmt:
    print(", ".join(f + (" [MiB]" if f.startswith("memory.") and units else "") for f in fields))
for g in gpus:
    row = []
    for f in fields:
        if f.startswith("memory."):
            value = g.get(f, g["memory.total"] - g.get("memory.free", 0) if f == "memory.used" else None)
            row.append("[N/A]" if value is None else f"{{value}}" + (" MiB" if units else ""))
        else:
            row.append(str(g.get(f, "[N/A]")))
    print(", ".join(row))
'''


def install(folder: Path, gpus: list[dict] | None = None, *, failure: str | None = None) -> dict:
    """Write ``folder``/nvidia-smi for ``gpus`` (dicts of query field -> value) and return the environment that puts
    it first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text(_SCRIPT.format(python=sys.executable, table=json.dumps(gpus or []), failure=failure))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def card(name: str, total_mib: int, free_mib: int | None = None, *, index: int = 0, mig: str | None = None,
         uuid: str | None = None) -> dict:
    """One row of the table: ``free_mib`` defaults to the total less what a desktop-free card holds (~450 MiB)."""
    row = {"index": index, "uuid": uuid or f"GPU-{index:08x}-0000-4000-8000-{total_mib:012x}", "name": name,
           "memory.total": total_mib, "memory.free": total_mib - 450 if free_mib is None else free_mib}
    if mig is not None:
        row["mig.mode.current"] = mig
    return row
