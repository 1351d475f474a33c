"""How ComfyUI would map a Qwen-Image 2.1 LoRA file's keys -- inferred: the ComfyUI code we read (a125cd84) predates
2.1. What is known: ComfyUI's 2.1 checkpoint keeps diffusers' module names except each block's SwiGLU gate and up
projections, fused into ``img_mlp.gate_up`` (diffusers' convert_qwen_image21_transformer_checkpoint_to_diffusers
splits it back), and comfy/lora.py model_lora_keys_unet's generic map (every model) takes ``diffusion_model.<name>``
and ``lora_unet_<name with _>`` for each weight. This module applies that generic map to the native 2.1 keys, so
a test can check which of a file's keys such a loader would land (the attention keys do; separate
img_mlp.proj / gate_layer keys would need a gate_up mapping ComfyUI may or may not have)."""
from __future__ import annotations

from typing import Iterable

import torch

from comfy_dit_rules import _cfg, convert_lora_keys, load_lora, split_target


def native_keys(transformer_config) -> list[str]:
    """``diffusion_model.`` + the 2.1 checkpoint's keys for this config (built on the meta device)."""
    import inspect

    from diffusers import QwenImage21Transformer2DModel

    from lora_trainer.families.qwen_image21.convert import from_diffusers

    allowed = set(inspect.signature(QwenImage21Transformer2DModel.__init__).parameters) - {"self"}
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in _cfg(transformer_config).items() if k in allowed}
    with torch.device("meta"):
        model = QwenImage21Transformer2DModel(**cfg)
    sd = {k: torch.empty(v.shape) for k, v in model.state_dict().items()}
    return ["diffusion_model." + k for k in from_diffusers(sd, cfg)]


def model_lora_keys_unet(transformer_config) -> dict:
    key_map = {}
    for k in native_keys(transformer_config):
        if k.endswith(".weight"):
            key_map["lora_unet_{}".format(k[len("diffusion_model."):-len(".weight")].replace(".", "_"))] = k
            key_map[k[:-len(".weight")]] = k
        else:
            key_map[k] = k
    return key_map


def comfy_load(lora_state_dict_keys: Iterable[str], transformer_config) -> tuple[dict, list[str]]:
    """({comfy target key: [file keys it consumes]}, file keys ComfyUI would log as "lora key not loaded")."""
    keys = list(lora_state_dict_keys)
    converted = convert_lora_keys(keys)
    patches, loaded = load_lora(set(converted.values()), model_lora_keys_unet(transformer_config))
    return patches, sorted(k for k in keys if converted[k] not in loaded)


def patched_modules(lora_state_dict_keys: Iterable[str], transformer_config) -> set[str]:
    patches, _ = comfy_load(lora_state_dict_keys, transformer_config)
    return {split_target(t)[0][len("diffusion_model."):-len(".weight")] for t in patches}
