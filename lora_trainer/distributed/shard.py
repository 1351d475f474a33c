"""Sharding the frozen base across processes (config ``shard_base``), for a base that fits none of the cards.

Each of the denoiser's blocks (the ModuleLists of ``FamilySpec.blocks``) and then the denoiser itself become
FSDP2 units (``torch.distributed.fsdp.fully_shard``): every process keeps 1/N of each block's weights, LoRA included,
and a block's weights are all-gathered just before it runs (forward, checkpointed recomputation, backward) and freed
after. LoRA is sharded with its block rather than replicated: FSDP2 shards every parameter of a unit, and the
optimizer state then follows the LoRA's shards, so no process holds more than 1/N of it either. The gradients of the
LoRA are reduce-scattered where DDP would all-reduce them.

Why torch's fully_shard and not accelerate's FSDP plugin: accelerate enables FSDP only for multi-GPU (and other
accelerator) processes, never for CPU processes, so its path could not be tested on the CPU machines our CI runs on;
and it shards whole models by a wrap policy, where we shard exactly the blocks the memory plan counts. accelerate
still starts the processes, owns the process group, autocast, the reductions and the DDP-wrapped text encoders.

Checkpoints and the exported LoRA hold whole tensors, exactly as without sharding (the same files, the same
resume): ``full_tensors`` all-gathers the LoRA and optimizer state (a collective, so every process calls it; only
rank 0 writes), and ``load_lora_sharded`` cuts a loaded whole tensor back into this process's shard, with no
communication, since every process reads the checkpoint itself. ``lora_state`` / ``load_lora_state`` read and write
the LoRA of any module, sharded or not: checkpoints, resume and the export go through them.

Refused with a config error naming ``shard_base`` (config.py): a quantised or fp8 base (its tensor subclasses and
casting hooks are not FSDP-aware), offload_blocks (both move the same weights), DoRA (its export reads whole base
weights), train_text_encoder, and optimizers other than adamw (8-bit AdamW, Prodigy and Adafactor do not run on
sharded tensors).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch

from ..adapters.lora import load_plain_lora_state, peft_state, plain_lora_state
from ..runtime.offload import block_lists

log = logging.getLogger("train_lora")


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's LoRA tensors, whole, by PEFT's names. For a sharded module this all-gathers them: every process
    must call it."""
    if is_sharded(module):
        return full_tensors(peft_state(module))
    return plain_lora_state(module)


def load_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole LoRA tensors into the module (into this process's shards of them when it is sharded)."""
    if is_sharded(module):
        load_lora_sharded(module, state)
        return
    load_plain_lora_state(module, state)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_denoisers(denoisers: dict[str, torch.nn.Module], attrs: tuple[str, ...], device: torch.device,
                    world: int) -> dict[str, dict]:
    """fully_shard each denoiser's blocks, then the denoiser (the root unit holds the rest: embeddings, norms,
    the output layer). FSDP moves each shard to ``device`` as it cuts it, so a whole block never reaches the
    accelerator beyond the one being cut. Returns a summary per denoiser, for run_started."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    out = {}
    for name, denoiser in denoisers.items():
        blocks = block_lists(denoiser, attrs)
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(denoiser, mesh=mesh)
        local = whole = 0
        for p in denoiser.parameters():
            if not p.requires_grad:
                whole += p.numel() * p.element_size()
                local += p.to_local().numel() * p.element_size()
        # stderr, per process: that the shards really are 1/N each can be checked from outside.
        log.info("rank %d holds %d of %d frozen bytes of %s", mesh.get_rank(), local, whole, name)
        out[name] = {"units": len(blocks) + 1, "processes": world, "local_bytes": local, "frozen_bytes": whole}
    return out


def summary(shards: dict[str, dict]) -> dict | None:
    """run_started.shard: None without sharding."""
    if not shards:
        return None
    parts = list(shards.values())
    return {"processes": parts[0]["processes"], "units": sum(p["units"] for p in parts),
            "frozen_bytes": sum(p["frozen_bytes"] for p in parts), "local_bytes": sum(p["local_bytes"] for p in parts)}


@contextlib.contextmanager
def no_sync(module: torch.nn.Module, accelerator: Any) -> Iterator[None]:
    """No gradient reduction for this micro-batch: FSDP2's switch for a sharded module, DDP's (via accelerate)
    for the others. The LoRA gradients then accumulate unsharded, which is cheap: they are the only ones."""
    if not is_sharded(module):
        with accelerator.no_sync(module):
            yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A norm over sharded gradients is a replicated DTensor: its plain value (every process holds the same)."""
    return t.full_tensor() if _is_dtensor(t) else t


def full_tensors(obj: Any) -> Any:
    """``obj`` (a state dict, possibly nested) with every DTensor replaced by its whole tensor. A collective for
    sharded states: every process must call it, with the same structure, in the same order (dicts keep theirs)."""
    if _is_dtensor(obj):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tensors(v) for v in obj)
    return obj


def _shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``whole``, laid out as ``like`` (a DTensor) is; no communication."""
    from torch.distributed.tensor import distribute_tensor

    whole = whole.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def load_lora_sharded(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a whole LoRA state (PEFT's names, as lora_state gives) into a sharded module's shards."""
    current = peft_state(module)  # views of the parameters' shards
    unexpected = sorted(set(state) - set(current))
    if unexpected:
        raise RuntimeError(f"checkpoint has LoRA keys the model does not: {unexpected[:5]}")
    for key, target in current.items():
        if key in state:
            target.copy_(_shard_like(state[key], target) if _is_dtensor(target) else state[key])


def shard_optimizer_state(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state (as checkpoints hold it) with each per-parameter tensor cut to its parameter's shard,
    for optimizer.load_state_dict; scalars (AdamW's ``step``) stay whole."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = dict(state_dict)
    out["state"] = {}
    for idx, entry in state_dict["state"].items():
        p = params[int(idx)]
        out["state"][idx] = {k: _shard_like(v, p) if _is_dtensor(p) and torch.is_tensor(v) and v.shape == p.shape
                             else v for k, v in entry.items()}
    return out
