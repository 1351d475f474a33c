"""FLUX.1 single files in Black Forest Labs' layout (``flux1-dev.safetensors``: ``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``, ``img_in``, ``time_in``, ``vector_in``, ``guidance_in`` (dev), ``txt_in``,
``final_layer``): ``to_diffusers`` for the single-file loader (runtime/single_file.py), its inverse
``from_diffusers`` for the tests' tiny single files, the checks of a file's shapes against a transformer config,
and where ComfyUI's all-in-one files keep the other components. Torch is imported inside the functions."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._mmdit.convert import (CLIP_L, COMPONENT_PREFIXES, T5XXL, check_rows, count_blocks,
                              final_layer_from_diffusers, inner_width, rows_cols, swap_scale_shift)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["COMPONENT_PREFIXES", "ALL_IN_ONE_VAE", "ALL_IN_ONE_TEXT_ENCODERS", "config_checks", "from_diffusers",
           "to_diffusers"]

# ComfyUI's vae_key_prefix for FLUX, and its text encoders by pipeline attribute.
ALL_IN_ONE_VAE = "vae."
ALL_IN_ONE_TEXT_ENCODERS = {"text_encoder": CLIP_L, "text_encoder_2": T5XXL}


def to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """diffusers 0.42 convert_flux_transformer_checkpoint_to_diffusers with the widths from the config (diffusers
    hard-codes inner_dim = 3072). Pops what it converts from ``checkpoint`` (unprefixed keys): what is left was
    not used."""
    import torch

    converted: dict = {}
    num_layers = config["num_layers"]
    num_single_layers = config["num_single_layers"]
    mlp_ratio = 4.0
    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]

    ## time_text_embed.timestep_embedder <- time_in
    converted["time_text_embed.timestep_embedder.linear_1.weight"] = checkpoint.pop("time_in.in_layer.weight")
    converted["time_text_embed.timestep_embedder.linear_1.bias"] = checkpoint.pop("time_in.in_layer.bias")
    converted["time_text_embed.timestep_embedder.linear_2.weight"] = checkpoint.pop("time_in.out_layer.weight")
    converted["time_text_embed.timestep_embedder.linear_2.bias"] = checkpoint.pop("time_in.out_layer.bias")

    ## time_text_embed.text_embedder <- vector_in
    converted["time_text_embed.text_embedder.linear_1.weight"] = checkpoint.pop("vector_in.in_layer.weight")
    converted["time_text_embed.text_embedder.linear_1.bias"] = checkpoint.pop("vector_in.in_layer.bias")
    converted["time_text_embed.text_embedder.linear_2.weight"] = checkpoint.pop("vector_in.out_layer.weight")
    converted["time_text_embed.text_embedder.linear_2.bias"] = checkpoint.pop("vector_in.out_layer.bias")

    # guidance
    has_guidance = any("guidance" in k for k in checkpoint)
    if has_guidance:
        converted["time_text_embed.guidance_embedder.linear_1.weight"] = checkpoint.pop("guidance_in.in_layer.weight")
        converted["time_text_embed.guidance_embedder.linear_1.bias"] = checkpoint.pop("guidance_in.in_layer.bias")
        converted["time_text_embed.guidance_embedder.linear_2.weight"] = checkpoint.pop("guidance_in.out_layer.weight")
        converted["time_text_embed.guidance_embedder.linear_2.bias"] = checkpoint.pop("guidance_in.out_layer.bias")

    # context_embedder
    converted["context_embedder.weight"] = checkpoint.pop("txt_in.weight")
    converted["context_embedder.bias"] = checkpoint.pop("txt_in.bias")

    # x_embedder
    converted["x_embedder.weight"] = checkpoint.pop("img_in.weight")
    converted["x_embedder.bias"] = checkpoint.pop("img_in.bias")

    # double transformer blocks
    for i in range(num_layers):
        block_prefix = f"transformer_blocks.{i}."
        # norms.
        ## norm1
        converted[f"{block_prefix}norm1.linear.weight"] = checkpoint.pop(f"double_blocks.{i}.img_mod.lin.weight")
        converted[f"{block_prefix}norm1.linear.bias"] = checkpoint.pop(f"double_blocks.{i}.img_mod.lin.bias")
        ## norm1_context
        converted[f"{block_prefix}norm1_context.linear.weight"] = checkpoint.pop(f"double_blocks.{i}.txt_mod.lin.weight")
        converted[f"{block_prefix}norm1_context.linear.bias"] = checkpoint.pop(f"double_blocks.{i}.txt_mod.lin.bias")
        # Q, K, V
        sample_q, sample_k, sample_v = torch.chunk(checkpoint.pop(f"double_blocks.{i}.img_attn.qkv.weight"), 3, dim=0)
        context_q, context_k, context_v = torch.chunk(checkpoint.pop(f"double_blocks.{i}.txt_attn.qkv.weight"), 3, dim=0)
        sample_q_bias, sample_k_bias, sample_v_bias = torch.chunk(
            checkpoint.pop(f"double_blocks.{i}.img_attn.qkv.bias"), 3, dim=0)
        context_q_bias, context_k_bias, context_v_bias = torch.chunk(
            checkpoint.pop(f"double_blocks.{i}.txt_attn.qkv.bias"), 3, dim=0)
        converted[f"{block_prefix}attn.to_q.weight"] = torch.cat([sample_q])
        converted[f"{block_prefix}attn.to_q.bias"] = torch.cat([sample_q_bias])
        converted[f"{block_prefix}attn.to_k.weight"] = torch.cat([sample_k])
        converted[f"{block_prefix}attn.to_k.bias"] = torch.cat([sample_k_bias])
        converted[f"{block_prefix}attn.to_v.weight"] = torch.cat([sample_v])
        converted[f"{block_prefix}attn.to_v.bias"] = torch.cat([sample_v_bias])
        converted[f"{block_prefix}attn.add_q_proj.weight"] = torch.cat([context_q])
        converted[f"{block_prefix}attn.add_q_proj.bias"] = torch.cat([context_q_bias])
        converted[f"{block_prefix}attn.add_k_proj.weight"] = torch.cat([context_k])
        converted[f"{block_prefix}attn.add_k_proj.bias"] = torch.cat([context_k_bias])
        converted[f"{block_prefix}attn.add_v_proj.weight"] = torch.cat([context_v])
        converted[f"{block_prefix}attn.add_v_proj.bias"] = torch.cat([context_v_bias])
        # qk_norm
        converted[f"{block_prefix}attn.norm_q.weight"] = checkpoint.pop(f"double_blocks.{i}.img_attn.norm.query_norm.scale")
        converted[f"{block_prefix}attn.norm_k.weight"] = checkpoint.pop(f"double_blocks.{i}.img_attn.norm.key_norm.scale")
        converted[f"{block_prefix}attn.norm_added_q.weight"] = checkpoint.pop(
            f"double_blocks.{i}.txt_attn.norm.query_norm.scale")
        converted[f"{block_prefix}attn.norm_added_k.weight"] = checkpoint.pop(
            f"double_blocks.{i}.txt_attn.norm.key_norm.scale")
        # ff img_mlp
        converted[f"{block_prefix}ff.net.0.proj.weight"] = checkpoint.pop(f"double_blocks.{i}.img_mlp.0.weight")
        converted[f"{block_prefix}ff.net.0.proj.bias"] = checkpoint.pop(f"double_blocks.{i}.img_mlp.0.bias")
        converted[f"{block_prefix}ff.net.2.weight"] = checkpoint.pop(f"double_blocks.{i}.img_mlp.2.weight")
        converted[f"{block_prefix}ff.net.2.bias"] = checkpoint.pop(f"double_blocks.{i}.img_mlp.2.bias")
        converted[f"{block_prefix}ff_context.net.0.proj.weight"] = checkpoint.pop(f"double_blocks.{i}.txt_mlp.0.weight")
        converted[f"{block_prefix}ff_context.net.0.proj.bias"] = checkpoint.pop(f"double_blocks.{i}.txt_mlp.0.bias")
        converted[f"{block_prefix}ff_context.net.2.weight"] = checkpoint.pop(f"double_blocks.{i}.txt_mlp.2.weight")
        converted[f"{block_prefix}ff_context.net.2.bias"] = checkpoint.pop(f"double_blocks.{i}.txt_mlp.2.bias")
        # output projections.
        converted[f"{block_prefix}attn.to_out.0.weight"] = checkpoint.pop(f"double_blocks.{i}.img_attn.proj.weight")
        converted[f"{block_prefix}attn.to_out.0.bias"] = checkpoint.pop(f"double_blocks.{i}.img_attn.proj.bias")
        converted[f"{block_prefix}attn.to_add_out.weight"] = checkpoint.pop(f"double_blocks.{i}.txt_attn.proj.weight")
        converted[f"{block_prefix}attn.to_add_out.bias"] = checkpoint.pop(f"double_blocks.{i}.txt_attn.proj.bias")

    # single transformer blocks
    for i in range(num_single_layers):
        block_prefix = f"single_transformer_blocks.{i}."
        # norm.linear  <- single_blocks.0.modulation.lin
        converted[f"{block_prefix}norm.linear.weight"] = checkpoint.pop(f"single_blocks.{i}.modulation.lin.weight")
        converted[f"{block_prefix}norm.linear.bias"] = checkpoint.pop(f"single_blocks.{i}.modulation.lin.bias")
        # Q, K, V, mlp
        mlp_hidden_dim = int(inner_dim * mlp_ratio)
        split_size = (inner_dim, inner_dim, inner_dim, mlp_hidden_dim)
        q, k, v, mlp = torch.split(checkpoint.pop(f"single_blocks.{i}.linear1.weight"), split_size, dim=0)
        q_bias, k_bias, v_bias, mlp_bias = torch.split(checkpoint.pop(f"single_blocks.{i}.linear1.bias"), split_size, dim=0)
        converted[f"{block_prefix}attn.to_q.weight"] = torch.cat([q])
        converted[f"{block_prefix}attn.to_q.bias"] = torch.cat([q_bias])
        converted[f"{block_prefix}attn.to_k.weight"] = torch.cat([k])
        converted[f"{block_prefix}attn.to_k.bias"] = torch.cat([k_bias])
        converted[f"{block_prefix}attn.to_v.weight"] = torch.cat([v])
        converted[f"{block_prefix}attn.to_v.bias"] = torch.cat([v_bias])
        converted[f"{block_prefix}proj_mlp.weight"] = torch.cat([mlp])
        converted[f"{block_prefix}proj_mlp.bias"] = torch.cat([mlp_bias])
        # qk norm
        converted[f"{block_prefix}attn.norm_q.weight"] = checkpoint.pop(f"single_blocks.{i}.norm.query_norm.scale")
        converted[f"{block_prefix}attn.norm_k.weight"] = checkpoint.pop(f"single_blocks.{i}.norm.key_norm.scale")
        # output projections.
        converted[f"{block_prefix}proj_out.weight"] = checkpoint.pop(f"single_blocks.{i}.linear2.weight")
        converted[f"{block_prefix}proj_out.bias"] = checkpoint.pop(f"single_blocks.{i}.linear2.bias")

    converted["proj_out.weight"] = checkpoint.pop("final_layer.linear.weight")
    converted["proj_out.bias"] = checkpoint.pop("final_layer.linear.bias")
    converted["norm_out.linear.weight"] = swap_scale_shift(checkpoint.pop("final_layer.adaLN_modulation.1.weight"))
    converted["norm_out.linear.bias"] = swap_scale_shift(checkpoint.pop("final_layer.adaLN_modulation.1.bias"))
    return converted


def from_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in the BFL layout (inverse of
    convert_flux_transformer_checkpoint_to_diffusers, statement by statement)."""
    import torch

    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    num_layers, num_single_layers = config["num_layers"], config["num_single_layers"]
    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
    mlp_ratio = 4.0  # FluxSingleTransformerBlock's default, as the converter assumes
    mlp_hidden_dim = int(inner_dim * mlp_ratio)

    ## time_in <- time_text_embed.timestep_embedder
    out["time_in.in_layer.weight"] = sd.pop("time_text_embed.timestep_embedder.linear_1.weight")
    out["time_in.in_layer.bias"] = sd.pop("time_text_embed.timestep_embedder.linear_1.bias")
    out["time_in.out_layer.weight"] = sd.pop("time_text_embed.timestep_embedder.linear_2.weight")
    out["time_in.out_layer.bias"] = sd.pop("time_text_embed.timestep_embedder.linear_2.bias")

    ## vector_in <- time_text_embed.text_embedder
    out["vector_in.in_layer.weight"] = sd.pop("time_text_embed.text_embedder.linear_1.weight")
    out["vector_in.in_layer.bias"] = sd.pop("time_text_embed.text_embedder.linear_1.bias")
    out["vector_in.out_layer.weight"] = sd.pop("time_text_embed.text_embedder.linear_2.weight")
    out["vector_in.out_layer.bias"] = sd.pop("time_text_embed.text_embedder.linear_2.bias")

    # guidance
    if config.get("guidance_embeds"):
        out["guidance_in.in_layer.weight"] = sd.pop("time_text_embed.guidance_embedder.linear_1.weight")
        out["guidance_in.in_layer.bias"] = sd.pop("time_text_embed.guidance_embedder.linear_1.bias")
        out["guidance_in.out_layer.weight"] = sd.pop("time_text_embed.guidance_embedder.linear_2.weight")
        out["guidance_in.out_layer.bias"] = sd.pop("time_text_embed.guidance_embedder.linear_2.bias")

    # txt_in <- context_embedder
    out["txt_in.weight"] = sd.pop("context_embedder.weight")
    out["txt_in.bias"] = sd.pop("context_embedder.bias")

    # img_in <- x_embedder
    out["img_in.weight"] = sd.pop("x_embedder.weight")
    out["img_in.bias"] = sd.pop("x_embedder.bias")

    # double transformer blocks
    for i in range(num_layers):
        p = f"transformer_blocks.{i}."
        d = f"double_blocks.{i}."
        ## norm1, norm1_context
        out[f"{d}img_mod.lin.weight"] = sd.pop(f"{p}norm1.linear.weight")
        out[f"{d}img_mod.lin.bias"] = sd.pop(f"{p}norm1.linear.bias")
        out[f"{d}txt_mod.lin.weight"] = sd.pop(f"{p}norm1_context.linear.weight")
        out[f"{d}txt_mod.lin.bias"] = sd.pop(f"{p}norm1_context.linear.bias")
        # Q, K, V
        for fused, names in ((f"{d}img_attn.qkv", ("to_q", "to_k", "to_v")),
                             (f"{d}txt_attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for kind in ("weight", "bias"):
                parts = [check_rows(sd.pop(f"{p}attn.{n}.{kind}"), inner_dim, f"{p}attn.{n}.{kind}") for n in names]
                out[f"{fused}.{kind}"] = torch.cat(parts, dim=0)
        # qk_norm
        out[f"{d}img_attn.norm.query_norm.scale"] = sd.pop(f"{p}attn.norm_q.weight")
        out[f"{d}img_attn.norm.key_norm.scale"] = sd.pop(f"{p}attn.norm_k.weight")
        out[f"{d}txt_attn.norm.query_norm.scale"] = sd.pop(f"{p}attn.norm_added_q.weight")
        out[f"{d}txt_attn.norm.key_norm.scale"] = sd.pop(f"{p}attn.norm_added_k.weight")
        # ff img_mlp, txt_mlp
        out[f"{d}img_mlp.0.weight"] = sd.pop(f"{p}ff.net.0.proj.weight")
        out[f"{d}img_mlp.0.bias"] = sd.pop(f"{p}ff.net.0.proj.bias")
        out[f"{d}img_mlp.2.weight"] = sd.pop(f"{p}ff.net.2.weight")
        out[f"{d}img_mlp.2.bias"] = sd.pop(f"{p}ff.net.2.bias")
        out[f"{d}txt_mlp.0.weight"] = sd.pop(f"{p}ff_context.net.0.proj.weight")
        out[f"{d}txt_mlp.0.bias"] = sd.pop(f"{p}ff_context.net.0.proj.bias")
        out[f"{d}txt_mlp.2.weight"] = sd.pop(f"{p}ff_context.net.2.weight")
        out[f"{d}txt_mlp.2.bias"] = sd.pop(f"{p}ff_context.net.2.bias")
        # output projections
        out[f"{d}img_attn.proj.weight"] = sd.pop(f"{p}attn.to_out.0.weight")
        out[f"{d}img_attn.proj.bias"] = sd.pop(f"{p}attn.to_out.0.bias")
        out[f"{d}txt_attn.proj.weight"] = sd.pop(f"{p}attn.to_add_out.weight")
        out[f"{d}txt_attn.proj.bias"] = sd.pop(f"{p}attn.to_add_out.bias")

    # single transformer blocks
    for i in range(num_single_layers):
        p = f"single_transformer_blocks.{i}."
        s = f"single_blocks.{i}."
        out[f"{s}modulation.lin.weight"] = sd.pop(f"{p}norm.linear.weight")
        out[f"{s}modulation.lin.bias"] = sd.pop(f"{p}norm.linear.bias")
        # Q, K, V, mlp -> linear1, split (inner_dim, inner_dim, inner_dim, mlp_hidden_dim) by the converter
        for kind in ("weight", "bias"):
            parts = [check_rows(sd.pop(f"{p}attn.{n}.{kind}"), inner_dim, f"{p}attn.{n}.{kind}")
                     for n in ("to_q", "to_k", "to_v")]
            parts.append(check_rows(sd.pop(f"{p}proj_mlp.{kind}"), mlp_hidden_dim, f"{p}proj_mlp.{kind}"))
            out[f"{s}linear1.{kind}"] = torch.cat(parts, dim=0)
        # qk norm
        out[f"{s}norm.query_norm.scale"] = sd.pop(f"{p}attn.norm_q.weight")
        out[f"{s}norm.key_norm.scale"] = sd.pop(f"{p}attn.norm_k.weight")
        # output projection
        out[f"{s}linear2.weight"] = sd.pop(f"{p}proj_out.weight")
        out[f"{s}linear2.bias"] = sd.pop(f"{p}proj_out.bias")

    final_layer_from_diffusers(sd, out, inner_dim)
    if sd:
        raise ValueError(f"flux1 from_diffusers: {len(sd)} tensors not mapped, e.g. {sorted(sd)[:5]}")
    return out


def config_checks(shapes: Mapping[str, list], config: Mapping,
                  where: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """What the header's shapes (bare keys) say against ``where`` (transformer/config.json): a refusal that names
    the likely mistake, completing "<file> ..." (or None), and (what, in the file, in the config) per figure that
    must agree (None: unknown)."""
    if any(k.startswith("guidance_in.") for k in shapes) != bool(config.get("guidance_embeds")):
        return (f"{'has' if 'guidance_in.in_layer.weight' in shapes else 'lacks'} FLUX.1-dev's guidance embedder "
                f"(guidance_in.*) but {where} says guidance_embeds {bool(config.get('guidance_embeds'))}"), []
    img_in, txt_in, vec = (rows_cols(shapes, k) for k in ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight"))
    return None, [("double blocks", count_blocks(shapes, "double_blocks."), config.get("num_layers")),
                  ("single blocks", count_blocks(shapes, "single_blocks."), config.get("num_single_layers")),
                  ("inner width (img_in rows)", img_in[0], inner_width(config)),
                  ("in_channels (img_in columns)", img_in[1], config.get("in_channels")),
                  ("joint_attention_dim (txt_in columns)", txt_in[1], config.get("joint_attention_dim")),
                  ("pooled_projection_dim (vector_in columns)", vec[1], config.get("pooled_projection_dim"))]
