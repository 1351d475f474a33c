"""Anima's tool file (ComfyUI / Forge): ``diffusion_model.`` + the original Cosmos-Predict2 module names
(``blocks.N.self_attn.q_proj``, ``cross_attn``, ``mlp.layer1/2``, ``adaln_modulation_*``), what ai-toolkit writes
for Anima and what diffusers' ``_convert_non_diffusers_anima_lora_to_diffusers`` (AnimaLoraLoaderMixin) maps back.

No ``.alpha`` tensors: diffusers' Anima loader refuses any key without "lora" in it (load_lora_weights' format
check, which runs after its converter), so alpha / rank is folded into lora_B instead -- the file then means the
same to a loader that applies alpha / rank from ``.alpha`` (ComfyUI: scale 1 without it) and to diffusers (which
reads no alpha from such a file). ss_network_alpha in the metadata still records the trained alpha.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .convert import native_module
from ...outputs.lora_files import MAGNITUDE, iter_modules, magnitude_fp32


def tool_state_dict(states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for component, path, parts in iter_modules(states):
        if component != "transformer":
            raise ValueError(f"component {component!r} has no ComfyUI name in an Anima LoRA")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.shape[0] != rank:
            raise ValueError(f"{component}.{path}: rank {a.shape[0]} differs from the configured rank {rank}")
        name = f"diffusion_model.{native_module(path)}"
        out[f"{name}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous().clone()
        out[f"{name}.lora_B.weight"] = (b.detach().to("cpu", torch.float32) * (alpha / rank)).to(dtype).contiguous()
        if MAGNITUDE in parts:  # ComfyUI's DoRA layout [out, 1] (diffusers drops it with a warning)
            out[f"{name}.dora_scale"] = magnitude_fp32(parts[MAGNITUDE]).reshape(b.shape[0], 1)
    return out
