"""Attaching PEFT LoRA adapters to the denoiser(s) and text encoders, and reading their weights back."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract.errors import ConfigError

ADAPTER = "default"


_ALLOWED = ("a preset (attention, attention_mlp, all_linear), or module names such as to_q, to_k, to_v, to_out.0, "
            "proj_in, ff.net.2, conv1 (UNet), add_q_proj, proj_mlp (FLUX/SD3 transformer) or q_proj, k_proj, v_proj, "
            "out_proj, fc1, fc2 (text encoders)")


def _target_check(module: torch.nn.Module, targets: tuple[str, ...], path: str) -> list[str]:
    """Each target pattern (see family_spec: a PEFT-style name/suffix, or a ``*`` pattern over Linear layers) must
    select Linear or Conv2d layers only: PEFT would also wrap an Embedding, which no kohya loader reads, and fail on
    containers and norms. Returns PEFT's target_modules list (``*`` patterns expanded to module names)."""
    from ..families.spec import expand_targets, peft_targets

    layers = {n: (2 if isinstance(m, torch.nn.Linear) else 4 if isinstance(m, torch.nn.Conv2d) else 0)
              for n, m in module.named_modules() if n}
    hits = expand_targets(tuple(targets), layers)
    missing = [t for t, names in hits.items() if not names]
    wrong = []
    for t, names in hits.items():
        kinds = sorted({type(module.get_submodule(n)).__name__ for n in names if not layers[n]})
        if kinds:
            wrong.append(f"{t} ({', '.join(kinds)})")
    if missing:
        raise ConfigError(f"{path} names modules this model does not have: {', '.join(missing)}",
                          [{"path": path, "value": list(missing), "message": "no module with this name in the model",
                            "allowed": _ALLOWED}])
    if wrong:
        raise ConfigError(f"{path}: {', '.join(wrong)} are not Linear or Conv2d layers; LoRA wraps only those",
                          [{"path": path, "value": wrong, "message": "not a Linear or Conv2d layer", "allowed": _ALLOWED}])
    return peft_targets(tuple(targets), layers)


