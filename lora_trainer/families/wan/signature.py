"""How Wan 2.1 text-to-video is recognised from its files (torch-free).

diffusers folder: a ``WanPipeline`` with no image projection (``image_dim``: the I2V releases, refused). The
variant: 1.3B (12 heads, 30 layers) or 14B (40 heads, 40 layers) by width for Wan 2.1's 16 latent channels;
``ti2v-5b`` (Wan 2.2 TI2V-5B) by its 48 (its VAE compresses 16x spatially); ``t2v-a14b`` (Wan 2.2 T2V-A14B) by a
second expert, ``transformer_2`` in model_index.json (the low-noise transformer; each expert is a Wan 2.1 14B
transformer, so only the pipeline tells).

single file (ComfyUI's ``wan2.1_t2v_1.3B_bf16.safetensors``, the original Wan layout): ``patch_embedding``,
``text_embedding.0``, ``blocks.N.self_attn.q``, ``head.modulation``, under ``model.diffusion_model.`` or bare; the
width is ``patch_embedding.weight``'s first dimension (1536: 1.3B, 5120: 14B), its input channels 48 for 2.2
TI2V-5B; an I2V file has ``img_emb`` / ``blocks.N.cross_attn.k_img`` (or 36 input channels). diffusers' ``convert_wan_transformer_to_diffusers`` maps it.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..signature import DIT, FileKeys, FolderFacts, Match, Refusal, Signature, no_folder_rule
from .experts import A14B, SECOND_EXPERT

PIPELINES = frozenset({"WanPipeline"})
# width (heads x 128) -> variant
_SIZES = {1536: "t2v-1.3b", 5120: "t2v-14b"}
_T2V_HINT = "use a Wan 2.1 text-to-video release (Wan-AI/Wan2.1-T2V-1.3B-Diffusers or -14B-Diffusers)"


def variant(tcfg: Mapping):
    """(variant, evidence, unsupported) from transformer/config.json (empty if unreadable)."""
    if tcfg.get("image_dim") or tcfg.get("added_kv_proj_dim"):
        return None, "", ("a Wan transformer with an image projection (image_dim)", "Wan image-to-video", _T2V_HINT)
    if tcfg.get("in_channels", 16) == 48:
        return "ti2v-5b", " (ti2v-5b: 48 latent channels, Wan 2.2's VAE)", None
    if tcfg.get("in_channels", 16) != 16:
        return None, "", (f"a Wan transformer reading {tcfg.get('in_channels')} latent channels",
                          "Wan image-to-video (image latents concatenated)", _T2V_HINT)
    width = int(tcfg.get("num_attention_heads", 40)) * int(tcfg.get("attention_head_dim", 128))
    name = _SIZES.get(width)
    return name, f" ({name}: width {width})" if name else "", None


def folder_variant(facts: FolderFacts, variant: str | None) -> tuple[str | None, str]:
    if SECOND_EXPERT in facts.components:
        return A14B, f"; {A14B}: two experts (transformer, {SECOND_EXPERT})"
    return variant, ""


def named_variant(name: str, variant: str | None) -> str | Refusal | None:
    """A single file named as one of Wan 2.2 A14B's experts (ComfyUI's ``wan2.2_t2v_high_noise_14B_fp16``): its
    header is a Wan 2.1 14B transformer's, only the name tells; one expert alone is half the model, refused."""
    low = name.lower().replace("-", "_")
    if variant != "ti2v-5b" and low.endswith(".safetensors") and ("high_noise" in low or "low_noise" in low):
        return Refusal("Wan 2.2 T2V-A14B expert", "", message=(
            f"{name} is one expert of Wan 2.2 T2V-A14B (its name says high_noise / low_noise; the two experts "
            "denoise different noise levels and train together or one at a time only as a pair)"),
            hint="set base_model to the diffusers folder or hub id holding both experts "
                 "(Wan-AI/Wan2.2-T2V-A14B-Diffusers: transformer + transformer_2) and choose with train_experts")
    return variant


def _width(k: FileKeys) -> int | None:
    entry = k.dit_entry("patch_embedding.weight")
    return int(entry["shape"][0]) if entry and entry.get("shape") else None


def match_file(k: FileKeys) -> Match | Refusal | None:
    if not all(m in k.dit for m in ("patch_embedding.weight", "text_embedding.0.weight", "head.modulation")):
        return None
    where = k.where
    if k.dit_has("img_emb.") or "blocks.0.cross_attn.k_img.weight" in k.dit:
        return Refusal("Wan image-to-video", f"img_emb / cross_attn.k_img tensors{where}", _T2V_HINT)
    entry = k.dit_entry("patch_embedding.weight")
    channels = int(entry["shape"][1]) if entry and entry.get("shape") else 16
    evidence = f"Wan layout: patch_embedding, text_embedding, head.modulation{where}"
    if channels == 48:
        return Match(f"{evidence}; 48 latent channels (Wan 2.2 TI2V-5B)", "ti2v-5b")
    if channels != 16:
        return Refusal("Wan image-to-video", f"patch_embedding reads {channels} channels{where}", _T2V_HINT)
    return Match(evidence, _SIZES.get(_width(k)))


SIGNATURE = Signature(
    pipelines=PIPELINES, variant=variant, match_folder=no_folder_rule, file_layout=DIT, match_file=match_file,
    # ComfyUI ships the VAE and umt5-xxl as separate files: a single file is the transformer.
    file_components=(), file_prediction="flow", file_prediction_note=None,
    lora_layout=("Wan layout", ("self_attn", "cross_attn", "attn1", "attn2")),
    folder_variant=folder_variant, named_variant=named_variant)
