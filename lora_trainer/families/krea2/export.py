"""Krea 2's ComfyUI file: ``diffusion_model.`` + the original module names (``blocks.N.attn.wq``), what ai-toolkit
writes and the layout a loader that keeps Krea's own names patches; lora_A / lora_B with alpha / rank folded into
lora_B and no ``.alpha`` tensor: diffusers' Krea 2 converter (``_convert_non_diffusers_krea2_lora_to_diffusers``)
raises on any key but lora_A / lora_B (outputs/lora_files.alpha_state_dict, ``fold_alpha``)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .convert import native_name
from ...outputs.lora_files import alpha_state_dict


def comfy_state_dict(states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return alpha_state_dict("Krea 2", states, alpha=alpha, rank=rank, dtype=dtype, rename=native_name,
                            fold_alpha=True)
