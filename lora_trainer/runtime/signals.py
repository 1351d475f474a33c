"""Graceful SIGTERM/SIGINT handling.

Three regimes, switched by the trainer:
- immediate (loading, caching): a signal raises Interrupted at once; nothing is being written, so leaving is safe.
- deferred (training loop): the first signal is only recorded; the loop finishes the current optimizer step, saves
  a checkpoint and exits with 128 + signal. A second signal outside a save exits at once.
- saving: every signal is only recorded, so a checkpoint is never left half-written by our own exit.

Test hook: TRAIN_LORA_TEST_HOLD=loading_model|stop_requested|saving|export_lora|export_manifest|checkpoint_write
makes the process announce that point on stderr ("train_lora test hold: <point>") and wait there for the next signal
(60 s at most), so a test can deliver a signal exactly inside the window it means (two back-to-back kill() calls are
one signal: standard signals do not queue) without guessing with sleeps. loading_model is just after the loading
phase's first event (runtime/loading.py), where a tiny model would otherwise be loaded before the signal lands.
export_lora and export_manifest are in the final export (outputs/final.py): after the LoRA files, and after the
manifest (before the model card); checkpoint_write holds the background writer thread (training/background.py)
before it writes, while training goes on.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

from ..contract.errors import Interrupted

HANDLED = (signal.SIGTERM, signal.SIGINT)
_TEST_HOLD = os.environ.get("TRAIN_LORA_TEST_HOLD", "")
HOLD_TIMEOUT_S = 60.0
_arrived = threading.Event()  # set by every handled signal (test hold only)
_held: set[str] = set()


def hold(point: str) -> None:
    """The TRAIN_LORA_TEST_HOLD hook (see the module docstring); once per point, a no-op otherwise."""
    if _TEST_HOLD != point or point in _held:
        return
    _held.add(point)
    _arrived.clear()
    print(f"train_lora test hold: {point}", file=sys.stderr, flush=True)
    # The handler runs in this (main) thread during the wait; if it raises, so does the wait.
    _arrived.wait(HOLD_TIMEOUT_S)


class GracefulStop:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._mode = "immediate"
        self._saving_depth = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        if self.signum is not None:
            hold("stop_requested")  # deferred: the step has finished, the save has not begun
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
        _arrived.set()
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
            if self._saving_depth == 1 and self.signum is not None:
                hold("saving")  # the interrupt's save has begun: a signal now must not stop it
            yield
        finally:
            self._saving_depth -= 1


def stop_agreed(stop: GracefulStop, accelerator, device) -> bool:
    """Whether to stop after this step. With several processes every rank must stop at the same step (one may get
    the signal a step later), so the flag is max-reduced: one tiny collective per step."""
    if accelerator.num_processes == 1:
        return stop.requested
    import torch

    flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
    agreed = bool(accelerator.reduce(flag, reduction="max").item())
    if agreed and stop.signum is None:
        stop.signum = signal.SIGTERM
    return agreed
