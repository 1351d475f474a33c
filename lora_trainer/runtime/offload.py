"""Streaming a denoiser's blocks from host memory (config ``offload_blocks``), so a base that does not fit the card
trains there anyway.

The frozen weights of the streamed blocks live in host memory (pinned on CUDA, so copies are DMA transfers). A
streamed block's weights are copied to the accelerator just before the block runs, and dropped again when the next
streamed block is copied in; at most one streamed block is resident at a time. The backward pass needs them again:
a gradient hook on the block's outputs copies them back before autograd enters the block (with gradient
checkpointing that is also before the block's recomputation, which runs inside its backward).

While offloaded, a weight's data is an empty tensor of its dtype on the accelerator, not its host copy: a use of
an offloaded weight then fails loudly on every device, the CPU included, instead of silently computing on the host.
That is what makes the CPU tests of this schedule mean something.

What autograd saves for the backward pass would pin a dropped block's weights: a Linear saves a view of its weight
(``weight.t()``), and layerwise casting's upcast copy is saved the same way; the storage then outlives ``.data``.
Diffusers checkpoints FLUX.1's and SD3's blocks whole, so nothing is saved there, but a UNet block checkpoints only
its resnets and transformer blocks: its attentions' proj_in / proj_out kept every streamed block's weights in part
on the accelerator. So in a streamed block's forward, where no other saved-tensor hook (a checkpoint's) is active,
a saved view of a streamed weight is kept as its parameter and geometry, and the backward pass rebuilds it from the
reloaded weight (the gradient hooks bring it back first). The tests count the weight storage really alive (weak
references), not the parameters' ``.data``.

Why gradient checkpointing is required (config error otherwise): without it the backward pass keeps every block's
activations, and the memory plan for streaming counts a block's inputs only.

Only frozen parameters move (requires_grad False); LoRA weights, their optimizer state and buffers stay resident.
Plain and fp8 (layerwise-cast) weights are supported; int8 / NF4 tensors carry quantisation state in tensor
subclasses that ``.data`` swaps do not move, so those bases are a config error (config.py).

Copies are issued on the compute stream (non-blocking from pinned memory): simple and ordered by construction,
but not overlapped with compute; the cost is about 2 x the streamed bytes over PCIe per step.
"""
from __future__ import annotations

import functools
import math
import os
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # torch is imported where it is used: the memory plan (preflight) uses resolve_count torch-free
    import torch

# Test hook: on the CPU a load returns the host copy itself (a copy would sit at another address alignment, where CPU
# kernels round differently, and a streamed run would no longer train the unstreamed run's LoRA bitwise).
# TRAIN_LORA_TEST_OFFLOAD_COPY=1 makes it a copy as on an accelerator, so a test can watch a block's copy being freed.
_TEST_COPY = os.environ.get("TRAIN_LORA_TEST_OFFLOAD_COPY") == "1"


def resolve_count(value: float, total: int) -> int:
    """offload_blocks as configured (0: off; an integer >= 1: that many blocks; 0 < x < 1: that fraction of the
    blocks, rounded up) -> a block count in [0, total]."""
    if not value or total <= 0:
        return 0
    count = math.ceil(value * total) if value < 1 else int(value)
    return min(count, total)


def block_lists(module: torch.nn.Module, attrs: Iterable[str]) -> list[torch.nn.Module]:
    """The family's streamable blocks (spec.blocks: ModuleList attribute names), in forward order."""
    out: list[torch.nn.Module] = []
    for attr in attrs:
        blocks = getattr(module, attr, None)
        if blocks is not None:
            out.extend(blocks)
    return out


