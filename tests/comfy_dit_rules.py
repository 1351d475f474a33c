"""Re-implementation of the key-mapping rules ComfyUI (and, for comparison, Forge) apply to a FLUX.1 or SD3/SD3.5
LoRA file, so tests can check that an exported file would be fully loaded without installing either UI.

Everything is derived from the diffusers configs (``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` config
dicts, transformers ``CLIPTextConfig`` / ``T5Config``), so tiny test models map the way the real ones do.

Sources (read, not imported; keep in step when they change):
  ComfyUI  Comfy-Org/ComfyUI a125cd84 (2025-10-12)
    comfy/utils.py            swap_scale_shift, MMDIT_MAP_BASIC, MMDIT_MAP_BLOCK, mmdit_to_diffusers, flux_to_diffusers
    comfy/model_detection.py  detect_unet_config (mmdit / flux branches), convert_diffusers_mmdit
    comfy/lora.py             LORA_CLIP_MAP, load_lora, model_lora_keys_clip, model_lora_keys_unet
    comfy/lora_convert.py     convert_lora (BFL control / Wan-Fun / USO rewrites)
    comfy/weight_adapter/lora.py  LoRAAdapter.load (tensor-suffix resolution)
    comfy/sd.py               load_lora_for_models (unet map + clip map, then load_lora, then add_patches)
    comfy/model_patcher.py    ModelPatcher.add_patches (a patch whose target key is absent -> "NOT LOADED")
  Forge    lllyasviel/stable-diffusion-webui-forge dfdcbab6 (2025-06-26)
    backend/patcher/lora.py, packages_3rdparty/comfyui_lora_collection/{lora,utils}.py,
    extensions-builtin/sd_forge_lora/networks.py load_lora_for_models

Only the LoRA weight adapter is mirrored (LoHa/LoKr/GLoRA/OFT/BOFT tensors would be reported as not loaded).
"""
from __future__ import annotations

import inspect
from typing import Iterable, Mapping

import torch

FAMILIES = ("flux", "sd3")  # with diffusers-name maps; "flux2" (FLUX.2's BFL names, generic maps only) besides,
# and "chroma": ComfyUI's model_base.Chroma subclasses model_base.Flux, so the Flux maps apply over its pruned keys.

# --------------------------------------------------------------------------- comfy/utils.py


def swap_scale_shift(weight):
    """comfy/utils.py swap_scale_shift: diffusers AdaLayerNormContinuous is (scale, shift), BFL/SAI (shift, scale)."""
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


# comfy/utils.py MMDIT_MAP_BASIC: (comfy name, diffusers name[, function])
MMDIT_MAP_BASIC = {
    ("context_embedder.bias", "context_embedder.bias"),
    ("context_embedder.weight", "context_embedder.weight"),
    ("t_embedder.mlp.0.bias", "time_text_embed.timestep_embedder.linear_1.bias"),
    ("t_embedder.mlp.0.weight", "time_text_embed.timestep_embedder.linear_1.weight"),
    ("t_embedder.mlp.2.bias", "time_text_embed.timestep_embedder.linear_2.bias"),
    ("t_embedder.mlp.2.weight", "time_text_embed.timestep_embedder.linear_2.weight"),
    ("x_embedder.proj.bias", "pos_embed.proj.bias"),
    ("x_embedder.proj.weight", "pos_embed.proj.weight"),
    ("y_embedder.mlp.0.bias", "time_text_embed.text_embedder.linear_1.bias"),
    ("y_embedder.mlp.0.weight", "time_text_embed.text_embedder.linear_1.weight"),
    ("y_embedder.mlp.2.bias", "time_text_embed.text_embedder.linear_2.bias"),
    ("y_embedder.mlp.2.weight", "time_text_embed.text_embedder.linear_2.weight"),
    ("pos_embed", "pos_embed.pos_embed"),
    ("final_layer.adaLN_modulation.1.bias", "norm_out.linear.bias", swap_scale_shift),
    ("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight", swap_scale_shift),
    ("final_layer.linear.bias", "proj_out.bias"),
    ("final_layer.linear.weight", "proj_out.weight"),
}

# comfy/utils.py MMDIT_MAP_BLOCK: (comfy name inside joint_blocks.N, diffusers name inside transformer_blocks.N)
MMDIT_MAP_BLOCK = {
    ("context_block.adaLN_modulation.1.bias", "norm1_context.linear.bias"),
    ("context_block.adaLN_modulation.1.weight", "norm1_context.linear.weight"),
    ("context_block.attn.proj.bias", "attn.to_add_out.bias"),
    ("context_block.attn.proj.weight", "attn.to_add_out.weight"),
    ("context_block.mlp.fc1.bias", "ff_context.net.0.proj.bias"),
    ("context_block.mlp.fc1.weight", "ff_context.net.0.proj.weight"),
    ("context_block.mlp.fc2.bias", "ff_context.net.2.bias"),
    ("context_block.mlp.fc2.weight", "ff_context.net.2.weight"),
    ("context_block.attn.ln_q.weight", "attn.norm_added_q.weight"),
    ("context_block.attn.ln_k.weight", "attn.norm_added_k.weight"),
    ("x_block.adaLN_modulation.1.bias", "norm1.linear.bias"),
    ("x_block.adaLN_modulation.1.weight", "norm1.linear.weight"),
    ("x_block.attn.proj.bias", "attn.to_out.0.bias"),
    ("x_block.attn.proj.weight", "attn.to_out.0.weight"),
    ("x_block.attn.ln_q.weight", "attn.norm_q.weight"),
    ("x_block.attn.ln_k.weight", "attn.norm_k.weight"),
    ("x_block.attn2.proj.bias", "attn2.to_out.0.bias"),
    ("x_block.attn2.proj.weight", "attn2.to_out.0.weight"),
    ("x_block.attn2.ln_q.weight", "attn2.norm_q.weight"),
    ("x_block.attn2.ln_k.weight", "attn2.norm_k.weight"),
    ("x_block.mlp.fc1.bias", "ff.net.0.proj.bias"),
    ("x_block.mlp.fc1.weight", "ff.net.0.proj.weight"),
    ("x_block.mlp.fc2.bias", "ff.net.2.bias"),
    ("x_block.mlp.fc2.weight", "ff.net.2.weight"),
}


