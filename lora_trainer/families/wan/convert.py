"""Wan single files in the original layout (ComfyUI's ``wan2.1_t2v_1.3B_bf16.safetensors``: ``patch_embedding``,
``time_embedding``, ``text_embedding``, ``blocks.N.self_attn.q`` / ``cross_attn`` / ``ffn.0`` / ``modulation``,
``head.head`` / ``head.modulation``), read with diffusers' own ``convert_wan_transformer_to_diffusers`` (a rename:
width-agnostic); ``from_diffusers`` is its inverse, for the tests' tiny single files. Torch-free at import."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .._mmdit.convert import count_blocks, inner_width, rows_cols

__all__ = ["COMPONENT_PREFIXES", "ALL_IN_ONE_VAE", "ALL_IN_ONE_TEXT_ENCODERS", "config_checks", "from_diffusers",
           "to_diffusers", "tool_file_fused_parts", "tool_file_to_peft"]

# ComfyUI ships the Wan VAE and umt5-xxl as their own files; an all-in-one save would keep them under these.
COMPONENT_PREFIXES = ("text_encoders.", "vae.")
ALL_IN_ONE_VAE = "vae."
ALL_IN_ONE_TEXT_ENCODERS: dict[str, str] = {}

# diffusers' names -> the original's: the inverse of diffusers' TRANSFORMER_KEYS_RENAME_DICT for text-to-video.
_TOP = (("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
        ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
        ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
        ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
        ("condition_embedder.time_proj.", "time_projection.1."), ("proj_out.", "head.head."))
_BLOCK = ((".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_q.", ".q."), (".to_k.", ".k."),
          (".to_v.", ".v."), (".to_out.0.", ".o."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."))
_NORM = re.compile(r"^(blocks\.\d+\.)norm([23])\.")


def to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """diffusers 0.42's converter; it takes every tensor out of ``checkpoint``."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(checkpoint)


def _original(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    for new, old in _TOP:
        if key.startswith(new):
            return old + key[len(new):]
    if key.startswith("blocks."):
        key = _NORM.sub(lambda m: f"{m.group(1)}norm{'3' if m.group(2) == '2' else '2'}.", key)
        key = re.sub(r"^(blocks\.\d+\.)scale_shift_table$", r"\1modulation", key)
        for new, old in _BLOCK:
            key = key.replace(new, old)
    return key


def from_diffusers(sd: Mapping[str, Any], config: Mapping) -> dict[str, Any]:
    """A diffusers WanTransformer3DModel state dict (text-to-video) -> the original layout."""
    if config.get("image_dim") or config.get("added_kv_proj_dim"):
        raise ValueError("wan from_diffusers: an image-to-video transformer (image_dim) has no inverse here")
    return {_original(k): v for k, v in sd.items()}


def config_checks(shapes: Mapping[str, list], config: Mapping,
                  where: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """What the header's shapes (bare keys) say against ``where`` (transformer/config.json)."""
    patch = shapes.get("patch_embedding.weight") or [None, None]
    text = rows_cols(shapes, "text_embedding.0.weight")
    ffn = rows_cols(shapes, "blocks.0.ffn.0.weight")
    if any(k.startswith("img_emb.") for k in shapes) != bool(config.get("image_dim")):
        return f"disagrees with {where} about an image projection (image_dim: image-to-video)", []
    return None, [("blocks", count_blocks(shapes, "blocks."), config.get("num_layers")),
                  ("inner width (patch_embedding rows)", patch[0], inner_width(config)),
                  ("in_channels (patch_embedding columns)", patch[1], config.get("in_channels")),
                  ("text_dim (text_embedding.0 columns)", text[1], config.get("text_dim")),
                  ("ffn_dim (blocks.0.ffn.0 rows)", ffn[0], config.get("ffn_dim"))]


def tool_file_fused_parts(key: str) -> int:
    return 1  # one module per key: q / k / v are separate Linears in both layouts


def tool_file_to_peft(sd: dict) -> dict:
    """The ComfyUI file (``diffusion_model.<original name>.lora_A/B.weight`` + ``.alpha``, adapter.tool_state_dict)
    with diffusers' module names, for init_lora: each module's name through diffusers' own single-file rename
    (convert_wan_transformer_to_diffusers), the tensors and alphas untouched (so a continued run writes the same
    file back); other files are returned as they are."""
    if not any(k.startswith("diffusion_model.blocks.") for k in sd):
        return sd
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    out = {}
    for key, tensor in sd.items():
        if not key.startswith("diffusion_model."):
            out[key] = tensor
            continue
        module, part = key.removeprefix("diffusion_model."), ""
        for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha", ".dora_scale"):
            if module.endswith(suffix):
                module, part = module[: -len(suffix)], suffix
                break
        (renamed,) = convert_wan_transformer_to_diffusers({f"{module}.weight": None})
        out[f"diffusion_model.{renamed[: -len('.weight')]}{part}"] = tensor
    return out
