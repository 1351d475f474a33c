"""Stable Diffusion UNet families (SD1.x, SD2.x, SDXL): CLIP conditioning, DDPM objective, kohya export."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..adapter import Components, ModelFamily


class UNetFamily(ModelFamily):

    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        ids = self.tokenize(comps.tokenizers["text_encoder"], captions).to(device)
        return {"encoder_hidden_states": comps.text_encoders["text_encoder"](ids, return_dict=False)[0]}

    def unet_kwargs(self, cond: Mapping[str, torch.Tensor], geometry: torch.Tensor) -> dict[str, Any]:
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}

    def predict(self, denoisers, noisy, t, cond, geometry):
        return denoisers["unet"](noisy, t, **self.unet_kwargs(cond, geometry), return_dict=False)[0]

    def tool_state_dict(self, states, configs, *, alpha, rank, dtype):
        from .export import kohya_state_dict

        return kohya_state_dict(self.name, states, alpha=alpha, rank=rank, unet_config=configs["unet"], dtype=dtype)
