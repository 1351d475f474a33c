"""FLUX.2 single files in Black Forest Labs' layout (``flux2-dev.safetensors``, the klein releases: see
_flux2/signature.py): ``to_diffusers`` for the single-file loader (runtime/single_file.py) is diffusers 0.42's own
``convert_flux2_transformer_checkpoint_to_diffusers`` (it reads widths from the tensors, so tiny models convert);
``from_diffusers`` is its inverse, for the tests' tiny single files; ``config_checks`` what a header's shapes must
agree on with a transformer config. Torch is imported inside the functions."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._mmdit.convert import COMPONENT_PREFIXES, check_rows, count_blocks, inner_width, rows_cols, swap_scale_shift

__all__ = ["ALL_IN_ONE_TEXT_ENCODERS", "ALL_IN_ONE_VAE", "COMPONENT_PREFIXES", "config_checks", "from_diffusers",
           "to_diffusers", "tool_file_fused_parts", "tool_file_to_peft"]

# ComfyUI ships FLUX.2's VAE and text encoder as separate files; all-in-one files are not a FLUX.2 release format.
ALL_IN_ONE_VAE = "vae."
ALL_IN_ONE_TEXT_ENCODERS: dict[str, str] = {}

# diffusers -> BFL names of the model-wide modules (the LoRA export names them the same way: export.py).
BFL_NAMES = {"x_embedder": "img_in", "context_embedder": "txt_in",
           "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
           "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
           "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear"}
_DOUBLE = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
           "attn.to_out.0.weight": "img_attn.proj.weight", "ff.linear_in.weight": "img_mlp.0.weight",
           "ff.linear_out.weight": "img_mlp.2.weight", "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
           "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale", "attn.to_add_out.weight": "txt_attn.proj.weight",
           "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight"}
_SINGLE = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
           "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}


def to_diffusers(checkpoint: dict, config: Mapping) -> dict:
    """diffusers' converter; it pops every key of ``checkpoint`` (what it does not know keeps its name and fails
    the loader's exact key comparison)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers(checkpoint)


def from_diffusers(sd: dict, config: Mapping) -> dict:
    """A diffusers Flux2Transformer2DModel state dict -> BFL's layout (bare keys), widths from ``config``."""
    import torch

    sd = dict(sd)
    out: dict = {}
    inner = inner_width(config)
    for src, dst in BFL_NAMES.items():
        if f"{src}.weight" in sd:
            out[f"{dst}.weight"] = sd.pop(f"{src}.weight")
    out["final_layer.adaLN_modulation.1.weight"] = swap_scale_shift(
        check_rows(sd.pop("norm_out.linear.weight"), 2 * inner, "norm_out.linear.weight"))
    for i in range(int(config["num_layers"])):
        p, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for fused, names in (("img_attn.qkv", ("to_q", "to_k", "to_v")),
                             ("txt_attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            out[f"{d}{fused}.weight"] = torch.cat(
                [check_rows(sd.pop(f"{p}attn.{n}.weight"), inner, f"{p}attn.{n}.weight") for n in names], dim=0)
        for src, dst in _DOUBLE.items():
            out[d + dst] = sd.pop(p + src)
    for i in range(int(config["num_single_layers"])):
        p, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for src, dst in _SINGLE.items():
            out[s + dst] = sd.pop(p + src)
    if sd:
        raise ValueError(f"flux2 from_diffusers: {len(sd)} tensors not mapped, e.g. {sorted(sd)[:5]}")
    return out


def config_checks(shapes: Mapping[str, list], config: Mapping,
                  where: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """(refusal or None, (what, in the file, in the config) per figure that must agree)."""
    has_guidance = any(k.startswith("guidance_in.") for k in shapes)
    if has_guidance != bool(config.get("guidance_embeds")):
        return (f"{'has' if has_guidance else 'lacks'} FLUX.2-dev's guidance embedder (guidance_in.*) but {where} "
                f"says guidance_embeds {bool(config.get('guidance_embeds'))}"), []
    img_in, txt_in = (rows_cols(shapes, k) for k in ("img_in.weight", "txt_in.weight"))
    return None, [("double blocks", count_blocks(shapes, "double_blocks."), config.get("num_layers")),
                  ("single blocks", count_blocks(shapes, "single_blocks."), config.get("num_single_layers")),
                  ("inner width (img_in rows)", img_in[0], inner_width(config)),
                  ("in_channels (img_in columns)", img_in[1], config.get("in_channels")),
                  ("joint_attention_dim (txt_in columns)", txt_in[1], config.get("joint_attention_dim"))]


# -- our tool file read back (init_lora: adapters/init_from_file.py) ----------------------------------------------

def tool_file_fused_parts(key: str) -> int:
    """How many PEFT modules one key of the kohya-named tool file (_flux2/export.py) may fuse: q/k/v."""
    return 3 if "_attn_qkv." in key else 1


def tool_file_to_peft(sd: dict) -> dict:
    """The kohya-named FLUX.2 file (``lora_unet_*``) in PEFT names (``transformer.<path>.lora_A/B.weight``) through
    diffusers' own _convert_kohya_flux2_lora_to_diffusers: its alpha / rank goes into the weights and a
    block-diagonal qkv splits back into the trained q/k/v modules. Other files are returned as they are."""
    if not any(k.startswith("lora_unet_") for k in sd):
        return sd
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    return _convert_kohya_flux2_lora_to_diffusers(dict(sd))
