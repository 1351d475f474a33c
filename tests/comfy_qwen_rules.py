"""Re-implementation of how ComfyUI maps a Qwen-Image LoRA file's keys (comfy/lora.py ``model_lora_keys_unet`` for
``model_base.QwenImage``), so tests can check that an exported file would be fully loaded without installing it.

ComfyUI's Qwen-Image transformer (comfy/ldm/qwen_image/model.py) keeps diffusers' module names, so its state-dict
keys are the installed diffusers QwenImageTransformer2DModel's under ``diffusion_model.`` (built here on the meta
device from the config: tiny models map the way the real one does). Sources (read, not imported):
  ComfyUI Comfy-Org/ComfyUI a125cd84, comfy/lora.py model_lora_keys_unet: the generic map (``diffusion_model.<name>``
  and ``lora_unet_<name with _>`` for every weight) and the QwenImage block (``<name>``, ``transformer.<name>``,
  ``lycoris_<name with _>``); load_lora / LoRAAdapter.load as mirrored in tests/comfy_dit_rules.py.
Forge has no Qwen-Image model: a Qwen-Image LoRA is a ComfyUI (and diffusers) file.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from comfy_dit_rules import _cfg, convert_lora_keys, load_lora, split_target

_KEYS: dict = {}


def comfy_model_keys(transformer_config) -> list[str]:
    """``diffusion_model.`` + the diffusers model's state-dict keys for this config."""
    import inspect

    from diffusers import QwenImageTransformer2DModel

    allowed = set(inspect.signature(QwenImageTransformer2DModel.__init__).parameters) - {"self"}
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in _cfg(transformer_config).items() if k in allowed}
    key = tuple(sorted((k, repr(v)) for k, v in cfg.items()))
    if key not in _KEYS:
        with torch.device("meta"):
            model = QwenImageTransformer2DModel(**cfg)
        _KEYS[key] = ["diffusion_model." + k for k in model.state_dict()]
    return list(_KEYS[key])


def model_lora_keys_unet(transformer_config) -> dict:
    """comfy/lora.py model_lora_keys_unet for a model_base.QwenImage: LoRA key prefix -> comfy state-dict key."""
    key_map = {}
    sdk = comfy_model_keys(transformer_config)
    for k in sdk:  # the generic map, every model
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                key_map["lora_unet_{}".format(key_lora)] = k
                key_map["{}".format(k[:-len(".weight")])] = k
            else:
                key_map["{}".format(k)] = k
    for k in sdk:  # isinstance(model, comfy.model_base.QwenImage)
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_lora = k[len("diffusion_model."):-len(".weight")]
            key_map["{}".format(key_lora)] = k
            key_map["transformer.{}".format(key_lora)] = k
            key_map["lycoris_{}".format(key_lora.replace(".", "_"))] = k
    return key_map


def comfy_load(lora_state_dict_keys: Iterable[str], transformer_config) -> tuple[dict, list[str]]:
    """({comfy target key: [file keys it consumes]}, file keys ComfyUI logs as "lora key not loaded")."""
    keys = list(lora_state_dict_keys)
    converted = convert_lora_keys(keys)
    patches, loaded = load_lora(set(converted.values()), model_lora_keys_unet(transformer_config))
    return patches, sorted(k for k in keys if converted[k] not in loaded)


def patched_modules(lora_state_dict_keys: Iterable[str], transformer_config) -> set[str]:
    """The diffusers module paths ComfyUI's patches land on (target keys present in the model only)."""
    patches, _ = comfy_load(lora_state_dict_keys, transformer_config)
    present = set(comfy_model_keys(transformer_config))
    return {split_target(t)[0][len("diffusion_model."):-len(".weight")] for t in patches
            if split_target(t)[0] in present}


def missing_targets(lora_state_dict_keys: Iterable[str], transformer_config: Mapping) -> list[str]:
    patches, _ = comfy_load(lora_state_dict_keys, transformer_config)
    present = set(comfy_model_keys(transformer_config))
    return sorted(split_target(t)[0] for t in patches if split_target(t)[0] not in present)
