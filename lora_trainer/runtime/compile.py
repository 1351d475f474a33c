"""Regional compilation of the denoiser (config ``compile``): its repeated blocks compiled one by one with the LoRA
layers inside, so compile time stays that of one block per distinct shape, not of the whole model.

Which blocks: the model's own ``_repeated_blocks`` (diffusers' list for ``compile_repeated_blocks``: FLUX.1's two
block classes, a UNet's ``BasicTransformerBlock`` ...), else the family's streamable blocks (``spec.blocks``).
Only each block's ``forward`` is compiled, not its ``__call__``: the hooks that block streaming and layerwise casting
put on modules stay eager around it, and a streamed block's weights may change address between calls (they are
graph inputs, guarded on shape, dtype and device only).

Determinism, so that a resumed run trains what an uninterrupted one does: shapes are static (``dynamic=False``): a
new bucket shape compiles its own graph instead of turning an existing one dynamic, which would change the kernels
a run uses depending on the order it met the shapes. Samples run the same blocks eagerly (``eager``): sampling's
shapes (a CFG batch, eval mode, no autograd) would each compile graphs used a few times per run.

Every graph compiled (the first per shape, and any recompilation) is counted by the backend wrapper; the trainer
reports the count and the seconds spent in the step events and warns when graphs keep being compiled after warm-up.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

# Compiled graphs kept per block code object before dynamo falls back to eager (torch's default 8): each bucket shape
# is one static graph, and a silent fall back to eager would change the kernels mid-run.
RECOMPILE_LIMIT = 64
WARMUP_STEPS = 3  # the steps by which the usual shapes have been met (the recompilation warning counts after them)


@dataclass
class CompileStats:
    blocks: int = 0  # modules whose forward is compiled
    graphs: int = 0  # graphs compiled so far (every shape's first, and recompilations)
    seconds: float = 0.0  # spent compiling them (backend time: tracing before it is not counted)
    classes: list[str] = field(default_factory=list)
    warmup_graphs: int | None = None  # graphs compiled by the end of the warm-up steps
    first_step: int | None = None  # the first step reported (a resumed run starts past 1)
    warned: bool = False

    def summary(self) -> dict:
        return {"blocks": self.blocks, "classes": self.classes, "graphs": self.graphs,
                "compile_s": round(self.seconds, 2)}

    def step_report(self, step: int) -> tuple[dict, dict | None]:
        """The step event's ``compile`` field, and a ``recompilation`` warning (once per run) when more graphs were
        compiled after the warm-up than during it: every step meets new shapes or guards fail, and the run spends
        its time compiling. New bucket shapes alone compile a graph each, which stays below that."""
        self.first_step = step if self.first_step is None else self.first_step
        if self.warmup_graphs is None and step - self.first_step >= WARMUP_STEPS - 1:
            self.warmup_graphs = self.graphs
        warning = None
        if self.warmup_graphs and not self.warned and self.graphs - self.warmup_graphs > self.warmup_graphs:
            self.warned = True
            warning = {"code": "recompilation",
                       "message": f"{self.graphs - self.warmup_graphs} graphs compiled after the first "
                                  f"{WARMUP_STEPS} steps ({self.warmup_graphs} during them; {self.seconds:.0f} s "
                                  "compiling so far): shapes keep changing or compiled guards keep failing",
                       "hint": "fewer bucket shapes (bucket settings, one resolution), or compile false"}
        return {"graphs": self.graphs, "compile_s": round(self.seconds, 2)}, warning

    def step_fields(self, step: int, events) -> dict:
        """The step event's extra fields; emits the recompilation warning when it is due."""
        fields, warning = self.step_report(step)
        if warning:
            events.emit("warning", **warning)
        return {"compile": fields}


class _CountingBackend:
    """inductor, counting each graph it is asked to compile."""

    def __init__(self, stats: CompileStats):
        self.stats = stats
        self.inner = torch._dynamo.lookup_backend("inductor")

    def __call__(self, gm, example_inputs):
        t = time.perf_counter()
        try:
            return self.inner(gm, example_inputs)
        finally:
            self.stats.graphs += 1
            self.stats.seconds += time.perf_counter() - t


def regions(denoiser: torch.nn.Module, attrs: tuple[str, ...]) -> list[torch.nn.Module]:
    """The blocks compiled: the model's ``_repeated_blocks`` classes, else the family's block lists' members."""
    names = set(getattr(denoiser, "_repeated_blocks", None) or ())
    found = [m for m in denoiser.modules() if type(m).__name__ in names]
    if found:
        return found
    return [block for attr in attrs for block in (getattr(denoiser, attr, None) or ())]


def compile_denoisers(denoisers: dict[str, torch.nn.Module], attrs: tuple[str, ...]) -> CompileStats:
    """Trainer setup, after LoRA injection, init_lora and fp8 storage and before block streaming (which wraps the
    compiled forward) and the move to the device."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    stats = CompileStats()
    backend = _CountingBackend(stats)
    for denoiser in denoisers.values():
        for block in regions(denoiser, attrs):
            block.forward = torch.compile(block.forward, backend=backend, dynamic=False)
            stats.blocks += 1
            if type(block).__name__ not in stats.classes:
                stats.classes.append(type(block).__name__)
    return stats


def eager():
    """Compiled blocks run eagerly inside (samples); a no-op context where nothing is compiled."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
