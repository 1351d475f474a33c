"""What the single-file converters of FLUX.1 (flux1/convert.py) and SD3/3.5 (sd3/convert.py) share: the adaLN
half swap, the output head (the same in BFL's and SAI's layouts), the figures their checks read from a header's
shapes, and the key prefixes of ComfyUI "all-in-one" checkpoints. Torch is imported inside the functions: the
single-file loader's preflight side imports the family convert modules without torch."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Other components of all-in-one checkpoints (ComfyUI, SAI): never part of an unprefixed transformer.
COMPONENT_PREFIXES = ("text_encoders.", "vae.", "first_stage_model.", "cond_stage_model.", "conditioner.")
# Where ComfyUI's supported_models save each text encoder in transformers' layout; diffusers' single_file_utils
# reads them from there (create_diffusers_clip_model_from_ldm, convert_sd3_t5_checkpoint_to_diffusers).
CLIP_L, CLIP_G, T5XXL = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                         "text_encoders.t5xxl.transformer.")


def swap_scale_shift(weight):
    """diffusers' AdaLayerNormContinuous is (scale, shift), the original (shift, scale); the swap is its own
    inverse, so the writers use it too."""
    import torch

    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def check_rows(t: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    """``t``, after checking that it has the config's row count (a fused tensor is cut by rows when read back)."""
    if t.shape[0] != rows:
        raise ValueError(f"{what}: {t.shape[0]} rows, the config says {rows}")
    return t


def final_layer_from_diffusers(sd: dict, out: dict, inner_dim: int) -> None:
    """The output head, the same in the BFL and SAI layouts (adaLN scale/shift halves swapped back)."""
    out["final_layer.linear.weight"] = sd.pop("proj_out.weight")
    out["final_layer.linear.bias"] = sd.pop("proj_out.bias")
    out["final_layer.adaLN_modulation.1.weight"] = swap_scale_shift(
        check_rows(sd.pop("norm_out.linear.weight"), 2 * inner_dim, "norm_out.linear.weight"))
    out["final_layer.adaLN_modulation.1.bias"] = swap_scale_shift(sd.pop("norm_out.linear.bias"))


def count_blocks(keys: Iterable[str], prefix: str) -> int:
    """How many numbered blocks ``prefix.N.`` the keys hold (highest N + 1)."""
    ids = {int(k.split(".", 2)[1]) for k in keys if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def rows_cols(shapes: Mapping[str, list], key: str, n: int = 2) -> list:
    """The first ``n`` dimensions of a header's tensor, None for those it lacks (or for a missing tensor)."""
    return [*(shapes.get(key) or []), *([None] * n)][:n]


def inner_width(config: Mapping) -> int:
    return config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