def mmdit_to_diffusers(mmdit_config, output_prefix=""):
    """comfy/utils.py mmdit_to_diffusers: diffusers SD3 state-dict key -> comfy key, or (comfy key, (dim, start,
    length)) for q/k/v fused into ``qkv``, or (comfy key, None, function).

    One deviation, so tiny models work: ComfyUI computes the q/k/v offset as ``depth * 64`` (``depth`` =
    hidden // 64 in detect_unet_config, since the SAI MMDiT always has 64-wide heads and ``depth`` heads). We take
    ``hidden_size`` when the config carries it; for every real SD3/SD3.5 checkpoint depth * 64 == hidden_size.
    """
    key_map = {}

    depth = mmdit_config.get("depth", 0)
    num_blocks = mmdit_config.get("num_blocks", depth)
    for i in range(num_blocks):
        block_from = "transformer_blocks.{}".format(i)
        block_to = "{}joint_blocks.{}".format(output_prefix, i)

        offset = mmdit_config.get("hidden_size", depth * 64)  # ComfyUI: offset = depth * 64

        for end in ("weight", "bias"):
            k = "{}.attn.".format(block_from)
            qkv = "{}.x_block.attn.qkv.{}".format(block_to, end)
            key_map["{}to_q.{}".format(k, end)] = (qkv, (0, 0, offset))
            key_map["{}to_k.{}".format(k, end)] = (qkv, (0, offset, offset))
            key_map["{}to_v.{}".format(k, end)] = (qkv, (0, offset * 2, offset))

            qkv = "{}.context_block.attn.qkv.{}".format(block_to, end)
            key_map["{}add_q_proj.{}".format(k, end)] = (qkv, (0, 0, offset))
            key_map["{}add_k_proj.{}".format(k, end)] = (qkv, (0, offset, offset))
            key_map["{}add_v_proj.{}".format(k, end)] = (qkv, (0, offset * 2, offset))

            k = "{}.attn2.".format(block_from)
            qkv = "{}.x_block.attn2.qkv.{}".format(block_to, end)
            key_map["{}to_q.{}".format(k, end)] = (qkv, (0, 0, offset))
            key_map["{}to_k.{}".format(k, end)] = (qkv, (0, offset, offset))
            key_map["{}to_v.{}".format(k, end)] = (qkv, (0, offset * 2, offset))

        for k in MMDIT_MAP_BLOCK:
            key_map["{}.{}".format(block_from, k[1])] = "{}.{}".format(block_to, k[0])

    map_basic = MMDIT_MAP_BASIC.copy()
    # The last block's context modulation (context_pre_only AdaLayerNormContinuous) gets swap_scale_shift. ComfyUI
    # indexes it by depth - 1, which is the last block for real checkpoints (depth == number of blocks).
    map_basic.add(("joint_blocks.{}.context_block.adaLN_modulation.1.bias".format(depth - 1),
                   "transformer_blocks.{}.norm1_context.linear.bias".format(depth - 1), swap_scale_shift))
    map_basic.add(("joint_blocks.{}.context_block.adaLN_modulation.1.weight".format(depth - 1),
                   "transformer_blocks.{}.norm1_context.linear.weight".format(depth - 1), swap_scale_shift))

    for k in map_basic:
        if len(k) > 2:
            key_map[k[1]] = ("{}{}".format(output_prefix, k[0]), None, k[2])
        else:
            key_map[k[1]] = "{}{}".format(output_prefix, k[0])

    return key_map


