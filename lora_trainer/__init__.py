"""LoRA trainer for Stable Diffusion (SD1.5, SD2.x, SDXL) models."""

__version__ = "0.1.0"
