"""How FLUX.1 is recognised from its files (torch-free)."""
from __future__ import annotations

from collections.abc import Mapping

from ..signature import Signature

# Trained as FluxPipeline: the same components and the same text-to-image transformer (the trainer loads
# components, not the pipeline class; a ControlNet pipeline's controlnet is not used).
PIPELINES = frozenset({"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlNetPipeline",
                       "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline"})


def variant(tcfg: Mapping):
    """(variant, evidence, unsupported) from transformer/config.json (empty if unreadable)."""
    if not tcfg:
        return None, "", None
    ic, oc = tcfg.get("in_channels"), tcfg.get("out_channels")
    if ic is not None and oc is not None and ic != oc:
        return None, "", (f"a FLUX.1 transformer with in_channels {ic} != out_channels {oc}",
                          "an image-conditioned model such as FLUX.1 Fill or Canny/Depth",
                          "use FLUX.1-dev or FLUX.1-schnell (text-to-image)")
    if tcfg.get("guidance_embeds"):
        return "dev", "; transformer guidance_embeds true (dev)", None
    return "schnell", "; transformer guidance_embeds false (schnell)", None


SIGNATURE = Signature(pipelines=PIPELINES, variant=variant)
