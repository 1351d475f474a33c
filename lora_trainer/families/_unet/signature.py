"""How the Stable Diffusion UNet families (SD1.x, SD2.x, SDXL) are told apart (torch-free). One rule decides
between the three, for folders and for single files; each family's signature takes its own outcome of it. The
rules use structural facts, so that tiny test models, whose widths are not the real ones, classify like the real
checkpoints.

diffusers folder (a pipeline class no family lists):
  ``_class_name`` containing "XL", a non-null ``text_encoder_2`` component, or unet
  ``addition_embed_type == "text_time"``                                      -> sdxl
  other ``StableDiffusion*Pipeline`` classes: unet ``cross_attention_dim`` 768 -> sd15, 1024 -> sd2 (the real
  models' widths); otherwise text_encoder ``hidden_act`` "gelu" (OpenCLIP) -> sd2, "quick_gelu" (OpenAI CLIP)
  -> sd15; otherwise unet ``use_linear_projection`` or a per-block ``attention_head_dim`` list -> sd2, else sd15
  prediction type: scheduler/scheduler_config.json ``prediction_type`` (diffusers' default: epsilon).

single-file .safetensors (marker keys as in diffusers' single_file_utils CHECKPOINT_KEY_NAMES and ComfyUI's
model_detection):
  ``conditioner.embedders.1.model.``  (OpenCLIP-G next to CLIP-L)  -> sdxl
  ``conditioner.embedders.0.model.`` alone                         -> SDXL refiner: unsupported
  ``cond_stage_model.model.``         (OpenCLIP-H)                 -> sd2
  ``cond_stage_model.transformer.``   (OpenAI CLIP-L)              -> sd15
  else the UNet's attn2.to_k width (1024 -> sd2, 768 -> sd15), ``label_emb`` -> sdxl.
  A file must hold the unet, vae and text encoder. Prediction type: a ``v_pred`` key or modelspec metadata, else
  SD1/SDXL epsilon; SD2 files do not say (768-v and 512-base share the layout), so it stays unknown.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..signature import CHECKPOINT, DENOISER_PREFIX, FileKeys, FolderFacts, Match, Refusal, Signature, no_variant

_TO_K = DENOISER_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"  # the first cross-attention
SDXL_TEXT = "conditioner.embedders."
SD_TEXT = "cond_stage_model."
LORA_LAYOUT = ("Stable Diffusion UNet layout", ("down_blocks", "input_blocks", "mid_block"))


def _sd_family(unet_cfg: Mapping, te_cfg: Mapping) -> tuple[str, str]:
    """SD1.x or SD2.x: the siblings differ in the text encoder (CLIP-L / OpenCLIP-H) and its width."""
    cad = unet_cfg.get("cross_attention_dim")
    if cad == 768:
        return "sd15", "unet cross_attention_dim 768"
    if cad == 1024:
        return "sd2", "unet cross_attention_dim 1024"
    act = te_cfg.get("hidden_act")
    if act == "gelu":
        return "sd2", "text_encoder hidden_act gelu (OpenCLIP)"
    if act == "quick_gelu":
        return "sd15", "text_encoder hidden_act quick_gelu (OpenAI CLIP)"
    if unet_cfg.get("use_linear_projection") or isinstance(unet_cfg.get("attention_head_dim"), list):
        return "sd2", "unet use_linear_projection / per-block attention_head_dim"
    return "sd15", "unet layout of SD1.x"


def unet_folder(facts: FolderFacts) -> tuple[str, str] | None:
    """(family, evidence) of a UNet pipeline folder, or None."""
    cls = facts.pipeline_class
    if "XL" in cls:
        return "sdxl", "model_index _class_name " + cls
    if "text_encoder_2" in facts.components:
        return "sdxl", "text_encoder_2 component"
    if facts.config("unet").get("addition_embed_type") == "text_time":
        return "sdxl", "unet addition_embed_type text_time"
    if cls.startswith("StableDiffusion"):
        return _sd_family(facts.config("unet"), facts.config("text_encoder"))
    return None


def unet_file(k: FileKeys) -> tuple[str, Match | Refusal] | None:
    """(family, match or refusal) of a whole SD checkpoint, or None."""
    if k.has(SDXL_TEXT + "1.model."):
        return "sdxl", Match("conditioner.embedders.1.model.* (OpenCLIP-G of SDXL)")
    if k.has(SDXL_TEXT + "0.model."):
        return "sdxl", Refusal("SDXL refiner", "conditioner.embedders.0.model.* alone",
                               message="this is an SDXL refiner checkpoint; LoRA training needs the SDXL base")
    if k.has(SD_TEXT + "model."):
        return "sd2", Match("cond_stage_model.model.* (OpenCLIP-H of SD2)")
    if k.has(SD_TEXT + "transformer."):
        return "sd15", Match("cond_stage_model.transformer.* (CLIP-L of SD1)")
    to_k = k.header.get(_TO_K)
    if isinstance(to_k, dict) and to_k.get("shape"):
        width = to_k["shape"][-1]
        if width == 1024:
            return "sd2", Match("UNet attn2.to_k width 1024")
        if width == 768:
            return "sd15", Match("UNet attn2.to_k width 768")
    if k.has(DENOISER_PREFIX + "label_emb."):
        return "sdxl", Match("UNet label_emb (SDXL add-embedding)")
    return None


def unet_signature(name: str, *, text_prefix: str, prediction: str | None, prediction_note: str | None = None):
    """The signature of one of the three: its outcome of the shared rules."""
    def match_folder(facts: FolderFacts) -> str | None:
        found = unet_folder(facts)
        return found[1] if found and found[0] == name else None

    def match_file(k: FileKeys) -> Match | Refusal | None:
        found = unet_file(k)
        return found[1] if found and found[0] == name else None

    return Signature(
        pipelines=frozenset(), variant=no_variant, match_folder=match_folder, file_layout=CHECKPOINT,
        match_file=match_file,
        file_components=(("unet", (DENOISER_PREFIX,)), ("vae", ("first_stage_model.",)), ("text_encoder", (text_prefix,))),
        file_prediction=prediction, file_prediction_note=prediction_note, lora_layout=LORA_LAYOUT)
