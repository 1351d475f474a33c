"""The kohya LoRA file of the Stable Diffusion UNet families (SD1.x, SD2.x, SDXL): the sd-scripts ``networks/lora.py``
layout, the one form every popular loader (ComfyUI, A1111, Forge, diffusers' kohya converter) accepts.

``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (scalar, the true alpha; loaders scale by
alpha / rank), text encoders as ``lora_te*_<module>``; module names from kohya_names.py. DoRA magnitudes are written
as fp32 ``.dora_scale`` in the output-axis layout outputs/export.py describes.

Public API::

    kohya_state_dict(family, states, *, alpha, rank, unet_config=None, dtype=torch.float16) -> dict[str, Tensor]
    kohya_module_name(family, component, peft_module_path, unet_config=None) -> str

``family`` is the name of a registered family with a UNet; ``unet_config`` its diffusers UNet config (dict or
FrozenDict), needed where the family names its UNet in SGM layout (``FamilySpec.kohya_sgm_unet``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import FAMILIES, get_spec
from ...outputs.export import MAGNITUDE, iter_modules, magnitude_fp32
from .kohya_names import KohyaNames

# PEFT suffix -> kohya suffix: kohya lora_down/lora_up have exactly PEFT's lora_A/lora_B shapes, convs included
# (down: Conv2d(in, r, k), up: Conv2d(r, out, 1x1)), so tensors are copied unchanged.
_KOHYA_SUFFIX = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def _names(family: str, unet_config: Any) -> KohyaNames:
    unet_families = tuple(f for f in FAMILIES if "unet" in get_spec(f).denoisers)
    if family not in unet_families:
        raise ValueError(f"unknown family {family!r}: expected one of {unet_families}")
    return KohyaNames(get_spec(family), unet_config)


def kohya_module_name(family: str, component: str, path: str, unet_config: Any = None) -> str:
    """Kohya LoRA module name (without ``.lora_down.weight``) for one PEFT module path of one component."""
    return _names(family, unet_config)(component, path)


def kohya_state_dict(family: str, states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int,
                     unet_config: Any = None, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """PEFT states -> kohya state dict (weights in ``dtype``; alpha as a float32 scalar so that a non-integer
    alpha is not rounded to fp16: every loader reads it with ``.item()``; DoRA magnitudes as fp32 ``dora_scale``)."""
    names = _names(family, unet_config)
    out: dict[str, torch.Tensor] = {}
    for component, path, parts in iter_modules(states):
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.shape[0] != rank:
            # One global alpha only reproduces PEFT's scaling (lora_alpha / r) if every module has rank `rank`.
            raise ValueError(f"{component}.{path}: rank {a.shape[0]} differs from the configured rank {rank}")
        name = names(component, path)
        if f"{name}.lora_down.weight" in out:
            raise ValueError(f"two modules map to the same kohya name {name!r}")
        for peft_suffix, kohya_suffix in _KOHYA_SUFFIX.items():
            out[f"{name}.{kohya_suffix}"] = parts[peft_suffix].detach().to("cpu", dtype).contiguous().clone()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        if MAGNITUDE in parts:  # [out, 1(, 1, 1)]: the weight's rank, output channels first (see outputs/export.py)
            out[f"{name}.dora_scale"] = magnitude_fp32(parts[MAGNITUDE]).reshape(b.shape[0], *[1] * (a.dim() - 1))
    return out


__all__ = ["kohya_module_name", "kohya_state_dict"]
