"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, 512 px, epsilon prediction."""
from __future__ import annotations

from .spec import SPEC
from .._unet.adapter import UNetFamily


class SD15(UNetFamily):
    spec = SPEC

    def _pipeline_extra_kwargs(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


ADAPTER = SD15
