"""How FLUX.1 is recognised from its files (torch-free).

diffusers folder: a ``FluxPipeline`` class (also FluxImg2Img/Inpaint/ControlNet*: the same components, the same
transformer; the pipeline class is not what training loads); variant: transformer ``guidance_embeds`` true ->
"dev", else "schnell". A transformer whose ``out_channels`` differs from ``in_channels`` is image-conditioned
(Fill, Canny/Depth): unsupported.

single file (BFL layout, see _mmdit/signature.py) with ``vector_in.*`` (its CLIP input): variant ``guidance_in.*``
-> "dev" (``img_in`` input width 384 -> Fill, 128 -> Canny/Depth: unsupported), else "schnell". Without
``vector_in`` it is another FLUX-like model: unsupported. It usually holds the transformer only; what it lacks comes
from base_model_config or the spec's single_file_config_repo.
"""
from __future__ import annotations

from collections.abc import Mapping

from .._mmdit.signature import CLIP_L, T5XXL, VAE, dit_family
from ..signature import DIT, FileKeys, Match, Refusal, Signature, no_folder_rule

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


def match_file(k: FileKeys) -> Match | Refusal | None:
    if dit_family(k) != "flux1":
        return None
    where = k.where
    if not k.dit_has("vector_in."):
        return Refusal("FLUX-like (not FLUX.1)", f"BFL double_blocks + img_in{where} but no vector_in.*, FLUX.1's CLIP input")
    if not k.dit_has("guidance_in."):
        return Match(f"BFL FLUX layout: double_blocks.*.img_attn + img_in{where}; no guidance_in (schnell)", "schnell")
    img_in = k.dit_entry("img_in.weight") or {}
    width = (img_in.get("shape") or [0, 0])[-1] if isinstance(img_in, dict) else 0
    if width in (384, 128):  # diffusers: 384 -> flux-fill, 128 -> flux-depth (control), 64 -> flux-dev
        return Refusal("FLUX.1 Fill" if width == 384 else "FLUX.1 Canny/Depth control",
                       f"img_in input width {width}, not 64", "use FLUX.1-dev or FLUX.1-schnell (text-to-image)")
    return Match(f"BFL FLUX layout: double_blocks.*.img_attn + img_in{where}; guidance_in.* (dev)", "dev")


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    file_components=(VAE, ("text_encoder", (CLIP_L,)), ("text_encoder_2", (T5XXL,))),
    file_prediction="flow", file_prediction_note=None,
    lora_layout=("FLUX layout", ("double_blocks", "single_blocks", "single_transformer_blocks")))
