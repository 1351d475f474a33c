"""A leaner forward for PEFT's plain LoRA Linear layers: the same function, fewer kernels per layer.

PEFT's ``lora.Linear.forward`` computes ``result + lora_B(lora_A(dropout(x))) * scaling`` after casting ``x`` to the
LoRA weights' dtype. Per layer and step that is, beyond the three matmuls: a full-size multiply and add in the
forward, their backwards (another full-size multiply), and with a bf16 base under autocast two full-size casts of
``x`` (to fp32 for PEFT's check, back to bf16 inside autocast's matmul) and their backwards. Here the scale and the
add ride in the last matmul's epilogue (``addmm(out, h, B^T, alpha=scaling)``), and under autocast ``x`` goes to the
LoRA matmul as it is.

The weights, their names, the state dict, the files and the adapter config stay PEFT's: only the instance's
``forward`` is replaced. A layer takes the lean path only when it is a plain LoRA (the exact ``lora.Linear`` class,
no DoRA or other variant, no LoRA bias, the single adapter the trainer adds); at call time it falls back to PEFT's
forward when the adapter is disabled or merged, when extra arguments come in, or when the dtypes would need PEFT's
casts (a base in another dtype than the LoRA without autocast). Measured in bench/RESULTS.md ("Less glue per
step")."""
from __future__ import annotations

import types

import torch

ADAPTER = "default"


def lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    lora_a = self.lora_A[ADAPTER].weight
    if (args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [ADAPTER]
            or (x.dtype != lora_a.dtype and not torch.is_autocast_enabled(x.device.type))):
        return type(self).forward(self, x, *args, **kwargs)
    out = self.base_layer(x)
    dropout = self.lora_dropout[ADAPTER]  # PEFT's Identity when lora_dropout is 0: a module call per layer spared
    h = torch.nn.functional.linear(x if isinstance(dropout, torch.nn.Identity) else dropout(x), lora_a)
    if out.dtype != h.dtype and not torch.is_autocast_enabled(x.device.type):
        # a base whose output dtype differs from its input's (PEFT adds in the wider dtype, then casts back)
        return (out + torch.nn.functional.linear(h, self.lora_B[ADAPTER].weight) * self.scaling[ADAPTER]).to(out.dtype)
    shape = out.shape
    # addmm's alpha scales only the product, and beta=1 adds ``out`` unscaled: one kernel for B, the scale and the add
    return torch.addmm(out.reshape(-1, shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B[ADAPTER].weight.t(),
                       alpha=self.scaling[ADAPTER]).view(shape)


def eligible(layer: torch.nn.Module) -> bool:
    from peft.tuners.lora.layer import Linear

    return (type(layer) is Linear and list(layer.lora_A) == [ADAPTER] and not layer.lora_variant
            and not layer.merged and layer.lora_A[ADAPTER].bias is None and layer.lora_B[ADAPTER].bias is None)


def fuse_lora_forward(modules) -> int:
    """Give every eligible LoRA layer of ``modules`` the lean forward; returns how many took it. Trainer setup, after
    injection, init_lora and the base's storage format, before compilation (which then traces the lean forward)."""
    count = 0
    for module in modules:
        for layer in module.modules():
            if eligible(layer):
                layer.forward = types.MethodType(lean_forward, layer)
                count += 1
    return count


def lora_layer_count(modules) -> int:
    """Every adapter layer of ``modules`` (LoRA, DoRA, LoKr, LoHa; Linear or conv)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(layer, BaseTunerLayer) for module in modules for layer in module.modules())


def unfuse_lora_forward(modules) -> None:
    """PEFT's own forward back on every layer (a test's or a benchmark's A/B)."""
    for module in modules:
        for layer in module.modules():
            if eligible(layer):
                layer.__dict__.pop("forward", None)
