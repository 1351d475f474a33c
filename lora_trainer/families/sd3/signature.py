"""How SD3 / SD3.5 is recognised from its files (torch-free).

diffusers folder: a ``StableDiffusion3Pipeline`` class (also its Img2Img/Inpaint/PAG/ControlNet* classes); variant
by structure: transformer ``dual_attention_layers`` non-empty (MMDiT-X attn2 blocks) -> "sd3.5-medium"; else
``qk_norm`` set (SD3.5 added RMS q/k norms; SD3 medium has none) or ``num_layers`` >= 38 (the real 3.5 large
depth) -> "sd3.5-large"; else "sd3-medium".

single file (SAI MMDiT layout, see _mmdit/signature.py): variant ``x_block.attn2.*`` -> "sd3.5-medium";
``attn.ln_q.*`` (RMS q/k norm) or ``joint_blocks.37.*`` -> "sd3.5-large"; else "sd3-medium". It usually holds the
transformer only; what it lacks comes from base_model_config or the spec's single_file_config_repo.
"""
from __future__ import annotations

from collections.abc import Mapping

from .._mmdit.signature import CLIP_G, CLIP_L, T5XXL, VAE, dit_family
from ..signature import DIT, FileKeys, Match, Signature, no_folder_rule

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


def match_file(k: FileKeys) -> Match | None:
    if dit_family(k) != "sd3":
        return None
    if any(name.startswith("joint_blocks.") and ".x_block.attn2." in name for name in k.dit):
        variant, why = "sd3.5-medium", "x_block.attn2.* (MMDiT-X dual attention of SD3.5 medium)"
    elif any(name.startswith("joint_blocks.") and ".attn.ln_q." in name for name in k.dit):
        variant, why = "sd3.5-large", "attn.ln_q.* (RMS q/k norm of SD3.5) without x_block.attn2"
    elif k.dit_has("joint_blocks.37."):
        variant, why = "sd3.5-large", "joint_blocks.37.* (38 blocks: SD3.5 large)"
    else:
        variant, why = "sd3-medium", "no q/k norm, no x_block.attn2 (SD3 medium)"
    return Match(f"SAI MMDiT layout: joint_blocks.*.x_block/context_block{k.where}; {why}", variant)


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    file_components=(VAE, ("text_encoder", (CLIP_L,)), ("text_encoder_2", (CLIP_G,)), ("text_encoder_3", (T5XXL,))),
    file_prediction="flow", file_prediction_note=None, lora_layout=("SD3 layout", ("joint_blocks",)))
