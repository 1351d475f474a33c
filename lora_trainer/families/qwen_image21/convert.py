"""Qwen-Image 2.1 single files: ComfyUI's layout is diffusers' module names (under ``model.diffusion_model.``, which
runtime/single_file.py strips) with each block's SwiGLU gate and up projections fused into ``img_mlp.gate_up``
(gate rows first). diffusers 0.42.1 converts it (single_file_utils.convert_qwen_image21_transformer_checkpoint_to_
diffusers): to_diffusers calls that; from_diffusers is its inverse (the tests' single files). Torch-free at import."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._mmdit.convert import COMPONENT_PREFIXES, count_blocks, inner_width, rows_cols

__all__ = ["COMPONENT_PREFIXES", "ALL_IN_ONE_VAE", "ALL_IN_ONE_TEXT_ENCODERS", "config_checks", "from_diffusers",
           "to_diffusers"]

# The VAE and Qwen3-VL ship as separate files (ComfyUI); an all-in-one file's prefixes, never seen in a release.
ALL_IN_ONE_VAE = "vae."
ALL_IN_ONE_TEXT_ENCODERS = {"text_encoder": "text_encoders.qwen3vl.transformer."}


def to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """diffusers' own converter (pops what it converts; the rest is reported as foreign tensors)."""
    from diffusers.loaders.single_file_utils import convert_qwen_image21_transformer_checkpoint_to_diffusers

    return convert_qwen_image21_transformer_checkpoint_to_diffusers(checkpoint)


def from_diffusers(sd: Mapping, config: Mapping) -> dict:
    """The inverse: gate_layer and proj fused back into gate_up, gate rows first."""
    import torch

    out = {}
    for k, v in sd.items():
        if k.endswith("img_mlp.proj.weight"):
            continue
        if k.endswith("img_mlp.gate_layer.weight"):
            up = sd[k.replace("gate_layer", "proj")]
            out[k.replace("gate_layer", "gate_up")] = torch.cat([v, up], dim=0)
        else:
            out[k] = v
    return out


def config_checks(shapes: Mapping[str, list], config: Mapping,
                  where: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """What the header's shapes (bare keys) say against ``where`` (transformer/config.json)."""
    img_in, txt_in, proj_out = (rows_cols(shapes, k) for k in ("img_in.weight", "txt_in.in_layer.weight",
                                                               "proj_out.weight"))
    out_channels = config.get("out_channels") or config.get("in_channels")
    return None, [("blocks", count_blocks(shapes, "transformer_blocks."), config.get("num_layers")),
                  ("inner width (img_in rows)", img_in[0], inner_width(config)),
                  ("in_channels (img_in columns)", img_in[1], config.get("in_channels")),
                  ("context_in_dim (txt_in.in_layer columns)", txt_in[1], config.get("context_in_dim")),
                  ("output width (proj_out rows)", proj_out[0], out_channels)]
