"""State-dict converters for single-file transformers: FLUX.1's Black Forest Labs layout and SD3's SAI MMDiT
layout to diffusers names. Used by dit_single_file.py; torch is imported inside the functions (preflight imports
that module without torch)."""
from __future__ import annotations

from collections.abc import Mapping


def swap_scale_shift(weight):
    import torch

    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def flux_bfl_to_diffusers(checkpoint: dict, config: Mapping) -> dict:
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


def sd3_sai_to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """diffusers' own convert_sd3_transformer_checkpoint_to_diffusers (width-generic); pops from ``checkpoint``."""
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    return convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
