"""Qwen-Image single files: ComfyUI's ``qwen_image_bf16.safetensors`` / ``qwen_image_fp8_e4m3fn.safetensors`` keep
diffusers' own module names (under ``model.diffusion_model.``, which runtime/single_file.py strips), and diffusers
0.42's single-file loader maps ``QwenImageTransformer2DModel`` checkpoints unchanged (single_file_model.py:
``lambda checkpoint, **kwargs: checkpoint``). So both directions are the identity; what is family-specific is the
check of a header's shapes against a transformer config. Torch-free."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._mmdit.convert import COMPONENT_PREFIXES, count_blocks, inner_width, rows_cols

__all__ = ["COMPONENT_PREFIXES", "ALL_IN_ONE_VAE", "ALL_IN_ONE_TEXT_ENCODERS", "config_checks", "from_diffusers",
           "to_diffusers"]

# ComfyUI ships Qwen-Image's VAE and text encoder as separate files; a checkpoint saved by ComfyUI would hold them
# under its usual prefixes (comfy/supported_models.py QwenImage: the "qwen25_7b" text encoder). Inferred, not seen
# in a release: the loader never reads them (the config source supplies both).
ALL_IN_ONE_VAE = "vae."
ALL_IN_ONE_TEXT_ENCODERS = {"text_encoder": "text_encoders.qwen25_7b.transformer."}


def to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """diffusers' mapping for QwenImageTransformer2DModel: the names as they are. Pops what it converts (the
    loader reports what is left as foreign tensors)."""
    return {k: checkpoint.pop(k) for k in list(checkpoint)}


def from_diffusers(sd: Mapping, config: Mapping) -> dict:
    """The inverse (the tests' single files): the same names."""
    return dict(sd)


def config_checks(shapes: Mapping[str, list], config: Mapping,
                  where: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """What the header's shapes (bare keys) say against ``where`` (transformer/config.json): a refusal completing
    "<file> ..." (or None), and (what, in the file, in the config) per figure that must agree."""
    if any(k.startswith("time_text_embed.guidance_embedder.") for k in shapes) != bool(config.get("guidance_embeds")):
        return f"disagrees with {where} about a guidance embedder (guidance_embeds)", []
    img_in, txt_in, proj_out = (rows_cols(shapes, k) for k in ("img_in.weight", "txt_in.weight", "proj_out.weight"))
    patch = int(config.get("patch_size", 2))
    out_channels = config.get("out_channels") or config.get("in_channels")
    return None, [("blocks", count_blocks(shapes, "transformer_blocks."), config.get("num_layers")),
                  ("inner width (img_in rows)", img_in[0], inner_width(config)),
                  ("in_channels (img_in columns)", img_in[1], config.get("in_channels")),
                  ("joint_attention_dim (txt_in columns)", txt_in[1], config.get("joint_attention_dim")),
                  ("output width (proj_out rows)", proj_out[0], patch * patch * out_channels if out_channels else None)]
