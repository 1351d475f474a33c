"""What a training step does when it goes wrong: non-finite losses/gradients and running out of memory."""
from __future__ import annotations

import torch

from ..runtime.device import memory_stats
from ..contract.errors import OutOfMemoryError, TrainingError

MAX_NONFINITE_STREAK = 3  # isolated fp16 overflows happen; three in a row means the run has diverged
MAX_NONFINITE_TOTAL = 10


class NonFiniteGuard:
    """Counts skipped non-finite steps: a warning per skip, a TrainingError (exit 5) once the run has diverged."""

    def __init__(self, events):
        self.events = events
        self.streak = self.total = 0

    def ok(self) -> None:
        self.streak = 0

    def skip(self, step: int, loss: float, grad_norm: float) -> None:
        self.total += 1
        self.streak += 1
        if self.streak > MAX_NONFINITE_STREAK or self.total > MAX_NONFINITE_TOTAL:
            raise TrainingError(
                f"loss or gradients not finite at step {step} ({self.streak} in a row, {self.total} in total); "
                "stopping before the LoRA is damaged",
                hint="lower learning_rate, use bf16 instead of fp16, set max_grad_norm, or check the data; the last "
                     "checkpoint holds finite weights", details={"step": step, "loss": loss, "grad_norm": grad_norm})
        self.events.emit("warning", code="nonfinite_step_skipped",
                         message=f"step {step}: loss {loss} / gradient norm {grad_norm} not finite; update skipped",
                         details={"step": step, "skipped_total": self.total})


# How allocators report exhaustion. CUDA: torch.cuda.OutOfMemoryError ("CUDA out of memory"); the host: MemoryError
# from Python, numpy or PIL, and RuntimeErrors from torch's CPU allocator ("DefaultCPUAllocator: can't allocate
# memory: you tried to allocate N bytes", newer torch "... not enough memory ...") or from other backends
# ("MPS backend out of memory", "HIP out of memory").
_OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
              "failed to allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXTS)


def is_host_out_of_memory(exc: BaseException) -> bool:
    """The host's memory ran out (not the GPU's): the remedies differ."""
    text = str(exc).lower()
    return is_out_of_memory(exc) and not isinstance(exc, torch.cuda.OutOfMemoryError) and "cuda" not in text \
        and "hip" not in text and "mps" not in text


def oom_error(exc: BaseException, step: int, device: torch.device) -> OutOfMemoryError:
    first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:300] or type(exc).__name__
    if is_host_out_of_memory(exc):
        return OutOfMemoryError(
            f"out of host memory at step {step}: {first_line}",
            hint="lower batch_size or resolution, set cache_latents_to_disk and cache_text_embeddings_to_disk, "
                 "lower dataloader_workers, or give the machine (or container) more RAM; the last checkpoint is intact",
            details={"step": step, "memory": memory_stats(device), "where": "host"})
    return OutOfMemoryError(
        f"out of memory at step {step}: {first_line}",
        hint="lower batch_size (raise gradient_accumulation_steps to keep the effective batch), turn on "
             "gradient_checkpointing, use optimizer adamw8bit, or lower resolution; the last checkpoint is intact",
        details={"step": step, "memory": memory_stats(device), "where": "gpu"})