def add_lora(module: torch.nn.Module, *, rank: int, alpha: float, dropout: float, targets: tuple[str, ...],
             use_dora: bool, path: str) -> list[torch.nn.Parameter]:
    """Wrap the target layers with LoRA (fp32 weights), freeze everything else; returns the trainable params."""
    from peft import LoraConfig, inject_adapter_in_model

    target_names = _target_check(module, targets, path)
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_names,
                        init_lora_weights=True, use_dora=use_dora)
    # diffusers models have add_adapter (which also registers the config for their loaders); transformers'
    # own add_adapter demands a newer peft than diffusers supports, so text encoders get PEFT's injection.
    if hasattr(module, "peft_config") or type(module).__module__.startswith("diffusers"):
        module.add_adapter(config, adapter_name=ADAPTER)
    else:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    params = []
    for name, p in module.named_parameters():
        if "lora_" in name:
            # Trainable weights stay fp32 even when the frozen base is bf16/fp16: AdamW updates of ~1e-4 x lr
            # vanish in bf16's 8-bit mantissa.
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's LoRA tensors, whole, by PEFT's names. For a sharded module (shard_base) this all-gathers them:
    every process must call it."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
    if is_sharded(module):
        from ..distributed.shard import full_tensors

        return full_tensors(state)
    return {k: v.detach().clone() for k, v in state.items()}


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def load_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole LoRA tensors into the module (into this process's shards of them when it is sharded)."""
    from peft.utils import set_peft_model_state_dict

    if is_sharded(module):
        from ..distributed.shard import load_lora_sharded

        load_lora_sharded(module, state)
        return
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise RuntimeError(f"checkpoint has LoRA keys the model does not: {unexpected[:5]}")


@torch.no_grad()
def dora_row_scale(modules: dict[str, torch.nn.Module]) -> dict | None:
    """Range of ||W + s*B@A|| / ||W|| over the output channels of every DoRA layer, or None without DoRA.

    ComfyUI and Forge (as released in 2026) divide an output-axis DoRA magnitude by the norm of the base weight W
    instead of the adapted W + dW, so each output channel comes out scaled by exactly this ratio compared with
    PEFT/diffusers; recorded in the manifest so a user can see how far that is from 1 for their LoRA.
    """
    from peft.utils.integrations import dequantize_module_weight

    lo, hi, layers = float("inf"), 0.0, 0
    for module in modules.values():
        for layer in module.modules():
            if not getattr(layer, "use_dora", {}).get(ADAPTER):
                continue
            # PEFT's own dequantisation (a no-op for plain weights): an int8 / NF4 base (quantize.py) holds packed data
            w = dequantize_module_weight(layer.get_base_layer()).float()
            adapted = w + layer.get_delta_weight(ADAPTER).float()
            ratio = adapted.flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            lo, hi, layers = min(lo, float(ratio.min())), max(hi, float(ratio.max())), layers + 1
    return {"layers": layers, "min": lo, "max": hi} if layers else None


@dataclass
class Attached:
    lora_modules: dict  # component name -> the module carrying LoRA (denoisers, and trained text encoders)
    denoiser_params: list
    te_params: list
    streamers: dict  # offload.BlockStreamer per streamed denoiser
    shards: dict  # shard.shard_denoisers' summary per sharded denoiser


def attach_adapters(cfg, family, comps, device: torch.device, events, *, world: int = 1) -> Attached:
    """The run's adapters (Trainer._attach_lora): LoRA on the denoisers (and text encoders with
    train_text_encoder), an init_lora file's weights, fp8 storage, block streaming or sharding across the ``world``
    processes, then the move to ``device``.

    LoRA goes in on the host, before anything moves: so that fp8 casting, block streaming and sharding happen before
    the full-precision denoiser could reach the accelerator (it may not fit there), and so that a seed gives the same
    initial LoRA on every device and process. The text encoders are already where _prepare_data left them."""
    from ..runtime.offload import stream_denoisers
    from ..runtime.quantize import after_lora

    spec = family.spec
    out = Attached(dict(comps.denoisers), [], [], {}, {})
    for denoiser in comps.denoisers.values():
        if cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        out.denoiser_params += add_lora(denoiser, rank=cfg.lora_rank, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                                        targets=spec.targets(cfg.target_modules), use_dora=cfg.use_dora,
                                        path="target_modules")
        denoiser.train()
    if cfg.train_text_encoder:
        for name in spec.lora_text_encoders:
            te = comps.text_encoders[name]
            out.te_params += add_lora(te, rank=cfg.lora_rank, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                                      targets=cfg.text_encoder_target_modules, use_dora=cfg.use_dora,
                                      path="text_encoder_target_modules")
            te.train()
            out.lora_modules[name] = te
    if cfg.init_lora:
        from .init_from_file import init_from_file

        init_from_file(cfg, family.name, comps, out.lora_modules, events)
    after_lora(cfg, comps, out.lora_modules)  # fp8 storage follows injection (PEFT copies the base dtype), then
    # every LoRA tensor is checked to be trainable fp32
    out.streamers = stream_denoisers(cfg.offload_blocks, spec.blocks, comps.denoisers, device)
    if cfg.shard_base and world > 1:
        from ..distributed.shard import shard_denoisers

        out.shards = shard_denoisers(comps.denoisers, spec.blocks, device, world)
        # fully_shard replaced every parameter by its shard (a new Parameter): the optimizer must get those.
        out.denoiser_params = [p for d in comps.denoisers.values() for n, p in d.named_parameters() if p.requires_grad]
    for denoiser in comps.denoisers.values():
        denoiser.to(device)  # sharded ones are there already (a no-op for them)
    return out
