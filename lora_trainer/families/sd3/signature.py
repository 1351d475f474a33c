"""How SD3 / SD3.5 is recognised from its files (torch-free)."""
from __future__ import annotations

from collections.abc import Mapping

from ..signature import Signature

PIPELINES = frozenset({"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                       "StableDiffusion3InpaintPipeline", "StableDiffusion3PAGPipeline",
                       "StableDiffusion3PAGImg2ImgPipeline", "StableDiffusion3ControlNetPipeline",
                       "StableDiffusion3ControlNetInpaintingPipeline"})


def variant(tcfg: Mapping):
    """Structural, so tiny test models classify like the real ones: MMDiT-X dual attention -> 3.5 medium; SD3.5's
    RMS q/k norm (or the real 38 layers) -> 3.5 large; neither -> SD3 medium."""
    if not tcfg:
        return None, "", None
    if tcfg.get("dual_attention_layers"):
        return "sd3.5-medium", "; transformer dual_attention_layers (MMDiT-X, SD3.5 medium)", None
    if tcfg.get("qk_norm"):
        return "sd3.5-large", f"; transformer qk_norm {tcfg['qk_norm']} without dual attention (SD3.5 large)", None
    if (tcfg.get("num_layers") or 0) >= 38:
        return "sd3.5-large", "; transformer num_layers >= 38 (SD3.5 large)", None
    return "sd3-medium", "; transformer without qk_norm or dual attention (SD3 medium)", None


SIGNATURE = Signature(pipelines=PIPELINES, variant=variant)
