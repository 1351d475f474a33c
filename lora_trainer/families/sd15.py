"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, 512 px, epsilon prediction."""
from __future__ import annotations

from ..family_spec import SPECS
from .unet import UNetFamily


class SD15(UNetFamily):
    spec = SPECS["sd15"]
    pipeline_class = "StableDiffusionPipeline"

    def _pipeline_extra_kwargs(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
