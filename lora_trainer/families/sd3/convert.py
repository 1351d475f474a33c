"""SD3/3.5 single files in Stability's MMDiT layout (``sd3.5_medium.safetensors``: ``joint_blocks.N.x_block.attn.qkv``,
``context_block``, ``x_embedder``, ``t_embedder``, ``y_embedder``, ``context_embedder``, ``final_layer``,
``pos_embed``): ``to_diffusers`` for the single-file loader (runtime/single_file.py), its inverse
``from_diffusers`` for the tests' tiny single files, the checks of a file's shapes against a transformer config,
and where ComfyUI's all-in-one files keep the other components. Torch is imported inside the functions."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._mmdit.convert import (CLIP_G, CLIP_L, COMPONENT_PREFIXES, T5XXL, check_rows, count_blocks,
                              final_layer_from_diffusers, inner_width, rows_cols, swap_scale_shift)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["COMPONENT_PREFIXES", "ALL_IN_ONE_VAE", "ALL_IN_ONE_TEXT_ENCODERS", "config_checks", "from_diffusers",
           "to_diffusers"]

# SAI's (and ComfyUI's) VAE prefix for SD3, and the text encoders by pipeline attribute.
ALL_IN_ONE_VAE = "first_stage_model."
ALL_IN_ONE_TEXT_ENCODERS = {"text_encoder": CLIP_L, "text_encoder_2": CLIP_G, "text_encoder_3": T5XXL}


def to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """diffusers' own convert_sd3_transformer_checkpoint_to_diffusers (width-generic); pops from ``checkpoint``."""
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    return convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)


