"""Chroma single files in Black Forest Labs' layout (``Chroma1-HD.safetensors``: FLUX.1's ``double_blocks`` /
``single_blocks`` without their modulation Linears, ``distilled_guidance_layer.*`` instead of ``time_in`` /
``vector_in`` / ``guidance_in``, a ``final_layer`` without ``adaLN_modulation``): ``to_diffusers`` for the
single-file loader (runtime/single_file.py), its inverse ``from_diffusers`` for the tests' tiny single files, the
checks of a file's shapes against a transformer config, and where ComfyUI's all-in-one files keep the VAE and T5.

diffusers 0.42's convert_chroma_transformer_checkpoint_to_diffusers names the same tensors but hard-codes
inner_dim = 3072 for the single blocks' linear1 split; here every width comes from the config, and one table of
names serves both directions (tests/test_family_chroma.py checks it against diffusers' converter at Chroma1's
real widths on the meta device). Torch is imported inside the functions."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._mmdit.convert import COMPONENT_PREFIXES, T5XXL, check_rows, count_blocks, inner_width, rows_cols

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["COMPONENT_PREFIXES", "ALL_IN_ONE_VAE", "ALL_IN_ONE_TEXT_ENCODERS", "config_checks", "from_diffusers",
           "to_diffusers"]

ALL_IN_ONE_VAE = "vae."
ALL_IN_ONE_TEXT_ENCODERS = {"text_encoder": T5XXL}

_WB = ("weight", "bias")
# (BFL name, diffusers name) per tensor kind; {i} is the block or approximator layer index.
_TOP = [("txt_in", "context_embedder"), ("img_in", "x_embedder"), ("final_layer.linear", "proj_out"),
        ("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj"),
        ("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj")]
_APPROXIMATOR = [("distilled_guidance_layer.layers.{i}.in_layer", "distilled_guidance_layer.layers.{i}.linear_1"),
                 ("distilled_guidance_layer.layers.{i}.out_layer", "distilled_guidance_layer.layers.{i}.linear_2")]
_APPROXIMATOR_NORM = ("distilled_guidance_layer.norms.{i}.scale", "distilled_guidance_layer.norms.{i}.weight")
_DOUBLE = [("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"), ("txt_mlp.0", "ff_context.net.0.proj"),
           ("txt_mlp.2", "ff_context.net.2"), ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out")]
_DOUBLE_NORMS = [("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                 ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                 ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                 ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight")]
_DOUBLE_FUSED = [("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
                 ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))]
_SINGLE = [("linear2", "proj_out")]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]
# linear1 = q, k, v (inner_dim rows each) and the MLP input (4 x inner_dim: mlp_ratio 4, as diffusers assumes).
_SINGLE_FUSED = ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))


def _pairs(config: Mapping, num_guidance_layers: int) -> list[tuple[str, str]]:
    """Every (BFL tensor, diffusers tensor) renamed one to one."""
    out = [(f"{b}.{k}", f"{d}.{k}") for b, d in _TOP for k in _WB]
    for i in range(num_guidance_layers):
        out += [(b.format(i=i) + f".{k}", d.format(i=i) + f".{k}") for b, d in _APPROXIMATOR for k in _WB]
        out.append((_APPROXIMATOR_NORM[0].format(i=i), _APPROXIMATOR_NORM[1].format(i=i)))
    for i in range(config["num_layers"]):
        out += [(f"double_blocks.{i}.{b}.{k}", f"transformer_blocks.{i}.{d}.{k}") for b, d in _DOUBLE for k in _WB]
        out += [(f"double_blocks.{i}.{b}", f"transformer_blocks.{i}.{d}") for b, d in _DOUBLE_NORMS]
    for i in range(config["num_single_layers"]):
        out += [(f"single_blocks.{i}.{b}.{k}", f"single_transformer_blocks.{i}.{d}.{k}") for b, d in _SINGLE
                for k in _WB]
        out += [(f"single_blocks.{i}.{b}", f"single_transformer_blocks.{i}.{d}") for b, d in _SINGLE_NORMS]
    return out


def _fused(config: Mapping) -> list[tuple[str, list[str], list[int]]]:
    """(BFL tensor, its diffusers parts, their row counts) for the fused q/k/v(/mlp) tensors."""
    h = inner_width(config)
    out = []
    for i in range(config["num_layers"]):
        for b, parts in _DOUBLE_FUSED:
            out += [(f"double_blocks.{i}.{b}.{k}", [f"transformer_blocks.{i}.{p}.{k}" for p in parts], [h] * 3)
                    for k in _WB]
    for i in range(config["num_single_layers"]):
        b, parts = _SINGLE_FUSED
        out += [(f"single_blocks.{i}.{b}.{k}", [f"single_transformer_blocks.{i}.{p}.{k}" for p in parts],
                 [h, h, h, 4 * h]) for k in _WB]
    return out


def to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """A BFL-layout Chroma state dict (unprefixed keys) -> diffusers ChromaTransformer2DModel names, widths from the
    config. Pops what it converts from ``checkpoint``: what is left was not used."""
    import torch

    layers = count_blocks((k.removeprefix("distilled_guidance_layer.") for k in checkpoint
                           if k.startswith("distilled_guidance_layer.layers.")), "layers.")
    out = {d: checkpoint.pop(b) for b, d in _pairs(config, layers)}
    for b, parts, rows in _fused(config):
        out.update(zip(parts, torch.split(checkpoint.pop(b), rows, dim=0)))
    return out


def from_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers ChromaTransformer2DModel state dict in the BFL layout (the inverse of to_diffusers)."""
    import torch

    sd = dict(sd)
    out = {b: sd.pop(d) for b, d in _pairs(config, config["approximator_layers"])}
    for b, parts, rows in _fused(config):
        out[b] = torch.cat([check_rows(sd.pop(p), n, p) for p, n in zip(parts, rows)], dim=0)
    if sd:
        raise ValueError(f"chroma from_diffusers: {len(sd)} tensors not mapped, e.g. {sorted(sd)[:5]}")
    return out


def config_checks(shapes: Mapping[str, list], config: Mapping,
                  where: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """What the header's shapes (bare keys) say against ``where`` (transformer/config.json): a refusal naming the
    likely mistake, completing "<file> ..." (or None), and (what, in the file, in the config) per figure that must
    agree (None: unknown)."""
    if "distilled_guidance_layer.in_proj.weight" in shapes and "num_attention_heads" in config \
            and "approximator_layers" not in config:
        return f"is a Chroma transformer but {where} is not a Chroma config (no approximator_layers)", []
    img_in, txt_in, approx = (rows_cols(shapes, k) for k in ("img_in.weight", "txt_in.weight",
                                                             "distilled_guidance_layer.in_proj.weight"))
    layers = count_blocks((k.removeprefix("distilled_guidance_layer.") for k in shapes
                           if k.startswith("distilled_guidance_layer.layers.")), "layers.")
    return None, [("double blocks", count_blocks(shapes, "double_blocks."), config.get("num_layers")),
                  ("single blocks", count_blocks(shapes, "single_blocks."), config.get("num_single_layers")),
                  ("approximator layers", layers, config.get("approximator_layers")),
                  ("inner width (img_in rows)", img_in[0], inner_width(config)),
                  ("in_channels (img_in columns)", img_in[1], config.get("in_channels")),
                  ("joint_attention_dim (txt_in columns)", txt_in[1], config.get("joint_attention_dim")),
                  ("approximator_hidden_dim (in_proj rows)", approx[0], config.get("approximator_hidden_dim")),
                  ("approximator_num_channels (in_proj columns)", approx[1], config.get("approximator_num_channels"))]
