"""The tiny random SD2.x pipelines (tests, demo, benchmarks): 2.x-base (epsilon) and 768-v (v-prediction)."""
from __future__ import annotations

from ...testing.parts import seeded
from .._unet.tiny import SD_SCHEDULE, pndm_scheduler, sd_pipeline

# tiny name -> the scheduler's prediction_type (the CLI's --family choices come from every family's VARIANTS).
VARIANTS = {"sd2": "epsilon", "sd2-v": "v_prediction"}
DEFAULT = "sd2"


def _v_scheduler():
    from diffusers import DDIMScheduler

    # Like stabilityai/stable-diffusion-2-1 (768-v).
    return DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="v_prediction")


def build(variant: str = "epsilon", seed: int = 0):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched."""
    if variant not in VARIANTS.values():
        raise ValueError(f"unknown tiny SD2.x variant {variant!r}; expected one of {', '.join(VARIANTS.values())}")
    with seeded(seed):
        # SD2's OpenCLIP-H is wider than SD1's CLIP-L (64 vs 32 here); SD2 keeps a constant head width.
        return sd_pipeline(hidden=64, act="gelu", attention_head_dim=(2, 2, 4, 4), linear_projection=True,
                           scheduler_factory=_v_scheduler if variant == "v_prediction" else pndm_scheduler)
