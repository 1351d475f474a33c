"""The FLUX.2 LoRA file for ComfyUI / Forge: Black Forest Labs' module names in kohya's spelling, as musubi-tuner
writes them (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``).

Why this layout: ComfyUI maps ``lora_unet_<BFL path with . -> _>`` onto ``diffusion_model.<BFL path>.weight`` for
every model (its generic key map), applying ``.alpha``; and diffusers 0.42.1 reads it through
``_convert_kohya_flux2_lora_to_diffusers``, which applies alpha / rank and splits a fused q/k/v LoRA exactly when its
up matrix is block-diagonal. The ai-toolkit spelling (``diffusion_model.`` + BFL names + lora_A/lora_B) loads in
ComfyUI too, but diffusers' ``_convert_non_diffusers_flux2_lora_to_diffusers`` refuses any ``.alpha`` key in it
("original_state_dict should be empty"), and a file without ``.alpha`` is applied by ComfyUI at scale 1.

BFL fuses q/k/v into one ``qkv`` Linear where diffusers has three. Separate q/k/v LoRAs are fused exactly:
``down = cat(down_q, down_k, down_v)`` (rank 3r) and ``up`` block-diagonal, so ``up @ down`` is the three deltas
stacked. alpha / rank is folded into ``up`` (fp32, before the cast) and ``.alpha`` is the module's own (fused) rank,
so every loader's scale alpha / rank is 1: keeping the trained alpha while the rank triples would shrink the delta
3x (sd-scripts #2204). The single blocks are fused in diffusers too (to_qkv_mlp_proj = linear1, to_out = linear2).

    transformer_blocks.N.attn.to_q/k/v                -> double_blocks.N.img_attn.qkv   (fused)
    transformer_blocks.N.attn.add_q/k/v_proj          -> double_blocks.N.txt_attn.qkv   (fused)
    transformer_blocks.N.attn.to_out.0 / to_add_out   -> double_blocks.N.img_attn.proj / txt_attn.proj
    transformer_blocks.N.ff.linear_in / linear_out    -> double_blocks.N.img_mlp.0 / img_mlp.2
    transformer_blocks.N.ff_context.linear_in / _out  -> double_blocks.N.txt_mlp.0 / txt_mlp.2
    single_transformer_blocks.N.attn.to_qkv_mlp_proj  -> single_blocks.N.linear1
    single_transformer_blocks.N.attn.to_out           -> single_blocks.N.linear2
    x_embedder / context_embedder / proj_out          -> img_in / txt_in / final_layer.linear
    time_guidance_embed.timestep_embedder.linear_1/2  -> time_in.in_layer / out_layer (guidance_embedder: guidance_in)
    double_stream_modulation_img/_txt.linear, single_stream_modulation.linear -> *.lin

(diffusers' single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers, inverted.) ``norm_out.linear`` has
no kohya name diffusers converts and is refused, as is DoRA (one magnitude over fused q/k/v is not what was trained).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...outputs.export import is_dora, iter_modules
from ...outputs.lora_files import fuse_qkv, kohya_entry
from .convert import BFL_NAMES

UNET_PREFIX = "lora_unet"
_QKV = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
        "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
        "attn.add_v_proj": ("txt_attn.qkv", 2)}
_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
           "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
           "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_GLOBAL = BFL_NAMES  # the model-wide modules: the single-file converter's names


def bfl_target(path: str) -> tuple[str, int | None] | None:
    """A diffusers Flux2Transformer2DModel Linear path -> (BFL module, q/k/v part or None); None if it has none."""
    if path in _GLOBAL:
        return _GLOBAL[path], None
    head, _, rest = path.partition(".")
    index, _, child = rest.partition(".")
    if not index.isdigit():
        return None
    if head == "transformer_blocks":
        if child in _QKV:
            module, part = _QKV[child]
            return f"double_blocks.{index}.{module}", part
        if child in _DOUBLE:
            return f"double_blocks.{index}.{_DOUBLE[child]}", None
    if head == "single_transformer_blocks" and child in _SINGLE:
        return f"single_blocks.{index}.{_SINGLE[child]}", None
    return None


def _name(module: str) -> str:
    return f"{UNET_PREFIX}_" + module.replace(".", "_")


def _entry(out: dict, module: str, down: torch.Tensor, up32: torch.Tensor, dtype: torch.dtype) -> None:
    kohya_entry(out, _name(module), down, up32, dtype)


def flux2_kohya_state_dict(states: Mapping[str, Mapping[str, torch.Tensor]], transformer_config: Any, *,
                           alpha: float, rank: int, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """PEFT states ({"transformer": get_peft_model_state_dict(...)}) -> the kohya-named BFL LoRA (module doc)."""
    if is_dora(states):
        raise ValueError("DoRA LoRAs have no exact fused-q/k/v FLUX.2 form; use pytorch_lora_weights.safetensors")
    if set(states) - {"transformer"}:
        raise ValueError(f"FLUX.2 LoRAs hold the transformer only, not {sorted(set(states) - {'transformer'})}")
    scale = float(alpha) / int(rank)
    cfg = dict(transformer_config)
    width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for _, path, parts in iter_modules(states):
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        target = bfl_target(path)
        if target is None:
            raise ValueError(f"transformer.{path}: no FLUX.2 (BFL) module diffusers' kohya converter maps it to")
        up32 = b.detach().to("cpu", torch.float32) * scale
        module, part = target
        if part is None:
            _entry(out, module, a, up32, dtype)
            continue
        if b.shape[0] != width:
            raise ValueError(f"transformer.{path}: {b.shape[0]} output rows, its slice of {module} is {width}")
        fused.setdefault(module, {})[part] = (a.detach().to("cpu", torch.float32), up32)
    for module, parts in fused.items():
        _entry(out, module, *fuse_qkv(parts, width), dtype)
    return out


__all__ = ["UNET_PREFIX", "bfl_target", "flux2_kohya_state_dict"]
