"""Single-file checkpoints of tiny FLUX.1 / SD3 pipelines, for tests: the inverse of diffusers' converters.

A diffusers folder made by ``tiny_dit.make_tiny_pipeline`` is written as the files users actually have:

* FLUX.1: a transformer in the Black Forest Labs layout (``flux1-dev.safetensors``: ``double_blocks.N.img_attn.qkv``,
  ``single_blocks.N.linear1``, ``img_in``, ``time_in``, ``vector_in``, ``guidance_in`` (dev), ``txt_in``,
  ``final_layer``), optionally under ``model.diffusion_model.``;
* SD3/3.5: an MMDiT in Stability's layout (``sd3.5_medium.safetensors``: ``joint_blocks.N.x_block.attn.qkv``,
  ``context_block``, ``x_embedder``, ``t_embedder``, ``y_embedder``, ``context_embedder``, ``final_layer``,
  ``pos_embed``), usually under ``model.diffusion_model.``;
* optionally with the other components as ComfyUI "all-in-one" checkpoints carry them: the VAE in the LDM layout
  under ``vae.`` (FLUX, ComfyUI's ``vae_key_prefix``) or ``first_stage_model.`` (SD3), and the text encoders in
  transformers' layout under ``text_encoders.clip_l.transformer.``, ``text_encoders.clip_g.transformer.`` and
  ``text_encoders.t5xxl.transformer.`` -- the prefixes diffusers' single_file_utils reads them from
  (``convert_ldm_vae_checkpoint``, ``create_diffusers_clip_model_from_ldm``, ``convert_sd3_t5_checkpoint_to_diffusers``).

``flux_to_bfl`` / ``sd3_to_sai`` / ``vae_to_ldm`` mirror diffusers 0.42's
``convert_flux_transformer_checkpoint_to_diffusers`` / ``convert_sd3_transformer_checkpoint_to_diffusers`` /
``convert_ldm_vae_checkpoint`` statement by statement (same order, same names), so that a mistake in either shows
up as a round-trip mismatch. Every width is taken from the model config (tiny widths, never FLUX's 3072), and each
fused tensor is checked against it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

# diffusers' AdaLayerNormContinuous is (scale, shift), the original (shift, scale): the loader's swap is its own
# inverse, so the writer uses the same function.
from ..families._mmdit.convert import swap_scale_shift

DIT_PREFIX = "model.diffusion_model."
TE_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
               "t5xxl": "text_encoders.t5xxl.transformer."}
# family -> (VAE prefix, text encoder attribute -> TE_PREFIXES key), as ComfyUI's supported_models save them.
_ALL_IN_ONE = {
    "flux1": ("vae.", {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"}),
    "sd3": ("first_stage_model.", {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"}),
}


def _check(t: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    if t.shape[0] != rows:
        raise ValueError(f"{what}: {t.shape[0]} rows, the config says {rows}")
    return t


# --------------------------------------------------------------------------- FLUX.1 (BFL layout)

def _final_layer(sd: dict, out: dict, inner_dim: int) -> None:
    """The output head, the same in the BFL and SAI layouts (adaLN scale/shift halves swapped back)."""
    out["final_layer.linear.weight"] = sd.pop("proj_out.weight")
    out["final_layer.linear.bias"] = sd.pop("proj_out.bias")
    out["final_layer.adaLN_modulation.1.weight"] = swap_scale_shift(
        _check(sd.pop("norm_out.linear.weight"), 2 * inner_dim, "norm_out.linear.weight"))
    out["final_layer.adaLN_modulation.1.bias"] = swap_scale_shift(sd.pop("norm_out.linear.bias"))


def flux_to_bfl(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in the BFL layout (inverse of
    convert_flux_transformer_checkpoint_to_diffusers, statement by statement)."""
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
                parts = [_check(sd.pop(f"{p}attn.{n}.{kind}"), inner_dim, f"{p}attn.{n}.{kind}") for n in names]
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
            parts = [_check(sd.pop(f"{p}attn.{n}.{kind}"), inner_dim, f"{p}attn.{n}.{kind}")
                     for n in ("to_q", "to_k", "to_v")]
            parts.append(_check(sd.pop(f"{p}proj_mlp.{kind}"), mlp_hidden_dim, f"{p}proj_mlp.{kind}"))
            out[f"{s}linear1.{kind}"] = torch.cat(parts, dim=0)
        # qk norm
        out[f"{s}norm.query_norm.scale"] = sd.pop(f"{p}attn.norm_q.weight")
        out[f"{s}norm.key_norm.scale"] = sd.pop(f"{p}attn.norm_k.weight")
        # output projection
        out[f"{s}linear2.weight"] = sd.pop(f"{p}proj_out.weight")
        out[f"{s}linear2.bias"] = sd.pop(f"{p}proj_out.bias")

    _final_layer(sd, out, inner_dim)
    if sd:
        raise ValueError(f"flux_to_bfl: {len(sd)} tensors not mapped, e.g. {sorted(sd)[:5]}")
    return out


# --------------------------------------------------------------------------- SD3 / SD3.5 (SAI MMDiT layout)

