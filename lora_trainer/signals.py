"""Graceful SIGTERM/SIGINT handling.

Three regimes, switched by the trainer:
- immediate (loading, caching): a signal raises Interrupted at once; nothing is being written, so leaving is safe.
- deferred (training loop): the first signal is only recorded; the loop finishes the current optimizer step, saves
  a checkpoint and exits with 128 + signal. A second signal outside a save exits at once.
- saving: every signal is only recorded, so a checkpoint is never left half-written by our own exit.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from .errors import Interrupted

HANDLED = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._mode = "immediate"
        self._saving_depth = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread (e.g. when embedded in a test runner thread)
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signature fixed by the signal module
        if self._saving_depth:
            self.signum = self.signum or signum
            return
        if self._mode == "immediate" or self.signum is not None:
            self.signum = self.signum or signum
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    def set_deferred(self, deferred: bool) -> None:
        self._mode = "deferred" if deferred else "immediate"

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        self._saving_depth += 1
        try:
            yield
        finally:
            self._saving_depth -= 1