class BlockStreamer:
    """Streams the frozen weights of ``blocks`` between host memory and ``device``; ``install`` before the module
    moves to the device, so the full-size blocks never get there. ``total``: the denoiser's streamable blocks,
    streamed or not (for run_started)."""

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, total: int | None = None):
        import torch

        self.blocks, self.device = blocks, torch.device(device)
        self.pin = self.device.type == "cuda"
        self.params: list[list[torch.nn.Parameter]] = []
        self.host: dict[int, torch.Tensor] = {}  # id(param) -> its host copy
        self.resident: int | None = None  # index of the streamed block whose weights are on the device
        self.loads = 0  # host -> device block copies so far
        self.total = len(blocks) if total is None else total

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host.values())

    def install(self) -> "BlockStreamer":
        import torch

        for i, block in enumerate(self.blocks):
            frozen = [p for p in block.parameters() if not p.requires_grad]
            self.params.append(frozen)
            for p in frozen:
                host = p.data.to("cpu")
                self.host[id(p)] = host.pin_memory() if self.pin else host
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            block.register_forward_pre_hook(self._pre_hook(i))
            block.register_forward_hook(self._post_hook(i))
            block.forward = self._saving_references(i, block.forward)
        return self

    def load(self, i: int) -> None:
        if self.resident == i:
            return
        if self.resident is not None:
            self._drop(self.resident)
        for p in self.params[i]:
            p.data = self.host[id(p)].to(self.device, non_blocking=self.pin, copy=_TEST_COPY)
        self.resident = i
        self.loads += 1

    def _drop(self, i: int) -> None:
        import torch

        for p in self.params[i]:
            # dtype from the live data: layerwise casting may have cast it (it casts back after each forward)
            p.data = torch.empty(0, dtype=p.data.dtype, device=self.device)
        self.resident = None

    def _saving_references(self, i: int, forward):
        """``forward`` with what autograd saves of the block's streamed weights kept by reference (module docstring)."""
        import torch

        def pack(t):
            if t.layout == torch.strided and t.numel():
                ptr = t.untyped_storage().data_ptr()
                for p in self.params[i]:
                    if p.numel() and p.untyped_storage().data_ptr() == ptr:
                        return p, t.dtype, t.size(), t.stride(), t.storage_offset() - p.storage_offset()
            return t

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            p, dtype, size, stride, offset = packed
            base = p.data if p.dtype == dtype else p.data.to(dtype)  # fp8: layerwise casting's upcast, made again
            return base.as_strided(size, stride, base.storage_offset() + offset)

        @functools.wraps(forward)
        def wrapped(*args, **kwargs):
            # Inside a checkpoint its hooks save nothing of the block; ours would replace them and save everything.
            if not torch.is_grad_enabled() or _saved_tensor_hooks_active():
                return forward(*args, **kwargs)
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return forward(*args, **kwargs)
        return wrapped

    def _pre_hook(self, i: int):
        def hook(module, args):
            self.load(i)
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            # Before autograd enters this block (its backward, and with checkpointing its recomputation), its
            # weights must be back: the first of its outputs' gradients to arrive brings them.
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(self._grad_hook(i))
        return hook

    def _grad_hook(self, i: int):
        def hook(grad):
            self.load(i)
            return grad
        return hook


def _saved_tensor_hooks_active() -> bool:
    import torch

    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None  # a torch without it: leave saving to autograd


def _tensors(output) -> list[torch.Tensor]:
    """Every tensor in a block's output: a tensor, nested tuples (UNet blocks return their skip tensors in one),
    dicts, or diffusers' output dataclasses."""
    import torch

    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    elif hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def stream_blocks(denoiser: torch.nn.Module, attrs: tuple[str, ...], value: float,
                  device: torch.device) -> BlockStreamer | None:
    """Install streaming on the last ``resolve_count(value, n)`` of the denoiser's n streamable blocks (forward
    order), or None when offload_blocks is 0."""
    blocks = block_lists(denoiser, attrs)
    count = resolve_count(value, len(blocks))
    if count == 0:
        return None
    return BlockStreamer(blocks[len(blocks) - count:], device, total=len(blocks)).install()


def stream_denoisers(value: float, attrs: tuple[str, ...], denoisers: dict[str, torch.nn.Module],
                     device: torch.device) -> dict[str, BlockStreamer]:
    """Trainer._attach_lora, after LoRA injection and fp8 casting and before the denoisers move to ``device``."""
    out = {}
    for name, denoiser in denoisers.items():
        streamer = stream_blocks(denoiser, attrs, value, device)
        if streamer is not None:
            from .quantize import ddp_skip_frozen  # several processes: DDP must not broadcast the placeholders

            ddp_skip_frozen(denoiser)
            out[name] = streamer
    return out


def summary(streamers: dict[str, BlockStreamer]) -> dict | None:
    """run_started.offload: per denoiser, how many blocks stream and how many host bytes they hold."""
    if not streamers:
        return None
    return {name: {"blocks": len(s.blocks), "of": s.total, "host_bytes": s.host_bytes, "pinned": s.pin}
            for name, s in streamers.items()}
