"""Ideogram 4 single files and tool files. Torch is imported inside the functions.

Transformer checkpoints in the original layout differ from diffusers' names only in the attention: ``attention.qkv``
(q, k, v stacked by rows) and ``attention.o`` (= ``to_out.0``); every other name is diffusers' (the mapping diffusers'
own Ideogram 4 LoRA converter applies, which renames nothing else; inferred for the non-block tensors, no release
file was read). diffusers 0.42.1 has no single-file converter for Ideogram4Transformer2DModel, so ``to_diffusers``
is this mapping; ``from_diffusers`` its inverse (the tests' single files).

The tool file (export in adapter.py) is the peers' ComfyUI layout: ``diffusion_model.`` + native names with q/k/v
fused exactly (outputs/lora_files.fuse_qkv) and ``.alpha``; ``tool_file_to_peft`` reads it back for init_lora
through diffusers' own ``_convert_non_diffusers_ideogram4_lora_to_diffusers``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._mmdit.convert import COMPONENT_PREFIXES, count_blocks, inner_width, rows_cols

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["COMPONENT_PREFIXES", "ALL_IN_ONE_VAE", "ALL_IN_ONE_TEXT_ENCODERS", "config_checks", "from_diffusers",
           "to_diffusers", "tool_file_fused_parts", "tool_file_to_peft"]

ALL_IN_ONE_VAE = "vae."  # inferred: no all-in-one Ideogram 4 checkpoint is known
ALL_IN_ONE_TEXT_ENCODERS: dict[str, str] = {}
_QKV, _O = ".attention.qkv.", ".attention.o."


def to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """The original layout (or diffusers' own names) -> diffusers' names; pops what it converts."""
    import torch

    width = inner_width(config)
    out = {}
    for key in list(checkpoint):
        if _QKV in key:
            qkv = checkpoint.pop(key)
            if qkv.shape[0] != 3 * width:
                raise ValueError(f"{key}: {qkv.shape[0]} rows, the config says 3 x {width}")
            stem, suffix = key.split(_QKV)
            for name, part in zip(("to_q", "to_k", "to_v"), torch.chunk(qkv, 3, dim=0)):
                out[f"{stem}.attention.{name}.{suffix}"] = part.contiguous()
        elif _O in key:
            out[key.replace(_O, ".attention.to_out.0.")] = checkpoint.pop(key)
        else:
            out[key] = checkpoint.pop(key)
    return out


def from_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers' Ideogram4Transformer2DModel state dict -> the original layout (q/k/v fused in that order)."""
    import torch

    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(sd):
        if key not in sd or ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            stem, suffix = key.split(".attention.to_q.")
            out[f"{stem}{_QKV}{suffix}"] = torch.cat([sd.pop(f"{stem}.attention.to_{p}.{suffix}") for p in "qkv"])
        else:
            out[key.replace(".attention.to_out.0.", _O)] = sd.pop(key)
    return out


def config_checks(shapes: Mapping[str, list], config: Mapping,
                  where: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """What the header's shapes (bare keys) say against ``where`` (transformer/config.json)."""
    proj_in, llm = rows_cols(shapes, "input_proj.weight"), rows_cols(shapes, "llm_cond_proj.weight")
    return None, [("layers", count_blocks(shapes, "layers."), config.get("num_layers")),
                  ("inner width (input_proj rows)", proj_in[0], inner_width(config)),
                  ("in_channels (input_proj columns)", proj_in[1], config.get("in_channels")),
                  ("llm_features_dim (llm_cond_proj columns)", llm[1], config.get("llm_features_dim"))]


def tool_file_fused_parts(key: str) -> int:
    """How many PEFT modules one key of the tool file may fuse: q/k/v."""
    return 3 if _QKV in key else 1


def tool_file_to_peft(sd: dict) -> dict:
    """The ComfyUI file (``diffusion_model.`` native names, fused qkv, ``.alpha``) in PEFT names through diffusers'
    own converter (alpha / rank into the weights, qkv split into q/k/v with the stacked down shared); where that
    down is our exact fusion (block-diagonal up), each part gets back its own rank's rows and columns. Other files
    are returned as they are."""
    if not any(k.startswith("diffusion_model.") or _QKV in k for k in sd):
        return sd
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ideogram4_lora_to_diffusers

    out = _convert_non_diffusers_ideogram4_lora_to_diffusers(dict(sd))
    for key in [k for k in out if ".attention.to_q.lora_A." in k]:
        stem = key[: -len("to_q.lora_A.weight")]
        ups = [out[f"{stem}to_{p}.lora_B.weight"] for p in "qkv"]
        rank = ups[0].shape[1] // 3
        if ups[0].shape[1] % 3:
            continue
        blocks = [slice(i * rank, (i + 1) * rank) for i in range(3)]
        if any(up[:, s].abs().max() > 0 for i, up in enumerate(ups) for j, s in enumerate(blocks) if i != j):
            continue  # a shared-rank fused LoRA (ai-toolkit's): kept as diffusers splits it
        for i, p in enumerate("qkv"):
            out[f"{stem}to_{p}.lora_A.weight"] = out[f"{stem}to_{p}.lora_A.weight"][blocks[i]].contiguous()
            out[f"{stem}to_{p}.lora_B.weight"] = ups[i][:, blocks[i]].contiguous()
    return out
