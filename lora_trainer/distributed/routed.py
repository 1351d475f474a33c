"""Several processes training denoisers that a step may not all run (ModelFamily.denoisers_routed: Wan 2.2 A14B
with both experts trained, each sample going to the expert of its sigma).

DDP cannot take such a denoiser: its gradient all-reduce is launched by autograd hooks of the module's own
backward, so a process whose samples all went to the other expert launches none for this one while another
process does, and the collectives no longer pair up (gloo and NCCL then wait forever, or pair one expert's
bucket with the other's: they have the same shapes); find_unused_parameters does not help, it covers parameters
unused in a forward that ran, not a forward that did not. So these denoisers are left out of accelerate's DDP
wrapping and their LoRA gradients are averaged here, once per optimizer step after the last micro-batch, in one
all-reduce of every trained parameter's gradient (zeros where this process has none) plus one flag per denoiser.

The cost, against DDP: the reduction does not overlap the backward (DDP reduces buckets while later layers still
compute), and each step sends and zero-fills the LoRA gradients of an expert this process did not run. LoRA
gradients are small (tens of MB for rank 32 on a 14B expert) next to a step of a 14B transformer.
"""
from __future__ import annotations

from typing import Any

import torch


def routed_denoisers(family: Any, comps: Any, world: int, sharded: Any = ()) -> tuple[str, ...]:
    """The denoisers this run reduces itself: all of them where the family routes a step to some of them and more
    than one process trains (sharded ones reduce through FSDP and are not taken)."""
    if world < 2 or not family.denoisers_routed(comps):
        return ()
    return tuple(n for n in comps.denoisers if n not in sharded)


def refuse_sharding(cfg: Any, family: Any, comps: Any, world: int) -> None:
    """shard_base cannot take routed denoisers: FSDP all-gathers a block in its forward and reduce-scatters in its
    backward, collectives that a process whose samples skipped that denoiser never joins."""
    if cfg.shard_base and world > 1 and family.denoisers_routed(comps):
        from ..contract.errors import ConfigError

        raise ConfigError("shard_base cannot shard denoisers that a step may not all run",
                          [{"path": "shard_base", "value": True, "allowed": "false (or train_experts naming one "
                            "expert)", "message": f"{', '.join(comps.denoisers)} each run only for the samples "
                            "routed to them, and a sharded denoiser needs every process in each of its passes"}])


def _trained(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def broadcast_weights(modules: list[torch.nn.Module]) -> None:
    """Every process starts from rank 0's LoRA, as DDP's construction makes it (the seed already makes them equal:
    this keeps it so whatever initialised them)."""
    import torch.distributed as dist

    for module in modules:
        for p in _trained(module):
            dist.broadcast(p.data, src=0)


def reduce_gradients(modules: list[torch.nn.Module], world: int) -> None:
    """Average the trained parameters' gradients of ``modules`` over the ``world`` processes (DDP's mean). A
    denoiser no process ran this step keeps no gradient (the optimizer skips it, as in a single process); one that
    some process ran gets the mean on every process, zeros counted for those that did not, so that every process
    takes the same optimizer step."""
    import torch.distributed as dist

    groups = [_trained(m) for m in modules]
    params = [p for g in groups for p in g]
    if not params:
        return
    ran = [float(any(p.grad is not None for p in g)) for g in groups]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [torch.tensor(ran, device=params[0].device)])
    dist.all_reduce(flat)
    counts = flat[-len(groups):].tolist()
    flat = flat[:-len(groups)].div_(world)
    offset = 0
    for group, count in zip(groups, counts):
        for p in group:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if count > 0 else None
            offset += n