# comfy/utils.py flux_to_diffusers: per double block (diffusers name -> BFL name)
FLUX_DOUBLE_BLOCK_MAP = {
    "attn.to_out.0.weight": "img_attn.proj.weight",
    "attn.to_out.0.bias": "img_attn.proj.bias",
    "norm1.linear.weight": "img_mod.lin.weight",
    "norm1.linear.bias": "img_mod.lin.bias",
    "norm1_context.linear.weight": "txt_mod.lin.weight",
    "norm1_context.linear.bias": "txt_mod.lin.bias",
    "attn.to_add_out.weight": "txt_attn.proj.weight",
    "attn.to_add_out.bias": "txt_attn.proj.bias",
    "ff.net.0.proj.weight": "img_mlp.0.weight",
    "ff.net.0.proj.bias": "img_mlp.0.bias",
    "ff.net.2.weight": "img_mlp.2.weight",
    "ff.net.2.bias": "img_mlp.2.bias",
    "ff_context.net.0.proj.weight": "txt_mlp.0.weight",
    "ff_context.net.0.proj.bias": "txt_mlp.0.bias",
    "ff_context.net.2.weight": "txt_mlp.2.weight",
    "ff_context.net.2.bias": "txt_mlp.2.bias",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
FLUX_SINGLE_BLOCK_MAP = {
    "norm.linear.weight": "modulation.lin.weight",
    "norm.linear.bias": "modulation.lin.bias",
    "proj_out.weight": "linear2.weight",
    "proj_out.bias": "linear2.bias",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}
FLUX_MAP_BASIC = {
    ("final_layer.linear.bias", "proj_out.bias"),
    ("final_layer.linear.weight", "proj_out.weight"),
    ("img_in.bias", "x_embedder.bias"),
    ("img_in.weight", "x_embedder.weight"),
    ("time_in.in_layer.bias", "time_text_embed.timestep_embedder.linear_1.bias"),
    ("time_in.in_layer.weight", "time_text_embed.timestep_embedder.linear_1.weight"),
    ("time_in.out_layer.bias", "time_text_embed.timestep_embedder.linear_2.bias"),
    ("time_in.out_layer.weight", "time_text_embed.timestep_embedder.linear_2.weight"),
    ("txt_in.bias", "context_embedder.bias"),
    ("txt_in.weight", "context_embedder.weight"),
    ("vector_in.in_layer.bias", "time_text_embed.text_embedder.linear_1.bias"),
    ("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight"),
    ("vector_in.out_layer.bias", "time_text_embed.text_embedder.linear_2.bias"),
    ("vector_in.out_layer.weight", "time_text_embed.text_embedder.linear_2.weight"),
    ("guidance_in.in_layer.bias", "time_text_embed.guidance_embedder.linear_1.bias"),
    ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight"),
    ("guidance_in.out_layer.bias", "time_text_embed.guidance_embedder.linear_2.bias"),
    ("guidance_in.out_layer.weight", "time_text_embed.guidance_embedder.linear_2.weight"),
    ("final_layer.adaLN_modulation.1.bias", "norm_out.linear.bias", swap_scale_shift),
    ("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight", swap_scale_shift),
    ("pos_embed_input.bias", "controlnet_x_embedder.bias"),  # not in Forge's copy
    ("pos_embed_input.weight", "controlnet_x_embedder.weight"),
}


def flux_to_diffusers(mmdit_config, output_prefix="", *, _map_basic=FLUX_MAP_BASIC):
    """comfy/utils.py flux_to_diffusers: diffusers Flux key -> BFL key or (BFL key, (dim, start, length)).

    q/k/v of a double block land in ``img_attn.qkv`` (add_*_proj in ``txt_attn.qkv``); q/k/v and ``proj_mlp`` of a
    single block land in ``linear1`` at offsets 0, h, 2h and 3h (length 4h: ComfyUI hardcodes mlp_ratio 4, as does
    diffusers' FluxSingleTransformerBlock).
    """
    n_double_layers = mmdit_config.get("depth", 0)
    n_single_layers = mmdit_config.get("depth_single_blocks", 0)
    hidden_size = mmdit_config.get("hidden_size", 0)

    key_map = {}
    for index in range(n_double_layers):
        prefix_from = "transformer_blocks.{}".format(index)
        prefix_to = "{}double_blocks.{}".format(output_prefix, index)

        for end in ("weight", "bias"):
            k = "{}.attn.".format(prefix_from)
            qkv = "{}.img_attn.qkv.{}".format(prefix_to, end)
            key_map["{}to_q.{}".format(k, end)] = (qkv, (0, 0, hidden_size))
            key_map["{}to_k.{}".format(k, end)] = (qkv, (0, hidden_size, hidden_size))
            key_map["{}to_v.{}".format(k, end)] = (qkv, (0, hidden_size * 2, hidden_size))

            k = "{}.attn.".format(prefix_from)
            qkv = "{}.txt_attn.qkv.{}".format(prefix_to, end)
            key_map["{}add_q_proj.{}".format(k, end)] = (qkv, (0, 0, hidden_size))
            key_map["{}add_k_proj.{}".format(k, end)] = (qkv, (0, hidden_size, hidden_size))
            key_map["{}add_v_proj.{}".format(k, end)] = (qkv, (0, hidden_size * 2, hidden_size))

        for k in FLUX_DOUBLE_BLOCK_MAP:
            key_map["{}.{}".format(prefix_from, k)] = "{}.{}".format(prefix_to, FLUX_DOUBLE_BLOCK_MAP[k])

    for index in range(n_single_layers):
        prefix_from = "single_transformer_blocks.{}".format(index)
        prefix_to = "{}single_blocks.{}".format(output_prefix, index)

        for end in ("weight", "bias"):
            k = "{}.attn.".format(prefix_from)
            qkv = "{}.linear1.{}".format(prefix_to, end)
            key_map["{}to_q.{}".format(k, end)] = (qkv, (0, 0, hidden_size))
            key_map["{}to_k.{}".format(k, end)] = (qkv, (0, hidden_size, hidden_size))
            key_map["{}to_v.{}".format(k, end)] = (qkv, (0, hidden_size * 2, hidden_size))
            key_map["{}.proj_mlp.{}".format(prefix_from, end)] = (qkv, (0, hidden_size * 3, hidden_size * 4))

        for k in FLUX_SINGLE_BLOCK_MAP:
            key_map["{}.{}".format(prefix_from, k)] = "{}.{}".format(prefix_to, FLUX_SINGLE_BLOCK_MAP[k])

    for k in _map_basic:
        if len(k) > 2:
            key_map[k[1]] = ("{}{}".format(output_prefix, k[0]), None, k[2])
        else:
            key_map[k[1]] = "{}{}".format(output_prefix, k[0])

    return key_map


def split_target(target):
    """A key-map value -> (comfy state-dict key, offset or None, function or None), as ModelPatcher.add_patches
    unpacks it."""
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1], (target[2] if len(target) > 2 else None)


