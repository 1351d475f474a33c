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
from ...outputs.lora_files import alpha_state_dict


def tool_state_dict(states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return alpha_state_dict("Anima", states, alpha=alpha, rank=rank, dtype=dtype, rename=native_module,
                            fold_alpha=True)
