"""Kohya module names for PEFT module paths: how sd-scripts names each LoRA'd layer, which is what ComfyUI, Forge,
A1111 and diffusers' kohya converter look up.

Naming rules (sd-scripts, confirmed against ComfyUI ``comfy/lora.py`` + ``comfy/utils.py unet_to_diffusers``, A1111
``extensions-builtin/Lora/networks.py`` and diffusers ``loaders/lora_conversion_utils.py``):

* SD1.x/2.x UNet: sd-scripts trains the diffusers UNet, so names are diffusers paths with ``_``:
  ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_attentions_0_..._to_q``.
* SDXL UNet: sd-scripts trains its own SGM/LDM UNet (``library/sdxl_original_unet.py``), so names use the original
  block layout: ``input_blocks.N.{0 resnet | 1 transformer}``, ``middle_block.{0,1,2}``,
  ``output_blocks.N.{0 resnet | 1 transformer | 1-or-2 upsampler}``; resnet children are renamed (conv1 ->
  in_layers.2, time_emb_proj -> emb_layers.1, conv2 -> out_layers.3, conv_shortcut -> skip_connection). The block
  numbering is derived from the config (layers_per_block, block types), never hard-coded for the full-size model.
  Which layout a family's UNet gets is its spec's ``kohya_sgm_unet``.
* Text encoders: ``lora_te_`` when the family has one LoRA'd text encoder (SD1/2), ``lora_te1_`` / ``lora_te2_``
  when it has several (SDXL), + ``text_model_encoder_layers_...``.
  transformers 5.x ``CLIPTextModel`` has no ``text_model.`` level, but ComfyUI only maps names WITH it and silently
  ignores the rest, so the level is always written.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..spec import FamilySpec

# diffusers ResnetBlock2D child -> SGM ResBlock child (ComfyUI UNET_MAP_RESNET, A1111 suffix_conversion).
_RESNET_TO_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
# Modules outside the block structure (ComfyUI UNET_MAP_BASIC).
_TOP_TO_SGM = {
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
}


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:  # dict, FrozenDict or config object
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def te_prefixes(text_encoders: Sequence[str]) -> dict[str, str]:
    """Kohya text-encoder prefixes (sd-scripts LoRANetwork.LORA_PREFIX_TEXT_ENCODER{,1,2}): ``lora_te`` for a model's
    one LoRA'd text encoder, ``lora_te1``, ``lora_te2`` ... in the pipeline's order when it has several."""
    if len(text_encoders) == 1:
        return {text_encoders[0]: "lora_te"}
    return {name: f"lora_te{i}" for i, name in enumerate(text_encoders, 1)}


def te_path(path: str) -> str:
    """Module path with the ``text_model.`` level CLIPTextModel had before transformers 5.x (and still has in
    CLIPTextModelWithProjection); ComfyUI, A1111 and older diffusers all expect it."""
    if path.startswith("text_model.") or path.startswith("text_projection"):
        return path
    return "text_model." + path


# ------------------------------------------------------------------------------------------------ SDXL SGM names
def sgm_block_map(unet_config: Any) -> dict[str, tuple[str, str]]:
    """diffusers container prefix -> (SGM prefix, kind), following the order in which the SGM UNet appends blocks.

    input_blocks: 0 is conv_in; then per down block, one entry per layer (resnet at .0, transformer at .1) and one
    more for the downsampler (``.0.op``) unless it is the last block. middle_block: resnet, transformer, resnet.
    output_blocks: per up block (deepest first) layers_per_block + 1 entries; the upsampler sits in the last entry
    after the resnet and, if present, the transformer (so at .2 with attention, .1 without).
    """
    down = list(_cfg_get(unet_config, "down_block_types") or ())
    up = list(_cfg_get(unet_config, "up_block_types") or ())
    if not down or len(up) != len(down):
        raise ValueError("unet_config needs down_block_types and up_block_types of equal length for SDXL names")
    lpb = _cfg_get(unet_config, "layers_per_block", 2)
    lpb = [int(lpb)] * len(down) if isinstance(lpb, int) else [int(x) for x in lpb]
    has_attn = lambda block_type: "Attn" in block_type  # noqa: E731 (CrossAttnDownBlock2D, AttnUpBlock2D, ...)
    m: dict[str, tuple[str, str]] = {}
    n = 1
    for x, block_type in enumerate(down):
        for i in range(lpb[x]):
            m[f"down_blocks.{x}.resnets.{i}"] = (f"input_blocks.{n}.0", "resnet")
            if has_attn(block_type):
                m[f"down_blocks.{x}.attentions.{i}"] = (f"input_blocks.{n}.1", "attn")
            n += 1
        if x < len(down) - 1:
            m[f"down_blocks.{x}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", "leaf")
            n += 1
    mid_type = _cfg_get(unet_config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is not None:
        if has_attn(mid_type):
            m["mid_block.resnets.0"] = ("middle_block.0", "resnet")
            m["mid_block.attentions.0"] = ("middle_block.1", "attn")
            m["mid_block.resnets.1"] = ("middle_block.2", "resnet")
        else:
            m["mid_block.resnets.0"] = ("middle_block.0", "resnet")
            m["mid_block.resnets.1"] = ("middle_block.1", "resnet")
    n = 0
    for x, block_type in enumerate(up):
        layers = list(reversed(lpb))[x] + 1  # diffusers: reversed_layers_per_block[i] + 1
        for i in range(layers):
            m[f"up_blocks.{x}.resnets.{i}"] = (f"output_blocks.{n}.0", "resnet")
            if has_attn(block_type):
                m[f"up_blocks.{x}.attentions.{i}"] = (f"output_blocks.{n}.1", "attn")
            if i == layers - 1 and x < len(up) - 1:
                slot = 2 if has_attn(block_type) else 1
                m[f"up_blocks.{x}.upsamplers.0.conv"] = (f"output_blocks.{n}.{slot}.conv", "leaf")
            n += 1
    return m


def diffusers_to_sgm(path: str, block_map: Mapping[str, tuple[str, str]]) -> str:
    """Map one diffusers UNet module path to its SGM path; raise for paths SGM has no place for."""
    if path in _TOP_TO_SGM:
        return _TOP_TO_SGM[path]
    parts = path.split(".")
    for k in range(len(parts), 0, -1):
        prefix = ".".join(parts[:k])
        if prefix in block_map:
            sgm, kind = block_map[prefix]
            rest = ".".join(parts[k:])
            if kind == "attn":  # Transformer2DModel internals keep their names (proj_in, transformer_blocks...)
                return f"{sgm}.{rest}" if rest else sgm
            if kind == "resnet" and rest in _RESNET_TO_SGM:
                return f"{sgm}.{_RESNET_TO_SGM[rest]}"
            if kind == "leaf" and not rest:
                return sgm
            break
    raise ValueError(f"unet module {path!r} has no SGM (input/middle/output_blocks) equivalent for this config")


class KohyaNames:
    """The kohya module name of every LoRA'd module of one UNet family's model: ``spec.lora_text_encoders`` give the
    text-encoder prefixes, ``spec.kohya_sgm_unet`` whether the UNet is named in SGM layout (then ``unet_config``, the
    diffusers UNet config, gives its block numbering)."""

    def __init__(self, spec: FamilySpec, unet_config: Any = None):
        if "unet" not in spec.denoisers:
            raise ValueError(f"{spec.name} has no UNet: its LoRA has no kohya SD names")
        self.family = spec.name
        self.sgm = spec.kohya_sgm_unet
        self.te_prefix = te_prefixes(spec.lora_text_encoders)
        self.unet_config = unet_config
        self._block_map: Mapping[str, tuple[str, str]] | None = None

    def __call__(self, component: str, path: str) -> str:
        """Kohya LoRA module name (without ``.lora_down.weight``) for one PEFT module path of one component."""
        if component == "unet":
            if self.sgm:
                if self._block_map is None:
                    self._block_map = sgm_block_map(self.unet_config)
                path = diffusers_to_sgm(path, self._block_map)
            return "lora_unet_" + path.replace(".", "_")
        prefix = self.te_prefix.get(component)
        if prefix is None:
            raise ValueError(f"component {component!r} is not part of a {self.family} model")
        return f"{prefix}_" + te_path(path).replace(".", "_")
