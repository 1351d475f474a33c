"""The Ideogram 4 LoRA file for ComfyUI: ``diffusion_model.`` + the original module names (the peers' layout:
ai-toolkit and SimpleTuner write it; reference families-2026 sections 2 and 8), ``lora_A`` / ``lora_B`` and an fp32
``.alpha`` per module:

    layers.N.attention.to_q / to_k / to_v  -> layers.N.attention.qkv   (fused)
    layers.N.attention.to_out.0            -> layers.N.attention.o
    layers.N.feed_forward.w1 / w2 / w3, layers.N.adaln_modulation: as they are

q / k / v are fused exactly (outputs/lora_files.fuse_qkv: downs stacked to rank 3r, ups block-diagonal) and the fused
module's ``.alpha`` is 3 x alpha, so alpha / rank and every delta stay as trained. ComfyUI a125cd84 has no Ideogram
model (its later loader was not in the code we read); diffusers 0.42.1 reads the file through
``_convert_non_diffusers_ideogram4_lora_to_diffusers`` (the same down for q, k and v, the up cut in thirds: the
trained deltas exactly), the checkable loader. That converter knows only these block modules, so a LoRA on any
other module, or DoRA, has no such file (pytorch_lora_weights.safetensors holds it)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...outputs.export import is_dora, iter_modules
from ...outputs.lora_files import fuse_qkv

_QKV = {"attention.to_q": 0, "attention.to_k": 1, "attention.to_v": 2}
_RENAME = {"attention.to_out.0": "attention.o", "feed_forward.w1": "feed_forward.w1",
           "feed_forward.w2": "feed_forward.w2", "feed_forward.w3": "feed_forward.w3",
           "adaln_modulation": "adaln_modulation"}


def native_target(path: str) -> tuple[str, int | None] | None:
    """A diffusers Ideogram4Transformer2DModel Linear path -> (original module, q/k/v part or None); None if the
    tool file has no name for it."""
    head, _, rest = path.partition(".")
    index, _, child = rest.partition(".")
    if head != "layers" or not index.isdigit():
        return None
    if child in _QKV:
        return f"layers.{index}.attention.qkv", _QKV[child]
    if child in _RENAME:
        return f"layers.{index}.{_RENAME[child]}", None
    return None


def _entry(out: dict, module: str, down: torch.Tensor, up: torch.Tensor, alpha: float, dtype: torch.dtype) -> None:
    name = f"diffusion_model.{module}"
    out[f"{name}.lora_A.weight"] = down.detach().to("cpu", dtype).contiguous().clone()
    out[f"{name}.lora_B.weight"] = up.detach().to("cpu", dtype).contiguous().clone()
    out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)


def comfy_state_dict(states: Mapping[str, Mapping[str, torch.Tensor]], transformer_config: Any, *, alpha: float,
                     rank: int, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """PEFT states ({"transformer": ...}) -> the ComfyUI file (module doc)."""
    if is_dora(states):
        raise ValueError("DoRA LoRAs have no exact fused-q/k/v Ideogram 4 form; use pytorch_lora_weights.safetensors")
    if set(states) - {"transformer"}:
        raise ValueError(f"Ideogram 4 LoRAs hold the transformer only, not {sorted(set(states) - {'transformer'})}")
    cfg = dict(transformer_config)
    width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for _, path, parts in iter_modules(states):
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        if a.shape[0] != rank:
            raise ValueError(f"transformer.{path}: rank {a.shape[0]} differs from the configured rank {rank}")
        target = native_target(path)
        if target is None:
            raise ValueError(f"transformer.{path}: no module of the Ideogram 4 ComfyUI layout (diffusers' converter "
                             "maps the blocks' attention, feed_forward and adaln_modulation only)")
        module, part = target
        if part is None:
            _entry(out, module, a, b, alpha, dtype)
        else:
            fused.setdefault(module, {})[part] = (a.detach().to("cpu", torch.float32), b.detach().to("cpu", torch.float32))
    for module, parts in fused.items():
        down, up = fuse_qkv(parts, width)
        _entry(out, module, down, up, alpha * down.shape[0] / rank, dtype)
    return out


__all__ = ["comfy_state_dict", "native_target"]
