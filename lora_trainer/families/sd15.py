"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, 512 px, epsilon prediction."""
from __future__ import annotations

from .base import ModelFamily


class SD15(ModelFamily):
    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    text_encoder_names = ("text_encoder",)
    bucketing_default = False

    def default_resolution(self, prediction_type: str) -> int:
        return 512

    def _pipeline_extra_kwargs(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
