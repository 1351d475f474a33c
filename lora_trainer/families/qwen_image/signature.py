"""How Qwen-Image is recognised from its files (torch-free).

diffusers folder: a ``QwenImagePipeline`` (the Img2Img / Inpaint pipelines hold the same components). Qwen-Image and
Qwen-Image-2512 have the same files (transformer, VAE, encoder and scheduler configs), so the config has nothing to
tell; 2512 is told by its name (``Qwen/Qwen-Image-2512``, a folder or file named so): ``named_variant``. A
transformer with ``guidance_embeds`` or ``zero_cond_t`` / ``use_additional_t_cond`` / ``use_layer3d_rope`` (the
edit / layered releases' switches) is not the text-to-image model: refused.

single file (ComfyUI's ``qwen_image_bf16.safetensors`` / ``qwen_image_fp8_e4m3fn.safetensors``): diffusers' own
module names (``img_in``, ``txt_norm``, ``txt_in``, ``transformer_blocks.N.img_mod.1`` ...), under
``model.diffusion_model.`` or bare; diffusers' single-file loader maps them unchanged. Qwen-Image 2.1's file has
``txt_in.text_norm`` instead of ``txt_norm`` (the probe names it as unsupported first).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from ..signature import DIT, FileKeys, Match, Refusal, Signature, no_folder_rule

PIPELINES = frozenset({"QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"})
_EDIT_SWITCHES = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")
_MARKERS = ("img_in.weight", "txt_norm.weight", "txt_in.weight", "transformer_blocks.0.img_mod.1.weight")


def variant(tcfg: Mapping):
    """(variant, evidence, unsupported) from transformer/config.json (empty if unreadable)."""
    switched = [k for k in _EDIT_SWITCHES if tcfg.get(k)]
    if switched:
        return None, "", (f"a Qwen-Image transformer with {', '.join(switched)}",
                          "an editing or layered Qwen-Image release", "use Qwen/Qwen-Image or Qwen/Qwen-Image-2512")
    if tcfg.get("guidance_embeds"):
        return None, "", ("a Qwen-Image transformer with guidance_embeds", "a guidance-distilled Qwen-Image",
                          "use Qwen/Qwen-Image or Qwen/Qwen-Image-2512")
    return None, "", None


# "Qwen/Qwen-Image-2512", "qwen_image_2512_fp8_e4m3fn.safetensors", ".../Qwen-Image-2512/" (never across a "/").
_2512 = re.compile(r"qwen[-_ ]?image[-_ ]?2512", re.IGNORECASE)


def named_variant(name: str, variant: str | None) -> str | None:
    """Qwen-Image-2512 by its name (its files are Qwen-Image's); the variant the files tell otherwise."""
    return "2512" if variant is None and _2512.search(name) else variant


def match_file(k: FileKeys) -> Match | Refusal | None:
    if not all(m in k.dit for m in _MARKERS):
        return None
    return Match(f"Qwen-Image layout: img_in, txt_norm, txt_in, transformer_blocks.*.img_mod.1{k.where}")


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    # ComfyUI ships the VAE and the Qwen2.5-VL encoder as separate files: a single file is the transformer.
    file_components=(), file_prediction="flow", file_prediction_note=None,
    lora_layout=("Qwen-Image layout", ("img_mod", "txt_mod", "img_mlp", "txt_mlp")), named_variant=named_variant)