# --------------------------------------------------------------------------- configs and model keys


def _cfg(c) -> dict:
    if c is None:
        return {}
    if isinstance(c, Mapping):
        return dict(c)
    if hasattr(c, "to_dict"):
        return c.to_dict()
    return dict(vars(c))


def inner_dim(transformer_config) -> int:
    cfg = _cfg(transformer_config)
    return int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])


def comfy_unet_config(family, transformer_config, *, literal=False) -> dict:
    """The parts of ComfyUI's ``model_config.unet_config`` the LoRA key maps read, for a diffusers config.

    ``literal=True`` reproduces comfy/model_detection.py detect_unet_config exactly: Flux ``hidden_size`` is
    hardcoded 3072, SD3 ``depth`` = hidden // 64 and ``num_blocks`` is absent (so = depth). Those equal the derived
    values for every real FLUX.1 / SD3 / SD3.5 checkpoint, but not for tiny models (a 32-wide SD3 gives depth 0, i.e.
    no ``transformer.`` block keys at all), so the default derives them from the config.
    """
    cfg = _cfg(transformer_config)
    h = inner_dim(cfg)
    if family in ("flux", "chroma"):
        return {"depth": cfg["num_layers"], "depth_single_blocks": cfg["num_single_layers"],
                "hidden_size": 3072 if literal else h}
    if family == "flux2":
        return {}  # only the generic maps (below): no diffusers-name map is known for FLUX.2
    if family == "sd3":
        if literal:
            return {"depth": h // 64}
        return {"depth": cfg["num_layers"], "num_blocks": cfg["num_layers"], "hidden_size": h}
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}, flux2 or chroma")


def _diffusers_cls(family):
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel
    return {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel, "chroma": ChromaTransformer2DModel}[family]


_KEYS_CACHE: dict = {}


def diffusers_state_dict_keys(family, transformer_config) -> list[str]:
    """The installed diffusers model's state-dict keys for this config (built on the meta device: no memory, any
    size)."""
    cfg = _cfg(transformer_config)
    cls = _diffusers_cls(family)
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in allowed}
    cache_key = (family, tuple(sorted((k, repr(v)) for k, v in cfg.items())))
    if cache_key not in _KEYS_CACHE:
        with torch.device("meta"):
            model = cls(**cfg)
        _KEYS_CACHE[cache_key] = list(model.state_dict().keys())
    return list(_KEYS_CACHE[cache_key])


def _convert_diffusers_map(family, diffusers_keys):
    """The sd_map comfy/model_detection.py convert_diffusers_mmdit builds for a diffusers Flux / SD3 checkpoint."""
    keys = set(diffusers_keys)

    def count_blocks(prefix):  # comfy/model_detection.py count_blocks
        n = 0
        while any(k.startswith(prefix.format(n)) for k in keys):
            n += 1
        return n

    if family in ("flux", "chroma"):  # 'x_embedder.weight' in state_dict
        return flux_to_diffusers({"depth": count_blocks("transformer_blocks.{}."),
                                  "depth_single_blocks": count_blocks("single_transformer_blocks.{}."),
                                  "hidden_size": 1})  # hidden_size only sets offsets; key names do not depend on it
    n = count_blocks("transformer_blocks.{}.")
    return mmdit_to_diffusers({"depth": n, "num_blocks": n, "hidden_size": 1})


def flux2_bfl_keys(transformer_config) -> list[str]:
    """BFL's FLUX.2 transformer weight names (black-forest-labs/flux2 src/flux2/model.py; what ComfyUI's FLUX.2 model,
    newer than the a125cd84 snapshot, keeps under ``diffusion_model.``), written out from that layout rather than
    derived from the trainer's converters, so a wrong name on either side shows up."""
    cfg = _cfg(transformer_config)
    keys = ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "time_in.out_layer.weight",
            "double_stream_modulation_img.lin.weight", "double_stream_modulation_txt.lin.weight",
            "single_stream_modulation.lin.weight", "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight"]
    if cfg.get("guidance_embeds"):
        keys += ["guidance_in.in_layer.weight", "guidance_in.out_layer.weight"]
    for i in range(int(cfg["num_layers"])):
        for stream in ("img", "txt"):
            keys += [f"double_blocks.{i}.{stream}_attn.qkv.weight", f"double_blocks.{i}.{stream}_attn.proj.weight",
                     f"double_blocks.{i}.{stream}_attn.norm.query_norm.scale",
                     f"double_blocks.{i}.{stream}_attn.norm.key_norm.scale",
                     f"double_blocks.{i}.{stream}_mlp.0.weight", f"double_blocks.{i}.{stream}_mlp.2.weight"]
    for i in range(int(cfg["num_single_layers"])):
        keys += [f"single_blocks.{i}.linear1.weight", f"single_blocks.{i}.linear2.weight",
                 f"single_blocks.{i}.norm.query_norm.scale", f"single_blocks.{i}.norm.key_norm.scale"]
    return keys