def from_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict in the SAI MMDiT layout (inverse of
    convert_sd3_transformer_checkpoint_to_diffusers, statement by statement)."""
    import torch

    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    num_layers = config["num_layers"]
    dual_attention_layers = tuple(config.get("dual_attention_layers") or ())
    has_qk_norm = bool(config.get("qk_norm"))
    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
    caption_projection_dim = config["caption_projection_dim"]

    # Positional and patch embeddings.
    out["pos_embed"] = sd.pop("pos_embed.pos_embed")
    out["x_embedder.proj.weight"] = sd.pop("pos_embed.proj.weight")
    out["x_embedder.proj.bias"] = sd.pop("pos_embed.proj.bias")

    # Timestep embeddings.
    out["t_embedder.mlp.0.weight"] = sd.pop("time_text_embed.timestep_embedder.linear_1.weight")
    out["t_embedder.mlp.0.bias"] = sd.pop("time_text_embed.timestep_embedder.linear_1.bias")
    out["t_embedder.mlp.2.weight"] = sd.pop("time_text_embed.timestep_embedder.linear_2.weight")
    out["t_embedder.mlp.2.bias"] = sd.pop("time_text_embed.timestep_embedder.linear_2.bias")

    # Context projections.
    out["context_embedder.weight"] = check_rows(sd.pop("context_embedder.weight"), caption_projection_dim,
                                            "context_embedder.weight")
    out["context_embedder.bias"] = sd.pop("context_embedder.bias")

    # Pooled context projection.
    out["y_embedder.mlp.0.weight"] = sd.pop("time_text_embed.text_embedder.linear_1.weight")
    out["y_embedder.mlp.0.bias"] = sd.pop("time_text_embed.text_embedder.linear_1.bias")
    out["y_embedder.mlp.2.weight"] = sd.pop("time_text_embed.text_embedder.linear_2.weight")
    out["y_embedder.mlp.2.bias"] = sd.pop("time_text_embed.text_embedder.linear_2.bias")

    for i in range(num_layers):
        p = f"transformer_blocks.{i}."
        x, c = f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == num_layers - 1
        # Q, K, V
        for fused, names in ((f"{x}attn.qkv", ("to_q", "to_k", "to_v")),
                             (f"{c}attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for kind in ("weight", "bias"):
                parts = [check_rows(sd.pop(f"{p}attn.{n}.{kind}"), inner_dim, f"{p}attn.{n}.{kind}") for n in names]
                out[f"{fused}.{kind}"] = torch.cat(parts, dim=0)
        # qk norm
        if has_qk_norm:
            out[f"{x}attn.ln_q.weight"] = sd.pop(f"{p}attn.norm_q.weight")
            out[f"{x}attn.ln_k.weight"] = sd.pop(f"{p}attn.norm_k.weight")
            out[f"{c}attn.ln_q.weight"] = sd.pop(f"{p}attn.norm_added_q.weight")
            out[f"{c}attn.ln_k.weight"] = sd.pop(f"{p}attn.norm_added_k.weight")
        # output projections.
        out[f"{x}attn.proj.weight"] = sd.pop(f"{p}attn.to_out.0.weight")
        out[f"{x}attn.proj.bias"] = sd.pop(f"{p}attn.to_out.0.bias")
        if not last:
            out[f"{c}attn.proj.weight"] = sd.pop(f"{p}attn.to_add_out.weight")
            out[f"{c}attn.proj.bias"] = sd.pop(f"{p}attn.to_add_out.bias")

        if i in dual_attention_layers:
            for kind in ("weight", "bias"):
                parts = [check_rows(sd.pop(f"{p}attn2.{n}.{kind}"), inner_dim, f"{p}attn2.{n}.{kind}")
                         for n in ("to_q", "to_k", "to_v")]
                out[f"{x}attn2.qkv.{kind}"] = torch.cat(parts, dim=0)
            if has_qk_norm:
                out[f"{x}attn2.ln_q.weight"] = sd.pop(f"{p}attn2.norm_q.weight")
                out[f"{x}attn2.ln_k.weight"] = sd.pop(f"{p}attn2.norm_k.weight")
            out[f"{x}attn2.proj.weight"] = sd.pop(f"{p}attn2.to_out.0.weight")
            out[f"{x}attn2.proj.bias"] = sd.pop(f"{p}attn2.to_out.0.bias")

        # norms.
        out[f"{x}adaLN_modulation.1.weight"] = sd.pop(f"{p}norm1.linear.weight")
        out[f"{x}adaLN_modulation.1.bias"] = sd.pop(f"{p}norm1.linear.bias")
        if not last:
            out[f"{c}adaLN_modulation.1.weight"] = sd.pop(f"{p}norm1_context.linear.weight")
            out[f"{c}adaLN_modulation.1.bias"] = sd.pop(f"{p}norm1_context.linear.bias")
        else:  # context_pre_only: an AdaLayerNormContinuous, (scale, shift) in diffusers
            out[f"{c}adaLN_modulation.1.weight"] = swap_scale_shift(
                check_rows(sd.pop(f"{p}norm1_context.linear.weight"), 2 * caption_projection_dim,
                       f"{p}norm1_context.linear.weight"))
            out[f"{c}adaLN_modulation.1.bias"] = swap_scale_shift(sd.pop(f"{p}norm1_context.linear.bias"))

        # ffs.
        out[f"{x}mlp.fc1.weight"] = sd.pop(f"{p}ff.net.0.proj.weight")
        out[f"{x}mlp.fc1.bias"] = sd.pop(f"{p}ff.net.0.proj.bias")
        out[f"{x}mlp.fc2.weight"] = sd.pop(f"{p}ff.net.2.weight")
        out[f"{x}mlp.fc2.bias"] = sd.pop(f"{p}ff.net.2.bias")
        if not last:
            out[f"{c}mlp.fc1.weight"] = sd.pop(f"{p}ff_context.net.0.proj.weight")
            out[f"{c}mlp.fc1.bias"] = sd.pop(f"{p}ff_context.net.0.proj.bias")
            out[f"{c}mlp.fc2.weight"] = sd.pop(f"{p}ff_context.net.2.weight")
            out[f"{c}mlp.fc2.bias"] = sd.pop(f"{p}ff_context.net.2.bias")

    # Final blocks.
    final_layer_from_diffusers(sd, out, inner_dim)
    if sd:
        raise ValueError(f"sd3 from_diffusers: {len(sd)} tensors not mapped, e.g. {sorted(sd)[:5]}")
    return out


def config_checks(shapes: Mapping[str, list], config: Mapping,
                  where: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """What the header's shapes (bare keys) say against ``where`` (transformer/config.json): no refusal of its
    own (None), and (what, in the file, in the config) per figure that must agree (None: unknown)."""
    attn2 = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.") and ".attn2." in k})
    x_emb, ctx = (rows_cols(shapes, k) for k in ("x_embedder.proj.weight", "context_embedder.weight"))
    figures = [("joint blocks", count_blocks(shapes, "joint_blocks."), config.get("num_layers")),
               ("dual attention (attn2) blocks", attn2, sorted(config.get("dual_attention_layers") or [])),
               ("q/k norm (attn.ln_q)", any(".attn.ln_q." in k for k in shapes), bool(config.get("qk_norm"))),
               ("inner width (x_embedder rows)", x_emb[0], inner_width(config)),
               ("in_channels (x_embedder)", x_emb[1], config.get("in_channels")),
               ("caption_projection_dim (context_embedder rows)", ctx[0], config.get("caption_projection_dim")),
               ("joint_attention_dim (context_embedder columns)", ctx[1], config.get("joint_attention_dim"))]
    pos = rows_cols(shapes, "pos_embed", 3)
    if pos[1] is not None and config.get("pos_embed_max_size"):
        figures.append(("pos_embed positions", pos[1], config["pos_embed_max_size"] ** 2))
    return None, figures
