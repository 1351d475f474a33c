"""SD1.x as plain data (torch-free)."""
from __future__ import annotations

from .._unet.spec import sd_presets
from ..spec import FamilySpec

SPEC = FamilySpec("sd15", "SD1.x", "ddpm", ("unet",), ("text_encoder",), ("text_encoder",), 512, False, 8,
                  sd_presets(), "attention", sample_guidance=7.0,
                  single_file_config_repo={None: "stable-diffusion-v1-5/stable-diffusion-v1-5"})
