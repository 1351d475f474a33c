"""Z-Image's ComfyUI file: ai-toolkit's layout, ``diffusion_model.<diffusers module name>.lora_A/lora_B.weight``
with an ``.alpha`` tensor per module (ComfyUI ignores safetensors metadata and applies alpha / rank only from
``.alpha``). diffusers reads it too: ``ZImagePipeline.load_lora_weights`` sends ``diffusion_model.`` / ``.alpha``
files through ``_convert_non_diffusers_z_image_lora_to_diffusers``, which bakes alpha / rank into the weights."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ...outputs.export import MAGNITUDE, iter_modules, magnitude_fp32

PREFIX = "diffusion_model."


def comfy_state_dict(states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for component, path, parts in iter_modules(states):
        if component != "transformer":
            raise ValueError(f"component {component!r} has no ComfyUI name in a Z-Image LoRA")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.shape[0] != rank:
            raise ValueError(f"{component}.{path}: rank {a.shape[0]} differs from the configured rank {rank}")
        name = PREFIX + path
        out[f"{name}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous().clone()
        out[f"{name}.lora_B.weight"] = b.detach().to("cpu", dtype).contiguous().clone()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        if MAGNITUDE in parts:
            out[f"{name}.dora_scale"] = magnitude_fp32(parts[MAGNITUDE]).reshape(b.shape[0], 1)
    return out
