"""The tiny random SD1.x pipeline (tests, demo, benchmarks): SD1's layout with tiny widths."""
from __future__ import annotations

from ...testing.parts import seeded
from .._unet.tiny import pndm_scheduler, sd_pipeline

# tiny name -> what build() takes (the CLI's --family choices come from every family's VARIANTS).
VARIANTS = {"sd15": None}
DEFAULT = "sd15"


def build(variant=None, seed: int = 0):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched."""
    if variant not in VARIANTS.values():
        raise ValueError(f"unknown tiny SD1.x variant {variant!r}")
    with seeded(seed):
        # CLIP-L stand-in of width 32; SD1 uses 8 heads everywhere.
        return sd_pipeline(hidden=32, act="quick_gelu", attention_head_dim=8, linear_projection=False,
                           scheduler_factory=pndm_scheduler)
