"""Krea 2's ComfyUI file: ``diffusion_model.`` + the original module names (``blocks.N.attn.wq``), what ai-toolkit
writes and the layout a loader that keeps Krea's own names patches; lora_A / lora_B with alpha / rank folded into
lora_B and no ``.alpha`` tensor: diffusers' Krea 2 converter (``_convert_non_diffusers_krea2_lora_to_diffusers``)
raises on any key but lora_A / lora_B, and a loader reading no alpha applies scale 1, so every such loader gets
exactly the trained delta. All of the scale in lora_B (musubi-tuner's convert_lora.py puts its square root into
each factor: the same delta) keeps lora_A as trained, so init_lora reads the trained factors back (exactly, for
an alpha / rank that is a power of two)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .convert import native_name
from ...outputs.export import MAGNITUDE, iter_modules, magnitude_fp32


def comfy_state_dict(states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for component, path, parts in iter_modules(states):
        if component != "transformer":
            raise ValueError(f"component {component!r} has no ComfyUI name in a Krea 2 LoRA")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.shape[0] != rank:
            raise ValueError(f"{component}.{path}: rank {a.shape[0]} differs from the configured rank {rank}")
        name = f"diffusion_model.{native_name(path)}"
        out[f"{name}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous().clone()
        # Folded in fp32 before the cast to the save precision, so the only rounding is the save's own.
        out[f"{name}.lora_B.weight"] = (b.detach().to("cpu", torch.float32) * (alpha / rank)).to(dtype).contiguous()
        if MAGNITUDE in parts:  # ComfyUI's DoRA layout [out, 1] (diffusers drops it with a warning)
            out[f"{name}.dora_scale"] = magnitude_fp32(parts[MAGNITUDE]).reshape(b.shape[0], *[1] * (a.dim() - 1))
    return out