def comfy_model_keys(family, transformer_config) -> list[str]:
    """ComfyUI's diffusion-model state-dict keys (``diffusion_model.`` + BFL / SAI MMDiT names) for this config: the
    targets convert_diffusers_mmdit gives the diffusers checkpoint's keys (what ComfyUI itself does when it loads a
    diffusers-format Flux/SD3 transformer); FLUX.2's BFL names (flux2_bfl_keys)."""
    if family == "flux2":
        return ["diffusion_model." + k for k in flux2_bfl_keys(transformer_config)]
    sd_map = _convert_diffusers_map(family, diffusers_state_dict_keys(family, transformer_config))
    out = []
    for k in diffusers_state_dict_keys(family, transformer_config):
        if k in sd_map:
            key = split_target(sd_map[k])[0]
            if key not in out:
                out.append(key)
    return ["diffusion_model." + k for k in out]


def unmapped_diffusers_keys(family, transformer_config) -> list[str]:
    """diffusers state-dict keys convert_diffusers_mmdit has no rule for (should be empty)."""
    keys = diffusers_state_dict_keys(family, transformer_config)
    sd_map = _convert_diffusers_map(family, keys)
    return [k for k in keys if k not in sd_map]


# --------------------------------------------------------------------------- comfy/lora.py: unet


def model_lora_keys_unet(family, transformer_config, key_map=None, *, literal=False) -> dict:
    """comfy/lora.py model_lora_keys_unet for a Flux (model_base.Flux) or SD3 (model_base.SD3) model: LoRA key
    prefix -> target (comfy key, or (key, offset) / (key, None, function); see split_target)."""
    key_map = {} if key_map is None else key_map
    sdk = comfy_model_keys(family, transformer_config)
    unet_config = comfy_unet_config(family, transformer_config, literal=literal)

    for k in sdk:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
                key_map["lora_unet_{}".format(key_lora)] = k
                key_map["{}".format(k[:-len(".weight")])] = k  # generic lora format without any weird key names
            else:
                key_map["{}".format(k)] = k  # generic lora format for not .weight without any weird key names

    # comfy.utils.unet_to_diffusers(unet_config) returns {} when "num_res_blocks" is absent (every DiT).

    if family == "sd3":  # isinstance(model, comfy.model_base.SD3): Diffusers lora SD3
        diffusers_keys = mmdit_to_diffusers(unet_config, output_prefix="diffusion_model.")
        for k in diffusers_keys:
            if k.endswith(".weight"):
                to = diffusers_keys[k]
                key_map["transformer.{}".format(k[:-len(".weight")])] = to  # regular diffusers sd3 lora format
                key_map["base_model.model.{}".format(k[:-len(".weight")])] = to  # flash-sd3 lora and others?
                key_map["lora_transformer_{}".format(k[:-len(".weight")].replace(".", "_"))] = to  # OneTrainer
                key_map["lycoris_{}".format(k[:-len(".weight")].replace(".", "_"))] = to  # simpletuner lycoris

    if family in ("flux", "chroma"):  # isinstance(model, comfy.model_base.Flux) (Chroma's too): Diffusers lora Flux
        diffusers_keys = flux_to_diffusers(unet_config, output_prefix="diffusion_model.")
        for k in diffusers_keys:
            if k.endswith(".weight"):
                to = diffusers_keys[k]
                key_map["transformer.{}".format(k[:-len(".weight")])] = to  # simpletrainer / regular diffusers
                key_map["lycoris_{}".format(k[:-len(".weight")].replace(".", "_"))] = to  # simpletrainer lycoris
                key_map["lora_transformer_{}".format(k[:-len(".weight")].replace(".", "_"))] = to  # onetrainer
        for k in sdk:
            hidden_size = unet_config.get("hidden_size", 0)
            if k.endswith(".weight") and ".linear1." in k:
                key_map["{}".format(k.replace(".linear1.weight", ".linear1_qkv"))] = (k, (0, 0, hidden_size * 3))

    return key_map


# --------------------------------------------------------------------------- comfy/lora.py: clip

# comfy/lora.py LORA_CLIP_MAP
LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}

# Which text encoders ComfyUI's CLIP object holds for each family (comfy/text_encoders/flux.py FluxClipModel:
# clip_l + t5xxl; comfy/text_encoders/sd3_clip.py SD3ClipModel: clip_l, clip_g, t5xxl, each optional).
CLIP_SLOTS = {"flux": ("clip_l", "t5xxl"), "sd3": ("clip_l", "clip_g", "t5xxl")}


