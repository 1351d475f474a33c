"""Krea 2 names: the original krea-ai/krea-2 layout (single files, and the ComfyUI LoRA file's module names) and
diffusers'. diffusers 0.42.1 has the original -> diffusers direction twice: for checkpoints
(single_file_utils ``convert_krea2_transformer_checkpoint_to_diffusers``, which ``to_diffusers`` calls) and for LoRA
files (lora_conversion_utils ``_convert_non_diffusers_krea2_lora_to_diffusers``). ``native_name`` is their inverse,
written once here for both (``from_diffusers``, the tests' single files, and export's ComfyUI file); the tests
check it against both converters. Torch is imported inside the functions."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._mmdit.convert import count_blocks, rows_cols

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["COMPONENT_PREFIXES", "ALL_IN_ONE_VAE", "ALL_IN_ONE_TEXT_ENCODERS", "config_checks", "from_diffusers",
           "native_name", "to_diffusers", "tool_file_fused_parts", "tool_file_to_peft"]

COMPONENT_PREFIXES = ("text_encoders.", "vae.")
ALL_IN_ONE_VAE = "vae."
ALL_IN_ONE_TEXT_ENCODERS: dict[str, str] = {}  # Qwen3-VL-4B ships as its own file

# diffusers -> original, the converter's two tables inverted: first the one name at the key's start (whole-key
# entries before their prefixes), then the in-block renames over the rest.
_PREFIXES = (("txt_in.norm.weight", "txtmlp.0.scale"), ("final_layer.norm.weight", "last.norm.scale"),
             ("final_layer.scale_shift_table", "last.modulation.lin"), ("final_layer.linear.", "last.linear."),
             ("img_in.", "first."), ("time_embed.linear_1.", "tmlp.0."), ("time_embed.linear_2.", "tmlp.2."),
             ("time_mod_proj.", "tproj.1."), ("txt_in.linear_1.", "txtmlp.1."), ("txt_in.linear_2.", "txtmlp.3."),
             ("text_fusion.", "txtfusion."), ("transformer_blocks.", "blocks."))
_IN_BLOCK = ((".attn.to_q.", ".attn.wq."), (".attn.to_k.", ".attn.wk."), (".attn.to_v.", ".attn.wv."),
             (".attn.to_out.0.", ".attn.wo."), (".attn.to_gate.", ".attn.gate."),
             (".attn.norm_q.weight", ".attn.qknorm.qnorm.scale"), (".attn.norm_k.weight", ".attn.qknorm.knorm.scale"),
             (".ff.", ".mlp."), (".norm1.weight", ".prenorm.scale"), (".norm2.weight", ".postnorm.scale"),
             (".scale_shift_table", ".mod.lin"))


def native_name(name: str) -> str:
    """A diffusers parameter name, or a module path, of Krea2Transformer2DModel -> the original layout's."""
    key = name + "."  # a module path ends where a parameter name would continue
    for src, dst in _PREFIXES:
        if key.startswith(src):
            key = dst + key[len(src):]
            break
    for src, dst in _IN_BLOCK:
        key = key.replace(src, dst)
    return key[:-1]


def to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """diffusers 0.42.1's converter (widths from the tensors); it takes every tensor out of ``checkpoint``."""
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    return convert_krea2_transformer_checkpoint_to_diffusers(checkpoint)


def from_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers Krea2Transformer2DModel state dict -> the original layout (each block's six modulation rows
    flattened into one vector, as the original stores them)."""
    out = {}
    for key, value in sd.items():
        if key.startswith("transformer_blocks.") and key.endswith(".scale_shift_table"):
            value = value.reshape(-1)
        out[native_name(key)] = value
    return out


def config_checks(shapes: Mapping[str, list], config: Mapping,
                  where: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """What the header's shapes (bare keys) say against ``where`` (transformer/config.json)."""
    first, txt, proj = (rows_cols(shapes, k) for k in ("first.weight", "txtmlp.1.weight", "txtfusion.projector.weight"))
    width = config.get("num_attention_heads", 48) * config.get("attention_head_dim", 128)
    return None, [("blocks", count_blocks(shapes, "blocks."), config.get("num_layers")),
                  ("hidden size (first rows)", first[0], width),
                  ("in_channels (first columns)", first[1], config.get("in_channels")),
                  ("text_hidden_dim (txtmlp.1 columns)", txt[1], config.get("text_hidden_dim")),
                  ("num_text_layers (txtfusion.projector columns)", proj[1], config.get("num_text_layers"))]


def tool_file_fused_parts(key: str) -> int:
    return 1  # one module per key: Krea 2's q / k / v are separate Linears in both layouts


def tool_file_to_peft(sd: dict) -> dict:
    """The ComfyUI file (``diffusion_model.<original name>``, export.py) in PEFT names (``transformer.<path>``)
    through diffusers' own Krea 2 LoRA converter (init_lora); other files are returned as they are."""
    if not any(k.startswith("diffusion_model.") for k in sd):
        return sd
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_krea2_lora_to_diffusers

    return _convert_non_diffusers_krea2_lora_to_diffusers(dict(sd))
