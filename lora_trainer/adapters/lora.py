"""PEFT LoRA (and DoRA) on one module: injecting it, and reading and writing its weights while the module is whole.

The run's order of injection, init_lora, quantisation, streaming and sharding is training/attach.py's; the LoRA state
of a module that may be sharded is distributed/shard.py's (lora_state, load_lora_state)."""
from __future__ import annotations

import torch

from ..contract.errors import ConfigError
from ..families.spec import expand_targets, peft_targets

ADAPTER = "default"
MAGNITUDE = "lora_magnitude_vector"  # get_peft_model_state_dict's name for a DoRA layer's magnitude
# What PEFT names the trained tensors of its LoRA / DoRA, LoKr and LoHa layers (each layer's adapter_layer_names):
# every place that tells adapter weights from base weights by name goes through is_adapter_param.
ADAPTER_PARTS = ("lora_", "lokr_", "hada_")


def is_adapter_param(name: str) -> bool:
    return any(part in name for part in ADAPTER_PARTS)


_ALLOWED = ("a preset (attention, attention_mlp, all_linear), or module names such as to_q, to_k, to_v, to_out.0, "
            "proj_in, ff.net.2, conv1 (UNet), add_q_proj, proj_mlp (FLUX/SD3 transformer) or q_proj, k_proj, v_proj, "
            "out_proj, fc1, fc2 (text encoders)")


def _target_check(module: torch.nn.Module, targets: tuple[str, ...], path: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Each target pattern (see families/spec.py: a PEFT-style name/suffix, or a ``*`` pattern over Linear layers) must
    select Linear or Conv2d layers only: PEFT would also wrap an Embedding, which no kohya loader reads, and fail on
    containers and norms. Returns PEFT's target_modules list (``*`` patterns expanded to module names; every pattern
    expanded to the module names outside ``skip`` where it is given)."""
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
    if not skip:
        return peft_targets(tuple(targets), layers)
    kept = {t: [n for n in names if not _under(n, skip)] for t, names in hits.items()}
    unread = [t for t, names in kept.items() if not names]
    if unread:
        raise ConfigError(f"{path}: {', '.join(unread)} select only layers whose output this model's conditioning "
                          "never reads; LoRA there could not learn",
                          [{"path": path, "value": unread, "message": f"only in {', '.join(skip)}, whose output the "
                            "conditioning never reads", "allowed": _ALLOWED}])
    return sorted({n for names in kept.values() for n in names})


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def add_lora(module: torch.nn.Module, *, rank: int, alpha: float, dropout: float, targets: tuple[str, ...],
             use_dora: bool, path: str, skip: tuple[str, ...] = (), network=None) -> list[torch.nn.Parameter]:
    """Wrap the target layers with LoRA (fp32 weights), freeze everything else; returns the trainable params.
    Layers under a ``skip`` prefix get none (a text encoder's layers whose output the conditioning never reads).
    ``network`` (adapters/lycoris.py Network): LoKr or LoHa instead of LoRA."""
    from peft import LoraConfig, inject_adapter_in_model

    target_names = _target_check(module, targets, path, skip)
    module.requires_grad_(False)
    if network is not None and network.lycoris:
        config = network.peft_config(rank=rank, alpha=alpha, dropout=dropout, targets=target_names)
    else:
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
        if is_adapter_param(name):
            # Trainable weights stay fp32 even when the frozen base is bf16/fp16: AdamW updates of ~1e-4 x lr
            # vanish in bf16's 8-bit mantissa.
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def peft_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's LoRA tensors by PEFT's names, as views of its parameters (a sharded module's: of its shards)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=ADAPTER)


def plain_lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of an unsharded module's LoRA tensors (distributed.shard.lora_state takes any module)."""
    return {k: v.detach().clone() for k, v in peft_state(module).items()}


def load_plain_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole LoRA tensors into an unsharded module (distributed.shard.load_lora_state takes any module)."""
    from peft.utils import set_peft_model_state_dict

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


def config_value(value):
    """A PEFT config field as JSON holds it: sets sorted, tuples as lists, enums (peft_type, task_type) by value."""
    if isinstance(value, (set, frozenset, tuple)):
        value = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if hasattr(value, "value") and not isinstance(value, (str, int, float)):
        value = value.value
    return value
