"""Re-implementations of how ComfyUI and A1111 find (and, for DoRA, apply) the modules of a kohya LoRA file, so
tests can check that every key of our exports lands on the module it was trained on without installing either UI.

The sources are named above each block; keep them in step when those projects change their rules.
"""
from __future__ import annotations

import re

import torch

# Re-implemented from Comfy-Org/ComfyUI comfy/utils.py (UNET_MAP_*, unet_to_diffusers) and comfy/lora.py
# (LORA_CLIP_MAP, model_lora_keys_unet, model_lora_keys_clip, load_lora + weight_adapter/lora.py LoRAAdapter.load).
COMFY_ATTN = ["proj_in", "proj_out", "norm"]
COMFY_TBLOCK = ["norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
COMFY_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
COMFY_BASIC = [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2"),
               ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
               ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2")]
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def comfy_unet_config(cfg):
    """The ComfyUI unet_config (as model_detection derives it from a checkpoint) for a diffusers UNet config."""
    n, lpb = len(cfg["down_block_types"]), cfg["layers_per_block"]
    tl = cfg["transformer_layers_per_block"]
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    attn = lambda t: "CrossAttn" in t  # noqa: E731
    return {"num_res_blocks": [lpb] * n, "channel_mult": [1] * n,
            "transformer_depth": [d for x in range(n) for d in [tl[x] if attn(cfg["down_block_types"][x]) else 0] * lpb],
            "transformer_depth_output": [d for x in range(n) for d in
                                         [tl[x] if attn(cfg["up_block_types"][n - 1 - x]) else 0] * (lpb + 1)],
            "transformer_depth_middle": tl[-1]}


def unet_to_diffusers(uc):
    """comfy/utils.py unet_to_diffusers, module level (the original maps .weight/.bias keys): diffusers -> SGM."""
    num_res, depth, depth_out = uc["num_res_blocks"], list(uc["transformer_depth"]), list(uc["transformer_depth_output"])
    nb, m = len(uc["channel_mult"]), {}
    for x in range(nb):
        n = 1 + (num_res[x] + 1) * x
        for i in range(num_res[x]):
            for b, d in COMFY_RESNET.items():
                m[f"down_blocks.{x}.resnets.{i}.{d}"] = f"input_blocks.{n}.0.{b}"
            nt = depth.pop(0)
            if nt > 0:
                for b in COMFY_ATTN:
                    m[f"down_blocks.{x}.attentions.{i}.{b}"] = f"input_blocks.{n}.1.{b}"
                for t in range(nt):
                    for b in COMFY_TBLOCK:
                        m[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
            n += 1
        m[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    for b in COMFY_ATTN:
        m[f"mid_block.attentions.0.{b}"] = f"middle_block.1.{b}"
    for t in range(uc["transformer_depth_middle"]):
        for b in COMFY_TBLOCK:
            m[f"mid_block.attentions.0.transformer_blocks.{t}.{b}"] = f"middle_block.1.transformer_blocks.{t}.{b}"
    for i, n in enumerate([0, 2]):
        for b, d in COMFY_RESNET.items():
            m[f"mid_block.resnets.{i}.{d}"] = f"middle_block.{n}.{b}"
    num_res = list(reversed(num_res))
    for x in range(nb):
        n, ln = (num_res[x] + 1) * x, num_res[x] + 1
        for i in range(ln):
            c = 1
            for b, d in COMFY_RESNET.items():
                m[f"up_blocks.{x}.resnets.{i}.{d}"] = f"output_blocks.{n}.0.{b}"
            nt = depth_out.pop()
            if nt > 0:
                c += 1
                for b in COMFY_ATTN:
                    m[f"up_blocks.{x}.attentions.{i}.{b}"] = f"output_blocks.{n}.1.{b}"
                for t in range(nt):
                    for b in COMFY_TBLOCK:
                        m[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}"] = \
                            f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
            if i == ln - 1:
                m[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    for sgm, diff in COMFY_BASIC:
        m[diff] = sgm
    return m


def comfy_maps(unet):
    """(ComfyUI lora key -> SGM module, SGM module -> diffusers module) for this UNet, after checking the
    re-implemented map covers every weight-bearing Linear/Conv2d of the real model exactly once."""
    d2s = unet_to_diffusers(comfy_unet_config(dict(unet.config)))
    real = {n.removesuffix(".base_layer") for n, mod in unet.named_modules()  # PEFT keeps the original as base_layer
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in n}
    assert real <= set(d2s), sorted(real - set(d2s))[:5]
    d2s = {d: s for d, s in d2s.items() if d in real}
    s2d = {s: d for d, s in d2s.items()}
    assert len(s2d) == len(d2s)
    key_map = {"lora_unet_" + s.replace(".", "_"): s for s in d2s.values()}  # SGM checkpoint keys
    key_map.update({"lora_unet_" + d.replace(".", "_"): s for d, s in d2s.items()})  # diffusers-named kohya keys
    return key_map, s2d


def comfy_not_loaded(sd, key_map):
    """comfy/lora.py load_lora: for each mapped name it takes .alpha and .dora_scale if present, then
    LoRAAdapter.load consumes .lora_up/.lora_down."""
    loaded = set()
    for x in key_map:
        loaded |= {k for k in (f"{x}.alpha", f"{x}.dora_scale") if k in sd}
        if f"{x}.lora_up.weight" in sd:
            loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"}
    return sorted(set(sd) - loaded)


def comfy_lora_weight(weight, up, down, alpha, dora_scale=None, *, normalise_adapted=False):
    """The patched weight ComfyUI computes for one kohya module at strength 1.0 (weight_adapter/lora.py
    LoRAAdapter.calculate_weight + base.py weight_decompose), in float32.

    Output-axis DoRA (dora_scale.shape[0] == out) in ComfyUI and Forge today divides by the norm of the BASE
    weight W; Comfy-Org/ComfyUI PR #15458 (open) changes it to the adapted W + dW, as LyCORIS and PEFT do.
    ``normalise_adapted`` selects the PR's behaviour. The input-axis branch always uses W + dW.
    """
    weight = weight.float()
    scale = alpha / down.shape[0]
    diff = (up.float().flatten(1) @ down.float().flatten(1)).reshape(weight.shape) * scale
    if dora_scale is None:
        return weight + diff
    calc = weight + diff
    if dora_scale.shape[0] == calc.shape[0]:
        ref = calc if normalise_adapted else weight
        norm = ref.reshape(ref.shape[0], -1).norm(dim=1, keepdim=True).reshape(ref.shape[0], *[1] * (ref.dim() - 1))
    else:
        norm = (calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    factor = dora_scale.float() / norm
    try:  # ComfyUI multiplies in place: any other broadcast raises, its try/except logs "ERROR lora ..." and
        # leaves the layer unpatched
        fits = torch.broadcast_shapes(calc.shape, factor.shape) == calc.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"dora_scale {tuple(dora_scale.shape)} does not broadcast onto the weight {tuple(calc.shape)}")
    return calc * factor


def assert_landed_on_trained(sd, name, state, path):
    """The kohya module `name` was applied to `path`: its tensors must be that module's trained lora_A/lora_B
    (catches permuted modules of equal shape, swapped up/down, swapped text encoders)."""
    path = path if f"{path}.lora_A.weight" in state else "text_model." + path
    for kohya, peft in (("lora_down", "lora_A"), ("lora_up", "lora_B")):
        assert torch.equal(sd[f"{name}.{kohya}.weight"].float(), state[f"{path}.{peft}.weight"].half().float()), name


def check_comfy_unet(unet, sd, peft_state):
    key_map, s2d = comfy_maps(unet)
    unet_sd = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    assert comfy_not_loaded(unet_sd, key_map) == []
    trained_modules = {k.rsplit(".lora_A", 1)[0] for k in peft_state if ".lora_A." in k}
    landed = set()
    for name in {k.split(".", 1)[0] for k in unet_sd}:
        target = s2d[key_map[name]]  # the diffusers module ComfyUI patches ("diffusion_model.<sgm>.weight")
        assert_landed_on_trained(unet_sd, name, peft_state, target)
        weight = unet.get_submodule(target).base_layer.weight
        diff = unet_sd[f"{name}.lora_up.weight"].flatten(1) @ unet_sd[f"{name}.lora_down.weight"].flatten(1)
        assert diff.numel() == weight.numel()  # ComfyUI reshapes the product to the weight's shape
        landed.add(target)
    assert landed == trained_modules


def comfy_clip_key_map(family, tes):
    """model_lora_keys_clip for the CLIP state-dict keys ComfyUI would hold for this family."""
    prefixes = {"sd15": {"text_encoder": "clip_l"}, "sd2": {"text_encoder": "clip_h"},
                "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}[family]
    sdk = {f"{prefixes[c]}.transformer.text_model.encoder.layers.{b}.{k}.weight": (c, f"encoder.layers.{b}.{k}")
           for c, te in tes.items() for b in range(te.config.num_hidden_layers) for k in LORA_CLIP_MAP}
    key_map, clip_l_present = {}, False
    for b in range(32):
        for c in LORA_CLIP_MAP:
            for clip in ("clip_h", "clip_l"):
                k = f"{clip}.transformer.text_model.encoder.layers.{b}.{c}.weight"
                if k in sdk:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = sdk[k]
                    key_map[f"lora_te1_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = sdk[k]
                    clip_l_present |= clip == "clip_l"
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk and clip_l_present:
                key_map[f"lora_te2_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}"] = sdk[k]
    return key_map


# ------------------------------------------------------------- A1111 key rules (extensions-builtin/Lora)
# Re-implemented from AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/networks.py:
# convert_diffusers_name_to_compvis, assign_network_names_to_compvis_modules and the fallbacks in load_network.
SUFFIX_CONVERSION = {"attentions": {}, "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3",
                                                   "norm1": "in_layers_0", "norm2": "out_layers_0",
                                                   "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}}
RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def convert_diffusers_name_to_compvis(key, is_sd2):
    def match(regex):
        r = re.match(regex, key)
        return [int(x) if re.match(r"\d+", x) else x for x in r.groups()] if r else None

    if m := match(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if m := match(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = SUFFIX_CONVERSION.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            name = m[1].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"model_transformer_resblocks_{m[0]}_{name}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        name = m[1].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[0]}_{name}"
    return key


def a1111_lookup(name, mapping, is_sd2):
    key = convert_diffusers_name_to_compvis(name, is_sd2)
    module = mapping.get(key)
    if module is None and (m := RE_X_PROJ.match(key)):
        module = mapping.get(m.group(1))
    if module is None and "lora_unet" in name:
        module = mapping.get(name.replace("lora_unet", "diffusion_model"))
    elif module is None and "lora_te1_text_model" in name:
        module = mapping.get(name.replace("lora_te1_text_model", "0_transformer_text_model"))
    return module


def a1111_layer_mapping(family, unet, tes):
    """network_layer_mapping: LDM module names ("." -> "_") -> the diffusers module they correspond to."""
    _, s2d = comfy_maps(unet)
    mapping = {"diffusion_model_" + s.replace(".", "_"): ("unet", d) for s, d in s2d.items()}
    for c, te in tes.items():
        for b in range(te.config.num_hidden_layers):
            hf = {k: f"encoder.layers.{b}.{k}" for k in LORA_CLIP_MAP}
            openclip = {"attn": [hf["self_attn.q_proj"], hf["self_attn.k_proj"], hf["self_attn.v_proj"]],
                        "attn_out_proj": hf["self_attn.out_proj"], "mlp_c_fc": hf["mlp.fc1"], "mlp_c_proj": hf["mlp.fc2"]}
            if family == "sd15" or (family == "sdxl" and c == "text_encoder"):  # HF CLIPTextModel (transformers<5)
                pre = "transformer_text_model" if family == "sd15" else "0_transformer_text_model"
                mapping.update({f"{pre}_encoder_layers_{b}_{k.replace('.', '_')}": (c, v) for k, v in hf.items()})
            else:  # OpenCLIP: SD2's text encoder, SDXL's second one (q/k/v live in one MultiheadAttention)
                pre = "model_transformer_resblocks" if family == "sd2" else "1_model_transformer_resblocks"
                mapping.update({f"{pre}_{b}_{k}": (c, tuple(v) if isinstance(v, list) else v) for k, v in openclip.items()})
    return mapping