def sd3_to_sai(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict in the SAI MMDiT layout (inverse of
    convert_sd3_transformer_checkpoint_to_diffusers, statement by statement)."""
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
    out["context_embedder.weight"] = _check(sd.pop("context_embedder.weight"), caption_projection_dim,
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
                parts = [_check(sd.pop(f"{p}attn.{n}.{kind}"), inner_dim, f"{p}attn.{n}.{kind}") for n in names]
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
                parts = [_check(sd.pop(f"{p}attn2.{n}.{kind}"), inner_dim, f"{p}attn2.{n}.{kind}")
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
                _check(sd.pop(f"{p}norm1_context.linear.weight"), 2 * caption_projection_dim,
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
    _final_layer(sd, out, inner_dim)
    if sd:
        raise ValueError(f"sd3_to_sai: {len(sd)} tensors not mapped, e.g. {sorted(sd)[:5]}")
    return out


# --------------------------------------------------------------------------- VAE (LDM layout)

def _vae_resnet(key: str) -> str:
    return key.replace("conv_shortcut", "nin_shortcut")


_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def vae_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM layout (ae.safetensors / first_stage_model.*): the inverse
    of convert_ldm_vae_checkpoint; the mid-block attention's linear weights become 1x1 convolutions."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for diffusers_key, ldm_key in DIFFUSERS_TO_LDM_MAPPING["vae"].items():
        if diffusers_key in sd:
            out[ldm_key] = sd.pop(diffusers_key)
    num_up = len(config["up_block_types"])
    for key in list(sd):
        part, rest = key.split(".", 1)  # encoder / decoder
        if rest.startswith("down_blocks."):
            _, i, kind, tail = rest.split(".", 3)
            new = (f"down.{i}.block.{_vae_resnet(tail)}" if kind == "resnets"
                   else f"down.{i}.downsample.{tail.removeprefix('0.')}")
        elif rest.startswith("up_blocks."):
            _, i, kind, tail = rest.split(".", 3)
            block_id = num_up - 1 - int(i)
            new = (f"up.{block_id}.block.{_vae_resnet(tail)}" if kind == "resnets"
                   else f"up.{block_id}.upsample.{tail.removeprefix('0.')}")
        elif rest.startswith("mid_block.resnets."):
            j, tail = rest.removeprefix("mid_block.resnets.").split(".", 1)
            new = f"mid.block_{int(j) + 1}.{_vae_resnet(tail)}"
        elif rest.startswith("mid_block.attentions.0."):
            tail = rest.removeprefix("mid_block.attentions.0.")
            for a, b in _VAE_ATTN:
                if tail.startswith(a):
                    tail = b + tail.removeprefix(a)
                    break
            new = f"mid.attn_1.{tail}"
        else:
            raise ValueError(f"vae_to_ldm: unexpected VAE tensor {key}")
        value = sd.pop(key)
        if new.startswith("mid.attn_1.") and new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[f"{part}.{new}"] = value
    return out


# --------------------------------------------------------------------------- writing

def _read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    return sd


def _family_of(folder: Path) -> str:
    cls = json.loads((folder / "model_index.json").read_text())["_class_name"]
    if cls.startswith("Flux"):
        return "flux1"
    if cls.startswith("StableDiffusion3"):
        return "sd3"
    raise ValueError(f"{folder}: {cls} is neither a FLUX.1 nor an SD3 pipeline")


def transformer_single_file_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's transformer in the original layout (BFL for FLUX.1, SAI for SD3), unprefixed."""
    folder = Path(folder)
    family = _family_of(folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    sd = _read_folder_weights(folder / "transformer")
    return flux_to_bfl(sd, config) if family == "flux1" else sd3_to_sai(sd, config)


def component_state_dicts(folder: Path) -> dict[str, torch.Tensor]:
    """The VAE and text encoders of the folder, keyed as ComfyUI all-in-one checkpoints hold them."""
    folder = Path(folder)
    vae_prefix, encoders = _ALL_IN_ONE[_family_of(folder)]
    out: dict[str, torch.Tensor] = {}
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    out.update({vae_prefix + k: v for k, v in vae_to_ldm(_read_folder_weights(folder / "vae"), vae_cfg).items()})
    for attr, name in encoders.items():
        sd = _read_folder_weights(folder / attr)
        if name != "t5xxl":  # transformers >= 5.6 saves CLIPTextModel without its text_model. wrapper
            sd = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in sd.items()}
        out.update({TE_PREFIXES[name] + k: v for k, v in sd.items()})
    return out


def write_single_file(folder, out_file, *, prefix: bool = True, components: bool = False,
                      dtype: torch.dtype | None = None) -> Path:
    """Write the tiny pipeline folder's transformer as a BFL (FLUX.1) or SAI (SD3) single file.

    prefix: keys under ``model.diffusion_model.`` (ComfyUI / SAI releases) or bare (BFL's flux1-dev.safetensors).
    components: also write the VAE and text encoders as ComfyUI all-in-one checkpoints do (see the module doc).
    dtype: cast every tensor (e.g. torch.bfloat16, or torch.float8_e4m3fn as "fp8" checkpoints hold them).
    """
    from safetensors.torch import save_file

    folder, out_file = Path(folder), Path(out_file)
    sd = {(DIT_PREFIX if prefix else "") + k: v for k, v in transformer_single_file_state_dict(folder).items()}
    if components:
        sd.update(component_state_dicts(folder))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out_file), metadata={"format": "pt"})
    return out_file
