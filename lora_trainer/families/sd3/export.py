"""The kohya / SAI-named SD3 (SD3, SD3.5) LoRA file: the one Forge loads (and ComfyUI too).

For SD3 no single file suits every tool (see /work/notes/dit_loaders.md): diffusers needs ``transformer.<diffusers
module>`` keys (outputs/export.py's ``pytorch_lora_weights.safetensors``), while Forge's SD3.5 engine maps only
the generic ``lora_unet_<SAI MMDiT module>`` names (its diffusers-name SD3 map is commented out; more than 12 unmatched
keys and it drops the whole file). This module writes that second layout, as sd-scripts ``networks/lora_sd3.py``
does: ``lora_unet_joint_blocks_N_x_block_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, text
encoders as ``lora_te1_text_model_...`` (CLIP-L, ``text_encoder``) and ``lora_te2_text_model_...`` (CLIP-G,
``text_encoder_2``). ComfyUI maps the same names (its generic ``lora_unet_`` map and ``model_lora_keys_clip``).
diffusers loads nothing from this file (it has no SD3 kohya converter), so it is an extra file, never the only one.

SAI's MMDiT fuses q/k/v into one ``qkv`` Linear where diffusers has three. Separate q/k/v LoRAs are fused exactly:
``down = cat(down_q, down_k, down_v)`` (rank = sum of the present parts' ranks) and ``up`` is block-diagonal (each
part's up in its own output rows, zeros elsewhere; a part that was not trained, e.g. only ``to_q`` targeted, is all
zero rows and adds nothing to the rank). Then ``up @ down = [[B_q A_q], [B_k A_k], [B_v A_v]]``, exactly the per-part
deltas. alpha / rank is folded into ``up`` (in fp32, before the cast to ``dtype``) and ``.alpha`` is written as the
module's rank, so every loader's scale alpha / rank is 1: keeping the trained alpha while the fused rank triples
would shrink the delta 3x (the sd-scripts #2204 trap). 1:1 modules and text encoders are folded the same way.

Where ComfyUI's ``mmdit_to_diffusers`` applies ``swap_scale_shift`` (diffusers' AdaLayerNormContinuous is
(scale, shift), SAI's modulation (shift, scale)): ``norm_out.linear`` and the last block's ``norm1_context.linear``
(context_pre_only), the two halves of the up matrix's output rows are swapped here, so the patch lands right.

DoRA is refused (ValueError): a DoRA magnitude normalises each output row of W + delta; fusing q/k/v would need one
magnitude over the fused weight whose row norms include the other parts' base weights, which is not what PEFT
trained, so no exact kohya DoRA file exists. Callers then write only the diffusers file.

Mapping (diffusers module inside ``transformer_blocks.N`` -> SAI module inside ``joint_blocks.N``; from ComfyUI
comfy/utils.py MMDIT_MAP_BLOCK / mmdit_to_diffusers):

    attn.to_q / to_k / to_v             -> x_block.attn.qkv          (fused, rows [0:h] [h:2h] [2h:3h])
    attn.add_q_proj / add_k / add_v     -> context_block.attn.qkv    (fused)
    attn2.to_q / to_k / to_v            -> x_block.attn2.qkv         (fused; SD3.5-medium dual-attention blocks)
    attn.to_out.0                       -> x_block.attn.proj
    attn.to_add_out                     -> context_block.attn.proj   (not in the context_pre_only last block)
    attn2.to_out.0                      -> x_block.attn2.proj
    ff.net.0.proj / ff.net.2            -> x_block.mlp.fc1 / fc2
    ff_context.net.0.proj / net.2       -> context_block.mlp.fc1 / fc2 (not in the last block)
    norm1.linear                        -> x_block.adaLN_modulation.1
    norm1_context.linear                -> context_block.adaLN_modulation.1 (last block: halves swapped)

and outside the blocks:

    proj_out                            -> final_layer.linear
    norm_out.linear                     -> final_layer.adaLN_modulation.1 (halves swapped)
    context_embedder                    -> context_embedder
    time_text_embed.timestep_embedder.linear_1 / linear_2 -> t_embedder.mlp.0 / mlp.2
    time_text_embed.text_embedder.linear_1 / linear_2     -> y_embedder.mlp.0 / mlp.2
    pos_embed.proj (Conv2d)             -> x_embedder.proj

Kohya name = ``lora_unet_`` + SAI path with ``.`` -> ``_``. h = num_attention_heads * attention_head_dim; blocks,
the dual-attention blocks and the context_pre_only last block come from the transformer config.

Public API::

    sd3_kohya_state_dict(states, transformer_config, *, alpha, rank, dtype=torch.float16) -> dict[str, Tensor]
    sd3_sai_module_map(transformer_config) -> dict[str, SaiTarget]
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from ...outputs.export import is_dora, iter_modules
from ...outputs.lora_files import fuse_qkv, kohya_entry
from .._unet.kohya_names import te_path, te_prefixes
from .spec import SPEC

TE_PREFIX = te_prefixes(SPEC.lora_text_encoders)  # sd-scripts lora_sd3.py: lora_te1 CLIP-L, lora_te2 CLIP-G
COMPONENTS = ("transformer", *TE_PREFIX)
UNET_PREFIX = "lora_unet"

_QKV = {  # diffusers child of transformer_blocks.N -> (SAI module inside joint_blocks.N, part: 0 q, 1 k, 2 v)
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
}
_BLOCK = {  # 1:1, every block
    "attn.to_out.0": "x_block.attn.proj",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
}
_BLOCK_NOT_PRE_ONLY = {  # 1:1, absent from the context_pre_only (last) block
    "attn.to_add_out": "context_block.attn.proj",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}
_BLOCK_DUAL = {"attn2.to_out.0": "x_block.attn2.proj"}  # 1:1, dual-attention (SD3.5-medium) blocks only
_GLOBAL = {
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # swapped
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "pos_embed.proj": "x_embedder.proj",  # Conv2d(in, h, patch, stride=patch)
}


class SaiTarget(NamedTuple):
    """Where one diffusers module's LoRA goes: SAI module path; for a q/k/v part its index and row width in the
    fused ``qkv`` (else None); whether the output rows' halves are swapped (ComfyUI's swap_scale_shift)."""

    module: str
    part: int | None = None
    width: int | None = None
    swap: bool = False


def _cfg_get(cfg: Any, key: str) -> Any:
    value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
    if value is None:
        raise ValueError(f"transformer_config lacks {key!r} (pass the SD3Transformer2DModel config)")
    return value


def sd3_sai_module_map(transformer_config: Any) -> dict[str, SaiTarget]:
    """Every diffusers ``SD3Transformer2DModel`` Linear/Conv path this config has -> its SAI MMDiT target.

    Mirrors diffusers' block construction: block i has attn2 iff i in ``dual_attention_layers`` and is
    context_pre_only iff it is the last one (no ``to_add_out`` / ``ff_context``; its ``norm1_context`` is an
    AdaLayerNormContinuous, (scale, shift), hence swapped)."""
    num_layers = int(_cfg_get(transformer_config, "num_layers"))
    hidden = int(_cfg_get(transformer_config, "num_attention_heads")) * int(
        _cfg_get(transformer_config, "attention_head_dim"))
    cfg_get = transformer_config.get if isinstance(transformer_config, Mapping) else (
        lambda k, d=None: getattr(transformer_config, k, d))
    dual = {int(i) for i in (cfg_get("dual_attention_layers", ()) or ())}
    out: dict[str, SaiTarget] = {}
    for i in range(num_layers):
        src, dst = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        pre_only = i == num_layers - 1
        for child, (module, part) in _QKV.items():
            if child.startswith("attn2.") and i not in dual:
                continue
            out[f"{src}.{child}"] = SaiTarget(f"{dst}.{module}", part, hidden)
        children = dict(_BLOCK)
        if not pre_only:
            children.update(_BLOCK_NOT_PRE_ONLY)
        if i in dual:
            children.update(_BLOCK_DUAL)
        for child, module in children.items():
            out[f"{src}.{child}"] = SaiTarget(f"{dst}.{module}",
                                              swap=pre_only and child == "norm1_context.linear")
    for path, module in _GLOBAL.items():
        out[path] = SaiTarget(module, swap=path == "norm_out.linear")
    return out


def _swap_halves(up: torch.Tensor, name: str) -> torch.Tensor:
    if up.shape[0] % 2:
        raise ValueError(f"{name}: {up.shape[0]} output rows cannot be split into (shift, scale) halves")
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_kohya_state_dict(states: Mapping[str, Mapping[str, torch.Tensor]], transformer_config: Any, *,
                         alpha: float, rank: int, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """PEFT states -> the kohya/SAI SD3 LoRA state dict Forge and ComfyUI load (see the module docstring).

    ``states``: {"transformer": get_peft_model_state_dict(transformer), "text_encoder": ..., "text_encoder_2": ...}
    (any subset; PEFT keys such as ``transformer_blocks.0.attn.to_q.lora_A.weight`` or, for CLIP,
    ``encoder.layers.0.self_attn.q_proj.lora_A.weight`` with or without ``text_model.``). ``transformer_config``:
    the SD3Transformer2DModel config (dict, FrozenDict or config object). Every module must have rank ``rank``
    (PEFT's scale is lora_alpha / r). Weights come out in ``dtype``, ``.alpha`` as float32 scalars equal to the
    module's (fused) rank, alpha / rank being folded into ``lora_up`` in float32 first.

    Raises ValueError for DoRA states (``lora_magnitude_vector``: fusing q/k/v DoRA is not exact, so no such file
    is written; the diffusers-named file carries DoRA), for components other than transformer / text_encoder /
    text_encoder_2, and for transformer modules the config's SAI MMDiT has no place for.
    """
    if is_dora(states):
        raise ValueError(
            "DoRA LoRAs have no exact kohya/SAI SD3 form: fusing q/k/v into SAI's qkv would need one DoRA magnitude "
            "over the fused weight, which is not what was trained; write only the diffusers-named file")
    for component in states:
        if component not in COMPONENTS:
            raise ValueError(f"component {component!r} has no kohya name in an SD3 LoRA (expected one of "
                             f"{COMPONENTS})")
    scale = float(alpha) / int(rank)
    sai = sd3_sai_module_map(transformer_config) if "transformer" in states else {}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple[str, torch.Tensor, torch.Tensor]]] = {}  # SAI qkv -> {part: (path, A, B)}
    for component, path, parts in iter_modules(states):
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.shape[0] != rank:
            raise ValueError(f"{component}.{path}: rank {a.shape[0]} differs from the configured rank {rank}")
        up32 = b.detach().to("cpu", torch.float32) * scale
        if component in TE_PREFIX:
            kohya_entry(out, f"{TE_PREFIX[component]}_" + te_path(path).replace(".", "_"), a, up32, dtype)
            continue
        target = sai.get(path)
        if target is None:
            raise ValueError(f"transformer.{path}: no SAI MMDiT module for it in this SD3 config "
                             f"({int(_cfg_get(transformer_config, 'num_layers'))} blocks)")
        if target.part is None:
            if target.swap:
                up32 = _swap_halves(up32, f"transformer.{path}")
            kohya_entry(out, f"{UNET_PREFIX}_" + target.module.replace(".", "_"), a, up32, dtype)
            continue
        if a.dim() != 2 or b.shape[0] != target.width:
            raise ValueError(f"transformer.{path}: lora_B has {b.shape[0]} output rows, but its slice of "
                             f"{target.module} is {target.width} wide")
        fused.setdefault(target.module, {})[target.part] = (path, a, up32)
    for module, parts in fused.items():
        order = sorted(parts)
        in_features = {parts[p][1].shape[1] for p in order}
        if len(in_features) != 1:
            raise ValueError(f"{module}: q/k/v LoRAs read inputs of different widths {sorted(in_features)}")
        width = sai[parts[order[0]][0]].width
        down, up = fuse_qkv({p: (parts[p][1].detach().to("cpu", torch.float32), parts[p][2]) for p in order}, width)
        kohya_entry(out, f"{UNET_PREFIX}_" + module.replace(".", "_"), down, up, dtype)
    return out


__all__ = ["TE_PREFIX", "UNET_PREFIX", "SaiTarget", "sd3_kohya_state_dict", "sd3_sai_module_map"]