def comfy_clip_keys(clip_configs) -> list[str]:
    """ComfyUI CLIP-object state-dict keys (``clip_l.transformer.text_model...``) for
    ``{"clip_l": CLIPTextConfig, "clip_g": CLIPTextConfig, "t5xxl": T5Config}`` (configs or dicts; any subset).
    Module names from comfy/clip_model.py (CLIPTextModel always has ``text_projection``) and
    comfy/text_encoders/t5.py."""
    keys = []
    for slot, c in (clip_configs or {}).items():
        cfg = _cfg(c)
        if slot in ("clip_l", "clip_g", "clip_h"):
            p = f"{slot}.transformer.text_model."
            keys += [p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight"]
            for i in range(int(cfg["num_hidden_layers"])):
                for m in ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                          "self_attn.out_proj", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                    keys += [f"{p}encoder.layers.{i}.{m}.weight", f"{p}encoder.layers.{i}.{m}.bias"]
            keys += [p + "final_layer_norm.weight", p + "final_layer_norm.bias",
                     f"{slot}.transformer.text_projection.weight", f"{slot}.logit_scale"]
        elif slot == "t5xxl":
            p = "t5xxl.transformer."
            gated = bool(cfg.get("is_gated_act", str(cfg.get("feed_forward_proj", "gated-gelu")).startswith("gated")))
            ff = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
            keys.append(p + "shared.weight")
            for i in range(int(cfg["num_layers"])):
                b = f"{p}encoder.block.{i}.layer."
                keys += [f"{b}0.SelfAttention.{m}.weight" for m in ("q", "k", "v", "o")]
                if i == 0:
                    keys.append(f"{b}0.SelfAttention.relative_attention_bias.weight")
                keys += [f"{b}0.layer_norm.weight"] + [f"{b}1.DenseReluDense.{m}.weight" for m in ff]
                keys.append(f"{b}1.layer_norm.weight")
            keys.append(p + "encoder.final_layer_norm.weight")
        else:
            raise ValueError(f"unknown text-encoder slot {slot!r}")
    return keys


def model_lora_keys_clip(clip_configs, key_map=None) -> dict:
    """comfy/lora.py model_lora_keys_clip for the CLIP object of comfy_clip_keys(clip_configs)."""
    key_map = {} if key_map is None else key_map
    sdk = comfy_clip_keys(clip_configs)
    for k in sdk:
        if k.endswith(".weight"):
            key_map["text_encoders.{}".format(k[:-len(".weight")])] = k  # generic lora format

    text_model_lora_key = "lora_te_text_model_encoder_layers_{}_{}"
    clip_l_present = False
    clip_g_present = False
    for b in range(32):  # TODO: clean up (ComfyUI's own comment)
        for c in LORA_CLIP_MAP:
            k = "clip_h.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)
            if k in sdk:
                key_map[text_model_lora_key.format(b, LORA_CLIP_MAP[c])] = k
                key_map["lora_te1_text_model_encoder_layers_{}_{}".format(b, LORA_CLIP_MAP[c])] = k
                key_map["text_encoder.text_model.encoder.layers.{}.{}".format(b, c)] = k  # diffusers lora

            k = "clip_l.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)
            if k in sdk:
                key_map[text_model_lora_key.format(b, LORA_CLIP_MAP[c])] = k
                key_map["lora_te1_text_model_encoder_layers_{}_{}".format(b, LORA_CLIP_MAP[c])] = k  # SDXL base
                clip_l_present = True
                key_map["text_encoder.text_model.encoder.layers.{}.{}".format(b, c)] = k  # diffusers lora

            k = "clip_g.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)
            if k in sdk:
                clip_g_present = True
                if clip_l_present:
                    key_map["lora_te2_text_model_encoder_layers_{}_{}".format(b, LORA_CLIP_MAP[c])] = k  # SDXL base
                    key_map["text_encoder_2.text_model.encoder.layers.{}.{}".format(b, c)] = k  # diffusers lora
                else:
                    key_map["lora_te_text_model_encoder_layers_{}_{}".format(b, LORA_CLIP_MAP[c])] = k
                    key_map["text_encoder.text_model.encoder.layers.{}.{}".format(b, c)] = k  # diffusers lora
                    key_map["lora_prior_te_text_model_encoder_layers_{}_{}".format(b, LORA_CLIP_MAP[c])] = k

    for k in sdk:
        if k.endswith(".weight"):
            if k.startswith("t5xxl.transformer."):  # OneTrainer SD3 and Flux lora
                l_key = k[len("t5xxl.transformer."):-len(".weight")]
                t5_index = 1
                if clip_g_present:
                    t5_index += 1
                if clip_l_present:
                    t5_index += 1
                    if t5_index == 2:
                        key_map["lora_te{}_{}".format(t5_index, l_key.replace(".", "_"))] = k  # OneTrainer Flux
                        t5_index += 1
                key_map["lora_te{}_{}".format(t5_index, l_key.replace(".", "_"))] = k

    k = "clip_g.transformer.text_projection.weight"
    if k in sdk:
        key_map["lora_prior_te_text_projection"] = k  # cascade lora?
        key_map["lora_te2_text_projection"] = k  # OneTrainer SD3 lora

    k = "clip_l.transformer.text_projection.weight"
    if k in sdk:
        key_map["lora_te1_text_projection"] = k  # OneTrainer SD3 lora, not necessary but omits warning

    return key_map


def lora_key_map(family, transformer_config, clip_configs=None, *, literal=False) -> dict:
    """comfy/sd.py load_lora_for_models: the unet map, then (LoraLoader with a CLIP; not LoraLoaderModelOnly) the
    clip map added to the same dict."""
    key_map = model_lora_keys_unet(family, transformer_config, {}, literal=literal)
    if clip_configs:
        key_map = model_lora_keys_clip(clip_configs, key_map)
    return key_map


# --------------------------------------------------------------------------- comfy/lora_convert.py + load_lora


def convert_lora_keys(keys: Iterable[str]) -> dict[str, str]:
    """comfy/lora_convert.py convert_lora on key names: {original key: key as load_lora sees it}."""
    keys = list(keys)
    ks = set(keys)
    if "img_in.lora_A.weight" in ks and "single_blocks.0.norm.key_norm.scale" in ks:  # convert_lora_bfl_control
        out = {k: "diffusion_model.{}".format(k.replace(".lora_B.bias", ".diff_b")
                                              .replace("_norm.scale", "_norm.scale.set_weight")) for k in keys}
        out[None] = "diffusion_model.img_in.reshape_weight"  # added tensor (not a file key)
        return out
    if "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in ks:  # convert_lora_wan_fun
        return {k: ("lora_unet_" + k[len("lora_unet__"):] if k.startswith("lora_unet__") else k) for k in keys}
    if ("single_blocks.37.processor.qkv_lora.up.weight" in ks
            and "double_blocks.18.processor.qkv_lora2.up.weight" in ks):  # convert_uso_lora
        return {k: "diffusion_model.{}".format(
            k.replace(".down.weight", ".lora_down.weight").replace(".up.weight", ".lora_up.weight")
            .replace(".qkv_lora2.", ".txt_attn.qkv.").replace(".qkv_lora1.", ".img_attn.qkv.")
            .replace(".proj_lora1.", ".img_attn.proj.").replace(".proj_lora2.", ".txt_attn.proj.")
            .replace(".qkv_lora.", ".linear1_qkv.").replace(".proj_lora.", ".linear2.")
            .replace(".processor.", ".")) for k in keys}
    return {k: k for k in keys}


# comfy/weight_adapter/lora.py LoRAAdapter.load: (up name, down name, mid name or None), first match wins
LORA_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),  # regular_lora
    ("_lora.up.weight", "_lora.down.weight", None),  # diffusers_lora
    (".lora_B.weight", ".lora_A.weight", None),  # diffusers2_lora
    (".lora.up.weight", ".lora.down.weight", None),  # diffusers3_lora
    (".lora_B", ".lora_A", None),  # mochi_lora
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),  # transformers_lora
    (".lora_B.default.weight", ".lora_A.default.weight", None),  # qwen_default_lora
)


