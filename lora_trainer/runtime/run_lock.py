"""Which run owns an output folder: the lock of the one running now, the lineage recorded by a finished one.

One run per output folder: an exclusive ``flock`` on ``<output_path>/.train_lora.lock`` for the whole run.

A web app's double click or a job queue retrying a job whose first attempt still runs would otherwise start two
trainers that check "does the LoRA exist?" before either writes, then overwrite each other's checkpoints. The lock
is the kernel's (``flock``), so it dies with its process: a SIGKILLed run never leaves a stale lock behind, unlike a
pid file. The lock file itself stays (removing it would race with a process that has just opened it); it holds the
holder's pid, run id and start time, for the error a second run reports. Torch-free: ``--validate-only`` reads it.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the trainer runs without the guard there (documented)
    fcntl = None  # type: ignore[assignment]

from ..contract.errors import OutputBusyError

LOCK_NAME = ".train_lora.lock"
# The LoRA metadata key naming the run (resume.TrainState.lineage) that wrote the file; checkpoints store the same
# id in lineage.json. A retry whose checkpoint has the LoRA's lineage is that run finishing, not another run.
LINEAGE_KEY = "train_lora_lineage"
LINEAGE_FILE = "lineage.json"
# --validate-only probes the lock for microseconds; a starting run retries that long before calling it busy.
_ACQUIRE_PATIENCE_S = 1.0


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (no details recorded yet)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} (run {holder.get('run_id')}, "
            f"started {holder.get('started')})")


class OutputLock:
    """Held from before preflight until the process exits (or ``release``)."""

    def __init__(self, output_path: Path):
        self.path = Path(output_path) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self, run_id: str) -> None:
        if fcntl is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError:
            return  # an unwritable output folder is preflight's error to report, with its hint
        deadline = time.monotonic() + _ACQUIRE_PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    return  # a filesystem without flock support (some network mounts): run unguarded
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise OutputBusyError(
                        f"{self.path.parent} is in use by {describe(holder)}",
                        hint="wait for that run to finish (or stop it), or choose another output_path; a killed "
                             "run releases the folder at once",
                        details={"lock": str(self.path), "holder": holder}) from None
                time.sleep(0.05)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def active_holder(output_path: Path) -> dict | None:
    """The holder's record if a run holds ``output_path`` now, else None. Takes a shared lock for an instant, so it
    never blocks and never leaves anything behind."""
    path = Path(output_path) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return _read_holder(fd) or {"pid": None}
            return None
        return None
    finally:
        os.close(fd)


def lora_lineage(path: Path) -> str | None:
    """The lineage id in a LoRA file's safetensors metadata (None for a file from another trainer or version)."""
    from ..preflight.probe import read_safetensors_header

    header, _ = read_safetensors_header(Path(path))
    value = ((header or {}).get("__metadata__") or {}).get(LINEAGE_KEY)
    return value if isinstance(value, str) and value else None


def checkpoint_lineage(folder: Path) -> str | None:
    try:
        data = json.loads((Path(folder) / LINEAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None
