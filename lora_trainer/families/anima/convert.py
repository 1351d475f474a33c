"""Anima single files and LoRA names: the original Cosmos-Predict2 (MiniTrainDIT) module names <-> diffusers'
CosmosTransformer3DModel. ComfyUI's Anima release is such a file (``blocks.N.self_attn.q_proj``, ``x_embedder``,
``t_embedder``, ``final_layer``, bare, under ``net.`` or ``model.diffusion_model.``); diffusers 0.42 reads it with
``convert_cosmos_transformer_checkpoint_to_diffusers`` (its Cosmos 2.0 table), and ``from_diffusers`` is that
converter's inverse, for the tests' tiny single files. The file's ``llm_adapter.*`` tensors (the text conditioner)
are not the transformer's: the conditioner is loaded from the config source folder. Torch-free at import.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._mmdit.convert import count_blocks, inner_width, rows_cols

__all__ = ["COMPONENT_PREFIXES", "ALL_IN_ONE_VAE", "ALL_IN_ONE_TEXT_ENCODERS", "config_checks", "from_diffusers",
           "native_module", "to_diffusers", "tool_file_fused_parts", "tool_file_to_peft"]

# Not the transformer's: the conditioner (ComfyUI keeps it in the model file) and what all-in-one files may add.
COMPONENT_PREFIXES = ("llm_adapter.", "net.llm_adapter.", "text_encoders.", "vae.")
ALL_IN_ONE_VAE = "vae."
ALL_IN_ONE_TEXT_ENCODERS: dict[str, str] = {}  # ComfyUI ships Qwen3-0.6B as its own file
CONDITIONER_PREFIXES = ("llm_adapter.", "net.llm_adapter.")

# diffusers' module names -> the original's, applied in this order to a "."-delimited name (the inverse of diffusers'
# Cosmos 2.0 single-file table and of its _convert_non_diffusers_anima_lora_to_diffusers).
_TO_NATIVE = (
    ("transformer_blocks.", "blocks."),
    (".norm1.linear_1", ".adaln_modulation_self_attn.1"), (".norm1.linear_2", ".adaln_modulation_self_attn.2"),
    (".norm2.linear_1", ".adaln_modulation_cross_attn.1"), (".norm2.linear_2", ".adaln_modulation_cross_attn.2"),
    (".norm3.linear_1", ".adaln_modulation_mlp.1"), (".norm3.linear_2", ".adaln_modulation_mlp.2"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_q", ".q_proj"), (".to_k", ".k_proj"), (".to_v", ".v_proj"), (".to_out.0", ".output_proj"),
    (".norm_q.", ".q_norm."), (".norm_k.", ".k_norm."),
    (".ff.net.0.proj", ".mlp.layer1"), (".ff.net.2", ".mlp.layer2"),
    ("patch_embed.proj", "x_embedder.proj.1"),
    ("norm_out.linear_1", "final_layer.adaln_modulation.1"), ("norm_out.linear_2", "final_layer.adaln_modulation.2"),
    ("proj_out", "final_layer.linear"),
    ("time_embed.t_embedder", "t_embedder.1"), ("time_embed.norm", "t_embedding_norm"),
)


def native_module(name: str) -> str:
    """A CosmosTransformer3DModel parameter or module name -> the original layout's."""
    new = "." + name
    for src, dst in _TO_NATIVE:
        new = new.replace("." + src if not src.startswith(".") else src, "." + dst if not dst.startswith(".") else dst)
    return new[1:]


def to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """diffusers 0.42's converter for the transformer's tensors; a conditioner that came with them under the
    denoiser prefix (``model.diffusion_model.llm_adapter.*``) is dropped (loaded from the config source)."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    for key in [k for k in checkpoint if k.startswith(CONDITIONER_PREFIXES)]:
        checkpoint.pop(key)
    return convert_cosmos_transformer_checkpoint_to_diffusers(checkpoint)


def from_diffusers(sd: Mapping, config: Mapping) -> dict:
    """A diffusers CosmosTransformer3DModel state dict -> the original layout (the tests' single files)."""
    if config.get("extra_pos_embed_type"):
        raise ValueError("anima from_diffusers: diffusers' Cosmos 2.0 converter has no name for the learnable "
                         "positional embedding (Cosmos-Predict2 / Anima have none)")
    return {native_module(k): v for k, v in sd.items()}


def config_checks(shapes: Mapping[str, list], config: Mapping,
                  where: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """What the header's shapes (bare keys) say against ``where`` (transformer/config.json)."""
    shapes = {k.removeprefix("net."): v for k, v in shapes.items()}
    x_in, kv = rows_cols(shapes, "x_embedder.proj.1.weight"), rows_cols(shapes, "blocks.0.cross_attn.k_proj.weight")
    pad = 1 if config.get("concat_padding_mask", True) else 0
    patch = config.get("patch_size") or (1, 2, 2)
    per_patch = (config.get("in_channels", 16) + pad) * patch[0] * patch[1] * patch[2]
    return None, [("blocks", count_blocks(shapes, "blocks."), config.get("num_layers")),
                  ("inner width (x_embedder rows)", x_in[0], inner_width(config)),
                  ("input channels x patch (x_embedder columns)", x_in[1], per_patch),
                  ("text_embed_dim (cross_attn.k_proj columns)", kv[1], config.get("text_embed_dim"))]


def tool_file_fused_parts(key: str) -> int:
    return 1  # nothing fused: one module per key


def tool_file_to_peft(sd: dict) -> dict:
    """The tool file (``diffusion_model.`` + original names, export.py) in PEFT names through diffusers' own
    _convert_non_diffusers_anima_lora_to_diffusers; other files are returned as they are."""
    if not any(k.startswith("diffusion_model.blocks.") for k in sd):
        return sd
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_anima_lora_to_diffusers

    return _convert_non_diffusers_anima_lora_to_diffusers(dict(sd))