def lora_adapter_load(x, lora_keys, suffixes=LORA_SUFFIXES):
    """comfy/weight_adapter/lora.py LoRAAdapter.load, keys only: the tensors it consumes for prefix x (empty when it
    returns None). An up tensor without its down raises KeyError, as ``lora[B_name]`` does in ComfyUI (the whole
    LoraLoader node fails)."""
    for up, down, mid in suffixes:
        if x + up in lora_keys:
            if x + down not in lora_keys:
                raise KeyError(x + down)
            used = [x + up, x + down]
            if mid is not None and x + mid in lora_keys:
                used.append(x + mid)
            if x + ".reshape_weight" in lora_keys:
                used.append(x + ".reshape_weight")
            return used
    return []


def load_lora(lora_keys, to_load, *, adapter_load=lora_adapter_load):
    """comfy/lora.py load_lora on key names: ({target: [consumed keys]}, loaded_keys)."""
    lora_keys = set(lora_keys)
    patches, loaded_keys = {}, set()
    for x in to_load:
        used = []
        if "{}.alpha".format(x) in lora_keys:
            loaded_keys.add("{}.alpha".format(x))
        if "{}.dora_scale".format(x) in lora_keys:
            loaded_keys.add("{}.dora_scale".format(x))
        adapter_keys = adapter_load(x, lora_keys)
        if adapter_keys:
            used += adapter_keys
            patches[to_load[x]] = used
        for suffix in (".w_norm", ".diff", ".set_weight"):
            if x + suffix in lora_keys:
                used.append(x + suffix)
                patches[to_load[x]] = used
        if x + ".w_norm" in lora_keys and x + ".b_norm" in lora_keys:
            used.append(x + ".b_norm")
        if x + ".diff_b" in lora_keys:
            used.append(x + ".diff_b")
            patches[_bias_target(to_load[x])] = [x + ".diff_b"]
        loaded_keys.update(used)
    return patches, loaded_keys


def _bias_target(target):
    key = split_target(target)[0]
    return "{}.bias".format(key[:-len(".weight")])


def _comfy_load(lora_state_dict_keys, family, transformer_config, clip_configs, literal):
    keys = list(lora_state_dict_keys)
    converted = convert_lora_keys(keys)
    seen = {v for v in converted.values()}
    key_map = lora_key_map(family, transformer_config, clip_configs, literal=literal)
    patches, loaded = load_lora(seen, key_map)
    back = {v: k for k, v in converted.items() if k is not None}
    return key_map, patches, {back[k] for k in loaded if k in back}, keys


def unloaded_keys(lora_state_dict_keys, family, transformer_config, clip_configs=None, *, literal=False) -> list[str]:
    """The file keys ComfyUI logs as "lora key not loaded: ..." (comfy/lora.py load_lora) when the LoRA is applied
    with LoraLoader (``clip_configs`` = the CLIP object's encoders, e.g. {"clip_l": cfg, "t5xxl": cfg}) or
    LoraLoaderModelOnly (``clip_configs=None``: text-encoder keys are then not loaded)."""
    _, _, loaded, keys = _comfy_load(lora_state_dict_keys, family, transformer_config, clip_configs, literal)
    return sorted(k for k in keys if k not in loaded)


