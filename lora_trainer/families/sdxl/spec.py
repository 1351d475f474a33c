"""SDXL as plain data (torch-free)."""
from __future__ import annotations

from .._unet.spec import sd_presets
from ..spec import FamilySpec

SPEC = FamilySpec("sdxl", "SDXL", "ddpm", ("unet",), ("text_encoder", "text_encoder_2"),
                  ("text_encoder", "text_encoder_2"), 1024, True, 64, sd_presets(), "attention",
                  sample_guidance=7.0, single_file_config_repo={None: "stabilityai/stable-diffusion-xl-base-1.0"})
