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

Overlap (accelerators): each streamed block's frozen weights are packed once into one page-locked host buffer, and
two device buffers ("slots") of the largest block's size are allocated once; a block's weights are views into the
slot it was copied to, so streaming allocates nothing per step. While block i runs, block i + 1 (forward) or
i - 1 (backward) is copied into the other slot on a side stream; the compute stream waits on that copy's event
before the block runs, and the side stream waits on the event recorded when the slot's previous block was released
before overwriting it. The memory plan counts both slots. On the CPU a load is the host copy itself (no slots),
unless the test hook below asks for the accelerator's path, whose order and buffer reuse the tests then check.
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
# TRAIN_LORA_TEST_OFFLOAD_COPY=1 takes the accelerator's path (packed host buffers, two slots, prefetch) on the CPU.
_TEST_COPY = os.environ.get("TRAIN_LORA_TEST_OFFLOAD_COPY") == "1"
SLOTS = 2  # the block running and the one being copied in
_ALIGN = 256  # byte offset of each weight in a block's packed buffer: any dtype's view, and the kernels' alignment


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
        self.slotted = self.pin or _TEST_COPY  # packed buffers, slots and prefetch (module docstring)
        self.params: list[list[torch.nn.Parameter]] = []
        self.host: dict[int, torch.Tensor] = {}  # id(param) -> its host copy (a view into its block's packed buffer)
        self.packed: list[torch.Tensor] = []  # per block: its frozen weights' bytes, one buffer (slotted only)
        self.layout: list[list[tuple[int, int, torch.dtype, torch.Size]]] = []  # per weight: offset, bytes, dtype, shape
        self.slots: list[torch.Tensor] = []  # device byte buffers of the largest block's size, each allocated once
        self.slot_of: dict[int, int] = {}  # block -> the slot holding (or receiving) its weights
        self.ready: dict[int, object] = {}  # block -> the side stream's event after its copy (CUDA)
        self.released: list[object] = [None] * SLOTS  # slot -> the compute stream's event after its last block ran
        self.stream = None  # the side stream copies run on (CUDA)
        self.resident: int | None = None  # index of the streamed block whose weights are on the device
        self.loads = 0  # host -> device block copies so far
        self.trace: list[tuple[str, int, int]] = []  # (copy | prefetch, block, slot), for the tests; bounded below
        self.total = len(blocks) if total is None else total

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host.values())

    def install(self) -> "BlockStreamer":
        import torch

        for i, block in enumerate(self.blocks):
            frozen = [p for p in block.parameters() if not p.requires_grad]
            self.params.append(frozen)
            if self.slotted:
                self._pack(frozen)
            else:
                for p in frozen:
                    self.host[id(p)] = p.data.to("cpu")
            for p in frozen:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            block.register_forward_pre_hook(self._pre_hook(i))
            block.register_forward_hook(self._post_hook(i))
            block.forward = self._saving_references(i, block.forward)
        return self

    def _pack(self, frozen: list[torch.nn.Parameter]) -> None:
        import torch

        layout, offset = [], 0
        for p in frozen:
            nbytes = p.numel() * p.element_size()
            layout.append((offset, nbytes, p.dtype, p.shape))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        buf = torch.empty(offset, dtype=torch.uint8, pin_memory=self.pin)
        for p, (off, nbytes, dtype, shape) in zip(frozen, layout):
            view = buf[off:off + nbytes].view(dtype).view(shape)
            view.copy_(p.data)
            self.host[id(p)] = view
        self.packed.append(buf)
        self.layout.append(layout)

    def load(self, i: int) -> None:
        """Block i's weights on the device for the compute stream (waiting for its prefetch if one is in flight); the
        block resident before is released."""
        if self.resident == i:
            return
        if not self.slotted:
            if self.resident is not None:
                self._drop(self.resident)
            for p in self.params[i]:
                p.data = self.host[id(p)].to(self.device)
            self.resident = i
            self.loads += 1
            return
        if i not in self.slot_of:
            self._copy_in(i, "copy")
        if (event := self.ready.pop(i, None)) is not None:
            import torch

            torch.cuda.current_stream(self.device).wait_event(event)
        slot = self.slots[self.slot_of[i]]
        for p, (off, nbytes, dtype, shape) in zip(self.params[i], self.layout[i]):
            p.data = slot[off:off + nbytes].view(dtype).view(shape)
        if self.resident is not None:
            self._drop(self.resident)
        self.resident = i

    def prefetch(self, i: int) -> None:
        """Start copying block i into the slot the resident block does not hold (a no-op off the block range, when i is
        there already, or without slots)."""
        if self.slotted and 0 <= i < len(self.blocks) and i not in self.slot_of:
            self._copy_in(i, "prefetch")

    def _copy_in(self, i: int, why: str) -> None:
        import torch

        busy = self.slot_of.get(self.resident) if self.resident is not None else None
        slot = next(s for s in range(SLOTS) if s != busy)
        if slot == len(self.slots):  # the second only when a second block streams: one block needs one slot
            self.slots.append(torch.empty(max(int(b.numel()) for b in self.packed), dtype=torch.uint8,
                                          device=self.device))
        if self.pin and self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        for j in [j for j, s in self.slot_of.items() if s == slot]:  # a prefetch the run did not take: overwritten
            del self.slot_of[j]
            self.ready.pop(j, None)
        n = int(self.packed[i].numel())
        if self.stream is not None:
            if self.released[slot] is not None:  # the slot's last block must have run before it is overwritten
                self.stream.wait_event(self.released[slot])
            with torch.cuda.stream(self.stream):
                self.slots[slot][:n].copy_(self.packed[i], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.ready[i] = event
        else:
            self.slots[slot][:n].copy_(self.packed[i])
        self.slot_of[i] = slot
        self.loads += 1
        if len(self.trace) < 10_000:
            self.trace.append((why, i, slot))

    def _drop(self, i: int) -> None:
        import torch

        for p in self.params[i]:
            # dtype from the live data: layerwise casting may have cast it (it casts back after each forward)
            p.data = torch.empty(0, dtype=p.data.dtype, device=self.device)
        if self.slotted:
            slot = self.slot_of.pop(i)
            if self.stream is not None:  # kernels of block i queued so far still read the slot
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self.released[slot] = event
        self.resident = None

    def _saving_references(self, i: int, forward):
        """``forward`` with what autograd saves of the block's streamed weights kept by reference (module docstring)."""
        import torch

        def pack(t):
            if t.layout == torch.strided and t.numel():
                ptr = t.data_ptr()  # weights of one block share a slot's storage: match the address range
                for p in self.params[i]:
                    start = p.data_ptr()
                    if p.numel() and p.dtype == t.dtype and start <= ptr < start + p.numel() * p.element_size():
                        return p, t.dtype, t.size(), t.stride(), (ptr - start) // t.element_size()
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
            if not _in_backward():  # a checkpoint's recomputation runs in the backward pass: no forward prefetch
                self.prefetch(i + 1)
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
            self.prefetch(i - 1)
            return grad
        return hook


def _in_backward() -> bool:
    import torch

    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


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