def missing_targets(lora_state_dict_keys, family, transformer_config, clip_configs=None, *, literal=False) -> list:
    """Patches whose target key is not in the model (consumed, but comfy/sd.py logs "NOT LOADED ..." after
    ModelPatcher.add_patches skips them), e.g. a ``transformer.`` key for a block the model does not have."""
    _, patches, _, _ = _comfy_load(lora_state_dict_keys, family, transformer_config, clip_configs, literal)
    present = set(comfy_model_keys(family, transformer_config)) | set(comfy_clip_keys(clip_configs))
    return sorted((t for t in patches if split_target(t)[0] not in present), key=str)


def comfy_patches(lora_state_dict_keys, family, transformer_config, clip_configs=None, *, literal=False) -> dict:
    """{LoRA key prefix: target} for every prefix ComfyUI turns into a patch (target as in model_lora_keys_unet)."""
    key_map, patches, _, _ = _comfy_load(lora_state_dict_keys, family, transformer_config, clip_configs, literal)
    keys = set(lora_state_dict_keys)
    return {x: t for x, t in key_map.items() if t in patches and lora_adapter_load(x, keys)}


# --------------------------------------------------------------------------- Forge (for comparison)

# packages_3rdparty/comfyui_lora_collection/lora.py load_lora: no mochi (".lora_B") or qwen (".lora_B.default")
FORGE_LORA_SUFFIXES = tuple(s for s in LORA_SUFFIXES if s[0] not in (".lora_B", ".lora_B.default.weight"))
FORGE_UNMATCHED_LIMIT = 12  # networks.py: more unmatched keys than this -> "LoRA version mismatch", nothing applied


def forge_lora_key_maps(family, transformer_config, clip_configs=None, *, literal=False) -> tuple[dict, dict]:
    """(unet map, clip map) of Forge's backend/patcher/lora.py model_lora_keys_unet / model_lora_keys_clip, which
    call packages_3rdparty/comfyui_lora_collection/lora.py (an older copy of ComfyUI's):
    - unet: the generic ``diffusion_model.<name>`` / ``lora_unet_<name>`` maps; for Flux (``'flux' in
      model.config.huggingface_repo``: FLUX.1-dev/-schnell) flux_to_diffusers ``transformer.`` / ``lycoris_`` /
      ``lora_transformer_`` (hidden_size from huggingface_guess, 3072); the SD3 ``transformer.`` block is commented
      out, and there is no ``linear1_qkv`` map. Forge's Flux and MMDiTX modules use the BFL / SAI names ComfyUI uses.
    - clip: as ComfyUI's minus the ``text_encoders.`` generic map; T5 keys as ``lora_te1_/te2_/te3_``;
      ``text_encoder.text_projection`` maps to clip_g."""
    sdk = comfy_model_keys(family, transformer_config)
    unet = {}
    for k in sdk:
        if k.endswith(".weight"):
            unet["lora_unet_{}".format(k[len("diffusion_model."):-len(".weight")].replace(".", "_"))] = k
            unet[k[:-len(".weight")]] = k
        else:
            unet[k] = k
    if family == "flux":
        cfg = comfy_unet_config(family, transformer_config, literal=literal)
        basic = {m for m in FLUX_MAP_BASIC if not m[0].startswith("pos_embed_input")}
        diffusers_keys = flux_to_diffusers(cfg, output_prefix="diffusion_model.", _map_basic=basic)
        for k, to in diffusers_keys.items():
            if k.endswith(".weight"):
                unet["transformer.{}".format(k[:-len(".weight")])] = to
                unet["lycoris_{}".format(k[:-len(".weight")].replace(".", "_"))] = to
                unet["lora_transformer_{}".format(k[:-len(".weight")].replace(".", "_"))] = to
    clip = {}
    if clip_configs:
        clip = {k: v for k, v in model_lora_keys_clip(clip_configs, {}).items()
                if not k.startswith("text_encoders.") and not (k.startswith("lora_te") and v.startswith("t5xxl."))
                and k != "lora_prior_te_text_projection"}
        for k in comfy_clip_keys(clip_configs):
            if k.endswith(".weight") and k.startswith("t5xxl.transformer."):
                for prefix in ("te1", "te2", "te3"):
                    name = k[len("t5xxl.transformer."):-len(".weight")].replace(".", "_")
                    clip["lora_{}_{}".format(prefix, name)] = k
        if "clip_g.transformer.text_projection.weight" in comfy_clip_keys(clip_configs):
            clip["text_encoder.text_projection"] = "clip_g.transformer.text_projection.weight"
    return unet, clip


def forge_unmatched_keys(lora_state_dict_keys, family, transformer_config, clip_configs=None, *,
                         literal=False) -> list[str]:
    """extensions-builtin/sd_forge_lora/networks.py load_lora_for_models: load_lora with the unet map, then the
    remaining keys with the clip map; what is left is printed as unmatched (and if there are more than
    FORGE_UNMATCHED_LIMIT, the whole LoRA is skipped)."""
    unet, clip = forge_lora_key_maps(family, transformer_config, clip_configs, literal=literal)
    remaining = set(lora_state_dict_keys)
    for key_map in (unet, clip):
        _, loaded = load_lora(remaining, key_map,
                              adapter_load=lambda x, ks: lora_adapter_load(x, ks, FORGE_LORA_SUFFIXES))
        remaining -= loaded
    return sorted(remaining)
