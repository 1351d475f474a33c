"""Putting the run's adapters on its models, in the one order that works (injection, init_lora, fp8 storage, block
streaming or sharding, the move to the device)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.fused import fuse_lora_forward, lora_layer_count
from ..adapters.init_experts import init_experts
from ..adapters.init_from_file import init_from_file
from ..adapters.lora import add_lora
from ..adapters.lycoris import Network
from ..distributed.routed import refuse_sharding
from ..distributed.shard import shard_denoisers
from ..runtime.compile import CompileStats, compile_denoisers
from ..runtime.offload import stream_denoisers
from ..runtime.quantize import after_lora


@dataclass
class Attached:
    lora_modules: dict  # component name -> the module carrying LoRA (denoisers, and trained text encoders)
    denoiser_params: list
    te_params: list
    streamers: dict  # offload.BlockStreamer per streamed denoiser
    shards: dict  # shard.shard_denoisers' summary per sharded denoiser
    compiled: CompileStats | None = None  # compile: the regions compiled and the graphs so far
    lora_forward: dict | None = None  # run_started's: LoRA layers on the lean forward (fused) and on PEFT's (peft)


def attach_adapters(cfg, family, comps, device: torch.device, events, *, world: int = 1) -> Attached:
    """The run's adapters (Trainer._attach_lora): LoRA on the denoisers (and text encoders with
    train_text_encoder), an init_lora file's weights, fp8 storage, regional compilation, block streaming or sharding
    across the ``world`` processes, then the move to ``device``.

    LoRA goes in on the host, before anything moves: so that fp8 casting, block streaming and sharding happen before
    the full-precision denoiser could reach the accelerator (it may not fit there), and so that a seed gives the same
    initial LoRA on every device and process. The text encoders are already where _prepare_data left them.
    init_lora is loaded before sharding, into whole modules."""
    spec = family.spec
    out = Attached(dict(comps.denoisers), [], [], {}, {})
    network = Network.of(cfg)  # LoRA, LoKr or LoHa
    for denoiser in comps.denoisers.values():
        if cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        out.denoiser_params += add_lora(denoiser, rank=cfg.lora_rank, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                                        targets=spec.targets(cfg.target_modules), use_dora=cfg.use_dora,
                                        path="target_modules", network=network)
        denoiser.train()
    if cfg.train_text_encoder:
        for name in spec.lora_text_encoders:
            te = comps.text_encoders[name]
            out.te_params += add_lora(te, rank=cfg.lora_rank, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                                      targets=cfg.text_encoder_target_modules, use_dora=cfg.use_dora,
                                      path="text_encoder_target_modules", skip=unread_layers(spec, name, te),
                                      network=network)
            te.train()
            out.lora_modules[name] = te
    if cfg.init_lora and not init_experts(cfg, family, comps, out.lora_modules, events):
        init_from_file(cfg, family.name, comps, out.lora_modules, events)
    after_lora(cfg, comps, out.lora_modules)  # fp8 storage follows injection (PEFT copies the base dtype), then
    # every LoRA tensor is checked to be trainable fp32
    # the lean forward goes in before compilation, which traces it, and before streaming and sharding, which wrap
    # or replace the weights it reads at call time
    fused = fuse_lora_forward(out.lora_modules.values())
    out.lora_forward = {"fused": fused, "peft": lora_layer_count(out.lora_modules.values()) - fused}
    if cfg.compile:  # the blocks' forwards, LoRA inside; streaming then wraps the compiled forward (compile.py)
        out.compiled = compile_denoisers(comps.denoisers, spec.blocks)
    out.streamers = stream_denoisers(cfg.offload_blocks, spec.blocks, comps.denoisers, device)
    refuse_sharding(cfg, family, comps, world)
    if cfg.shard_base and world > 1:
        out.shards = shard_denoisers(comps.denoisers, spec.blocks, device, world)
        # fully_shard replaced every parameter by its shard (a new Parameter): the optimizer must get those.
        out.denoiser_params = [p for d in comps.denoisers.values() for n, p in d.named_parameters() if p.requires_grad]
    for denoiser in comps.denoisers.values():
        denoiser.to(device)  # sharded ones are there already (a no-op for them)
    return out


def unread_layers(spec, encoder: str, module: torch.nn.Module) -> tuple[str, ...]:
    """The layers of a LoRA'd text encoder whose output the family's conditioning never reads (spec
    text_encoder_reads): LoRA there gets no gradient, which DDP refuses, and would be dead weight in every file."""
    skip = spec.text_encoder_layers_unread(encoder, [n for n, _ in module.named_modules()])
    if spec.text_encoder_reads[encoder].unread and not skip:
        raise RuntimeError(f"{encoder} ({type(module).__name__}) has no {spec.text_encoder_reads[encoder].layers} "
                           "list: its unread layers cannot be left out")
    return skip
