"""Qwen-Image's LoRA file for ComfyUI / Forge: diffusers' module names under ``diffusion_model.`` with
``lora_A`` / ``lora_B`` and a ``.alpha`` scalar per module, what ai-toolkit and SimpleTuner (``--lora_format
comfyui``) write. ComfyUI's Qwen-Image model keeps diffusers' names, so comfy/lora.py maps ``diffusion_model.<name>``
(its generic rule; also ``transformer.``, bare and ``lycoris_`` names); diffusers reads the same file through
``_convert_non_diffusers_qwen_lora_to_diffusers`` (``.alpha`` / ``diffusion_model.`` trigger it; alpha / rank is
baked into A and B). ComfyUI ignores safetensors metadata, hence the alpha tensors."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ...outputs.export import MAGNITUDE, iter_modules, magnitude_fp32

PREFIX = "diffusion_model."


def tool_state_dict(states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for component, path, parts in iter_modules(states):
        if component != "transformer":
            raise ValueError(f"component {component!r} has no ComfyUI name in a Qwen-Image LoRA")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.shape[0] != rank:
            raise ValueError(f"{component}.{path}: rank {a.shape[0]} differs from the configured rank {rank}")
        name = PREFIX + path
        out[f"{name}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous().clone()
        out[f"{name}.lora_B.weight"] = b.detach().to("cpu", dtype).contiguous().clone()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        if MAGNITUDE in parts:  # ComfyUI's DoRA layout [out, 1] (diffusers drops it with a warning)
            out[f"{name}.dora_scale"] = magnitude_fp32(parts[MAGNITUDE]).reshape(b.shape[0], *[1] * (a.dim() - 1))
    return out
