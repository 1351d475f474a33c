"""Z-Image single files in the original layout (ComfyUI's ``z_image_turbo_bf16.safetensors``: fused
``attention.qkv``, ``attention.out``, ``attention.q_norm/k_norm``, ``x_embedder``, ``final_layer``), read with
diffusers' own ``convert_z_image_transformer_checkpoint_to_diffusers`` (width-agnostic: it chunks qkv in three);
``from_diffusers`` is its inverse, for the tests' tiny single files. Torch is imported inside the functions."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._mmdit.convert import count_blocks, rows_cols

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["COMPONENT_PREFIXES", "ALL_IN_ONE_VAE", "ALL_IN_ONE_TEXT_ENCODERS", "config_checks", "from_diffusers",
           "to_diffusers"]

COMPONENT_PREFIXES = ("text_encoders.", "vae.")
ALL_IN_ONE_VAE = "vae."
ALL_IN_ONE_TEXT_ENCODERS: dict[str, str] = {}  # ComfyUI ships Qwen3-4B as its own file
# diffusers' names -> the original's (the inverse of its Z_IMAGE_KEYS_RENAME_DICT, patch 2 / f-patch 1).
_RENAMES = ((".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
            (".attention.norm_k.", ".attention.k_norm."))


def to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """diffusers 0.42's converter; it takes every tensor out of ``checkpoint`` (the loader then checks the result
    against the config's model exactly, so a foreign tensor still fails there)."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    return convert_z_image_transformer_checkpoint_to_diffusers(checkpoint)


def from_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers ZImageTransformer2DModel state dict -> the original layout (q/k/v fused in that order)."""
    import torch

    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(sd):
        if key not in sd or ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q.weight" in key:
            stem = key[: -len("to_q.weight")]
            parts = [sd.pop(f"{stem}to_{p}.weight") for p in "qkv"]
            if len({p.shape for p in parts}) != 1 or parts[0].shape[0] != config["dim"]:
                raise ValueError(f"{stem}: q/k/v of shapes {[tuple(p.shape) for p in parts]}, dim {config['dim']}")
            out[f"{stem}qkv.weight"] = torch.cat(parts, dim=0)
            continue
        new = "." + key
        for src, dst in _RENAMES:
            new = new.replace(src, dst)
        new = new[1:].replace("all_final_layer.2-1.", "final_layer.").replace("all_x_embedder.2-1.", "x_embedder.")
        out[new] = sd.pop(key)
    leftover = [k for k in sd if ".attention.to_" in k]
    if leftover:
        raise ValueError(f"zimage from_diffusers: {len(leftover)} tensors not mapped, e.g. {leftover[:5]}")
    return out


def config_checks(shapes: Mapping[str, list], config: Mapping,
                  where: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """What the header's shapes (bare keys) say against ``where`` (transformer/config.json)."""
    x_in, cap = rows_cols(shapes, "x_embedder.weight"), rows_cols(shapes, "cap_embedder.1.weight")
    return None, [("layers", count_blocks(shapes, "layers."), config.get("n_layers")),
                  ("noise refiner layers", count_blocks(shapes, "noise_refiner."), config.get("n_refiner_layers")),
                  ("context refiner layers", count_blocks(shapes, "context_refiner."), config.get("n_refiner_layers")),
                  ("dim (x_embedder rows)", x_in[0], config.get("dim")),
                  ("cap_feat_dim (cap_embedder columns)", cap[1], config.get("cap_feat_dim"))]
