"""Checkpoint writes off the step loop: at most one in flight, on a thread.

The step boundary takes the snapshot (training/resume.py ``snapshot``: the collectives, and host copies of every
tensor the next step would change in place); serialising it, the safetensors hashes, the fsyncs and the atomic
rename happen here while training goes on. The ``checkpoint`` event is emitted by the write itself, once the
files are durable. A failed write (disk full) is re-raised on the training thread at its next ``check`` or
``wait``, where errors are classified into exit codes; nothing already written is touched by it (checkpoint.py).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from ..runtime.signals import hold


class BackgroundWriter:
    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._path: Path | None = None

    def submit(self, write: Callable[[], Path]) -> None:
        """Start ``write`` on a thread, after the previous one has finished (at most one in flight: two would hold
        two snapshots in host memory and race on pruning old checkpoints)."""
        self.wait()

        def run() -> None:
            try:
                hold("checkpoint_write")  # test hook (runtime/signals.py): the write waits, training goes on
                self._path = write()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = exc

        # Not a daemon: an interpreter exiting mid-write (an unexpected error on the main thread) still lets the
        # write finish, so the checkpoint is either whole or absent, never a scratch folder left for no reason.
        self._thread = threading.Thread(target=run, name="checkpoint-writer")
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Raise a finished write's error now (called once per step: cheap, never blocks)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> Path | None:
        """Block until the write in flight (if any) is durable; its path, or its error raised here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._path
