"""SD2.x as plain data (torch-free)."""
from __future__ import annotations

from .._unet.spec import sd_presets
from ..spec import FamilySpec

SPEC = FamilySpec("sd2", "SD2.x", "ddpm", ("unet",), ("text_encoder",), ("text_encoder",), 768, False, 8,
                  sd_presets(), "attention", sample_guidance=7.0,
                  single_file_config_repo={None: "stabilityai/stable-diffusion-2-1"})
