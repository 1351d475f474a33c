"""SDXL: two text encoders (CLIP ViT-L + OpenCLIP bigG), penultimate hidden states concatenated, pooled
embedding of the second encoder, and size/crop "time ids" as extra conditioning."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .spec import SPEC
from ..adapter import Components
from .._unet.adapter import UNetFamily


class SDXL(UNetFamily):
    spec = SPEC

    def encode_text(self, comps: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for name in self.text_encoder_classes:
            ids = self.tokenize(comps.tokenizers[name], captions).to(device)
            out = comps.text_encoders[name](ids, output_hidden_states=True, return_dict=True)
            # SDXL conditions on the penultimate layer of both encoders (as the diffusers pipeline does).
            hidden.append(out.hidden_states[-2])
            if name == "text_encoder_2":
                pooled = out.text_embeds
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "pooled": pooled}

    def unet_kwargs(self, cond: Mapping[str, torch.Tensor], geometry: torch.Tensor) -> dict[str, Any]:
        pooled = cond["pooled"]
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": geometry.to(pooled.dtype)}}

    def _pipeline_extra_kwargs(self) -> dict:
        return {"add_watermarker": False} if _has_watermark_arg() else {}


def _has_watermark_arg() -> bool:
    import inspect

    from diffusers import StableDiffusionXLPipeline

    return "add_watermarker" in inspect.signature(StableDiffusionXLPipeline.__init__).parameters


ADAPTER = SDXL
