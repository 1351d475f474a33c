"""The original LDM layout of single files, written from diffusers state dicts: the inverse of diffusers'
loaders/single_file_utils.py converters, so that tests can exercise the A1111/Civitai loading path
(``from_single_file``) offline. The UNet families load such files through diffusers itself (their adapter), so
there is no ``to_diffusers`` here.

* ``from_diffusers``: a whole SD 1.x / SD 2.x / SDXL pipeline as one checkpoint (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.*`` or SDXL's ``conditioner.embedders.N.*``);
* ``vae_from_diffusers``: an AutoencoderKL in the LDM layout, unprefixed; FLUX.1 and SD3 all-in-one files carry
  their VAE in this layout too (under their own prefix).

Torch is imported inside the functions.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_from_diffusers(sd: Mapping, config: Mapping) -> dict:
    """A UNet2DConditionModel state dict in the LDM layout (unprefixed)."""
    per = config["layers_per_block"] + 1  # LDM gives each downsampler its own input block
    up_has_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, t in sd.items():
        if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            kind, b, part, i, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            idx = 1 + b * per + i if kind == "down" else b * per + i
            if part == "resnets":
                head, _, tail = rest.partition(".")
                rest, slot = f"{_RESNET[head]}.{tail}", 0
            else:
                slot = 1
            new = f"{'input' if kind == 'down' else 'output'}_blocks.{idx}.{slot}.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            new = f"output_blocks.{b * per + per - 1}.{2 if b in up_has_attn else 1}.conv.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.([^.]+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_RESNET[m[2]]}.{m[3]}"
        elif key.startswith("mid_block.attentions.0."):
            new = "middle_block.1." + key[len("mid_block.attentions.0."):]
        else:
            stem, _, leaf = key.rpartition(".")
            new = f"{_UNET_FIXED[stem]}.{leaf}"
        out[new] = t
    return out


def vae_from_diffusers(sd: Mapping, config: Mapping) -> dict:
    """An AutoencoderKL state dict in the LDM layout (unprefixed): the inverse of convert_ldm_vae_checkpoint."""
    num_blocks = len(config["block_out_channels"])
    out = {}
    for key, t in sd.items():
        if m := re.match(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)",
                         key):
            coder, kind, i, part, j, rest = m.groups()
            # LDM numbers decoder levels from the bottom, diffusers from the top.
            level = int(i) if kind == "down" else num_blocks - 1 - int(i)
            if part == "resnets":
                new = f"{coder}.{kind}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{coder}.{kind}.{level}.{kind}sample.{rest}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if t.ndim == 2:  # LDM's VAE attention uses 1x1 convs
                t = t[:, :, None, None]
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out[new] = t
    return out


def open_clip_from_diffusers(sd: Mapping) -> dict:
    """A CLIPTextModel(WithProjection) state dict in OpenCLIP's layout (SD2's text encoder, SDXL's second),
    unprefixed: fused in_proj q/k/v, transposed text_projection."""
    import torch

    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight")}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    for key in [k for k in sd if ".q_proj." in k]:
        leaf = key.rsplit(".", 1)[1]
        base = key.split(".self_attn.")[0].replace("encoder.layers.", "transformer.resblocks.")
        qkv = [sd.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[f"{base}.attn.in_proj_{leaf}"] = torch.cat(qkv)
    renames = (("encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
               (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), ("self_attn.", "attn."), ("final_layer_norm", "ln_final"))
    for key, t in sd.items():
        for a, b in renames:
            key = key.replace(a, b)
        out[key] = t
    return out


def _prefixed(prefix: str, sd: Mapping) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def from_diffusers(weights: Mapping[str, Mapping], configs: Mapping[str, Mapping]) -> dict:
    """An A1111/Civitai-style checkpoint (original LDM key names) from a pipeline's components: ``weights`` and
    ``configs`` by pipeline attribute (unet, vae, text_encoder and, for SDXL, text_encoder_2). The text encoders'
    layout follows from what the pipeline has: SDXL's two under conditioner.embedders, SD2's OpenCLIP-H (gelu),
    SD1's CLIP-L as transformers saves it."""
    ckpt = _prefixed(UNET_PREFIX, unet_from_diffusers(weights["unet"], configs["unet"]))
    ckpt.update(_prefixed(VAE_PREFIX, vae_from_diffusers(weights["vae"], configs["vae"])))
    te = {"text_model." + k.removeprefix("text_model."): v for k, v in weights["text_encoder"].items()}
    if "text_encoder_2" in weights:
        ckpt.update(_prefixed("conditioner.embedders.0.transformer.", te))
        ckpt.update(_prefixed("conditioner.embedders.1.model.", open_clip_from_diffusers(weights["text_encoder_2"])))
    elif configs["text_encoder"].get("hidden_act") == "gelu":  # SD2 ships OpenCLIP-H
        ckpt.update(_prefixed("cond_stage_model.model.", open_clip_from_diffusers(te)))
    else:
        ckpt.update(_prefixed("cond_stage_model.transformer.", te))
    return ckpt
