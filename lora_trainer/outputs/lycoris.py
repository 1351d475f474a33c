"""The LoKr / LoHa files (network_type lokr | loha): the LyCORIS tool file and the PEFT file.

* Tool file (``<output_name>.safetensors``): per adapted module ``<name>.lokr_w1`` / ``.lokr_w1_a`` + ``.lokr_w1_b``,
  ``.lokr_w2`` / ``.lokr_w2_a`` + ``.lokr_w2_b`` (+ ``.lokr_t2``), or ``.hada_w1_a`` ... (+ ``.hada_t1/t2``), and an
  fp32 ``<name>.alpha``: the layout lycoris.kohya writes, which ComfyUI (comfy/weight_adapter/lokr.py, loha.py),
  Forge (backend/patcher/lora.py) and A1111 (network_lokr.py, network_hada.py) reconstruct. ``<name>`` is the name
  the family's LoRA tool file gives the module (``lora_unet_...``, ``lora_te_...``, ``transformer....``,
  ``diffusion_model....``): ``tool_names`` asks the family's own ``tool_state_dict`` (with a probe LoRA that says
  which module each written name came from), so every family gets its UIs' names without a family branch here. A
  family whose tool file fuses modules (q/k/v into one Linear) or reorders rows cannot carry a Kronecker or
  Hadamard delta exactly and is refused (preflight refuses it before training: FamilySpec.tool_file_dora).
* Scale: PEFT multiplies by alpha / rank always; the UIs by alpha / dim when a factor is decomposed (dim = the
  decomposed factor's rank, which is PEFT's rank) and by 1 when both LoKr factors are full matrices. So the factors
  are written as trained, except that a LoKr module with two full factors gets alpha / rank multiplied into w1 (in
  fp32, before the cast): every reader then applies exactly the trained delta.
* PEFT file (``pytorch_lora_weights.safetensors``): ``<component>.<module>.lokr_w1`` ... as trained, with the
  LoKrConfig / LoHaConfig per component in ``lora_adapter_metadata``: diffusers' model-level ``load_lora_adapter``
  (prefix = the component) builds the LoKr config from it; PEFT's ``inject_adapter_in_model`` +
  ``set_peft_model_state_dict`` load either (README "LoKr and LoHa" says which loader takes what per family).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from ..adapters.lora import config_value
from ..adapters.lycoris import FIRST_FACTORS, PARTS
from ..families._unet.kohya_names import te_path

_DOWNS = (".lora_down.weight", ".lora_A.weight")
_UPS = {".lora_down.weight": ".lora_up.weight", ".lora_A.weight": ".lora_B.weight"}


def is_lycoris(states: Mapping[str, Mapping[str, torch.Tensor]]) -> bool:
    return any(k.rpartition(".")[2] in PARTS for state in states.values() for k in state)


def lycoris_modules(state: Mapping[str, torch.Tensor], component: str) -> dict[str, dict[str, torch.Tensor]]:
    """One component's PEFT state -> {module path: {part: tensor}}, each module a complete LoKr or LoHa."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        path, _, part = key.removeprefix("base_model.model.").rpartition(".")
        if part not in PARTS:
            raise ValueError(f"{component}: unsupported PEFT key {key!r} in a LoKr / LoHa state")
        modules.setdefault(path, {})[part] = tensor
    for path, parts in modules.items():
        algo = algo_of(parts)
        need = ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} if algo == "loha" else set())
        ok = need <= set(parts) if algo == "loha" else (
            ("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= set(parts))
            and ("lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= set(parts)))
        if not ok:
            raise ValueError(f"{component}: module {path!r} has {sorted(parts)}, an incomplete {algo}")
    return modules


def algo_of(parts: Mapping[str, torch.Tensor]) -> str:
    kinds = {("lokr" if p.startswith("lokr_") else "loha") for p in parts}
    if len(kinds) != 1:
        raise ValueError(f"a module mixes LoKr and LoHa tensors: {sorted(parts)}")
    return kinds.pop()


def _lokr_factor_shapes(parts) -> tuple[tuple[int, int], tuple[int, ...]]:
    """((out_l, in_m), (out_k, in_n[, k1, k2])) of a LoKr module's two factors."""
    w1 = parts.get("lokr_w1")
    s1 = tuple(w1.shape) if w1 is not None else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    if "lokr_w2" in parts:
        s2 = tuple(parts["lokr_w2"].shape)
    elif "lokr_t2" in parts:  # Tucker: w2_a [r, out_k], w2_b [r, in_n], t2 [r, r, k1, k2]
        s2 = (parts["lokr_w2_a"].shape[1], parts["lokr_w2_b"].shape[1], *parts["lokr_t2"].shape[2:])
    else:
        s2 = (parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1])
    return s1, s2


def io_dims(parts: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(output channels, input channels x kernel) of the delta a module's factors make."""
    if algo_of(parts) == "lokr":
        (out_l, in_m), (out_k, *rest) = _lokr_factor_shapes(parts)
        return out_l * out_k, in_m * int(torch.Size(rest).numel())
    if "hada_t1" in parts:  # Tucker: w_a [r, out], w_b [r, in], t [r, r, k1, k2]
        t = parts["hada_t1"]
        return parts["hada_w1_a"].shape[1], parts["hada_w1_b"].shape[1] * t.shape[2] * t.shape[3]
    return parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]


def full_factors(parts: Mapping[str, torch.Tensor]) -> bool:
    """A LoKr module whose two factors are full matrices: the UIs apply scale 1 to it, PEFT alpha / rank."""
    return algo_of(parts) == "lokr" and "lokr_w1" in parts and "lokr_w2" in parts


def tool_names(family: Any, states: Mapping[str, Mapping[str, torch.Tensor]],
               configs: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    """{(component, module path): the name the family's tool file gives that module}, read off the family's own
    ``tool_state_dict`` run on a probe LoRA (rank 1, alpha 1, float64, so nothing is rounded or rescaled): module i's
    lora_A is all i, its lora_B the rows 1..out, and a DoRA magnitude makes families that fuse q/k/v for plain LoRA
    only (SD3) write their per-module layout. A written name whose down mixes modules (fused) or whose up is not
    1..out (rows reordered, e.g. a scale/shift swap) cannot carry a Kronecker / Hadamard delta and is refused."""
    probe: dict[str, dict[str, torch.Tensor]] = {}
    ids: dict[int, tuple[str, str]] = {}
    for component, state in states.items():
        probe[component] = {}
        for path, parts in lycoris_modules(state, component).items():
            ids[len(ids) + 1] = (component, path)
            out, inp = io_dims(parts)
            probe[component][f"{path}.lora_A.weight"] = torch.full((1, inp), float(len(ids)), dtype=torch.float64)
            probe[component][f"{path}.lora_B.weight"] = torch.arange(1, out + 1, dtype=torch.float64).reshape(out, 1)
            probe[component][f"{path}.lora_magnitude_vector"] = torch.ones(out)
    written = family.tool_state_dict(probe, configs, alpha=1.0, rank=1, dtype=torch.float64)
    names: dict[tuple[str, str], str] = {}
    for key, down in written.items():
        suffix = next((s for s in _DOWNS if key.endswith(s)), None)
        if suffix is None:
            continue
        name = key[: -len(suffix)]
        up = written[name + _UPS[suffix]].reshape(-1)
        module = ids.get(int(down.reshape(-1)[0]))
        rows = torch.arange(1, up.numel() + 1, dtype=up.dtype)
        if down.shape[0] != 1 or module is None or not bool((down == down.reshape(-1)[0]).all()) \
                or not torch.equal(up.to(torch.float64), rows.to(torch.float64)):
            raise ValueError(f"{family.spec.label}'s tool file fuses or transforms modules ({name}), which a "
                             "Kronecker / Hadamard delta cannot follow exactly; train LoRA (network_type lora)")
        if module in names:
            raise ValueError(f"{module[0]}.{module[1]} is written twice ({names[module]}, {name})")
        names[module] = name
    missing = sorted(f"{c}.{p}" for c, p in ids.values() if (c, p) not in names)
    if missing:
        raise ValueError(f"{family.spec.label}'s tool file has no name for {missing[:5]}")
    return names


def tool_state_dict(family: Any, states: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Any], *,
                    alpha: float, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT LoKr / LoHa states -> the LyCORIS tool file's tensors (module docstring)."""
    names = tool_names(family, states, configs)
    out: dict[str, torch.Tensor] = {}
    for component, state in states.items():
        for path, parts in lycoris_modules(state, component).items():
            name = names[(component, path)]
            bake = full_factors(parts)
            for part, tensor in parts.items():
                t = tensor.detach().to("cpu", torch.float32)
                if bake and part == "lokr_w1":
                    t = t * (float(alpha) / rank)
                out[f"{name}.{part}"] = t.to(dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)  # loaders .item() it
    return out


def peft_state_dict(states: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, rank: int,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``<component>.<module>.<part>`` (text encoders with transformers' ``text_model.`` level, as the LoRA PEFT
    file), alpha / rank multiplied into w1 (``lokr_w1`` / ``lokr_w1_a`` / ``hada_w1_a``) and the metadata's alpha
    set to the rank: diffusers' ``load_lora_adapter`` called without the metadata (a file path and no
    ``weight_name``) infers alpha = rank, so only a file at scale 1 loads at the trained strength both ways."""
    out: dict[str, torch.Tensor] = {}
    for component, state in states.items():
        for path, parts in lycoris_modules(state, component).items():
            if component.startswith("text_encoder"):
                path = te_path(path)
            first = next(p for p in FIRST_FACTORS if p in parts)
            for part, tensor in parts.items():
                t = tensor.detach().to("cpu", torch.float32)
                if part == first:
                    t = t * (float(alpha) / rank)
                out[f"{component}.{path}.{part}"] = t.to(dtype if dtype is not None else tensor.dtype).contiguous()
    return out


def adapter_metadata(states: Mapping[str, Mapping[str, torch.Tensor]],
                     configs: Mapping[str, Any] | None) -> dict[str, str]:
    """``lora_adapter_metadata`` as diffusers packs it (``<component>.<config field>``), from each component's PEFT
    LoKrConfig / LoHaConfig, targets narrowed to the adapted module paths. Without ``configs`` (export_lora called
    without lora_configs) none is written: diffusers then infers the LoKr config, at scale 1 as the file is."""
    if not configs:
        return {"format": "pt"}
    packed: dict[str, Any] = {}
    for component, state in states.items():
        fields = dict(configs[component].to_dict())
        fields.update(alpha=fields["r"], alpha_pattern={})  # the scale is in the factors (peft_state_dict)
        paths = sorted(lycoris_modules(state, component))
        fields["target_modules"] = [p.removeprefix("text_model.") for p in paths]
        packed.update({f"{component}.{key}": config_value(value) for key, value in fields.items()})
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True, default=str)}


def peft_configs(cfg: Any, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any] | None:
    """Each LoKr / LoHa module's PEFT config (the PEFT file's metadata); None for LoRA, whose export builds its own."""
    from ..adapters.lora import ADAPTER

    if cfg.network_type == "lora":
        return None
    return {name: m.peft_config[ADAPTER] for name, m in modules.items()}


def lycoris_metadata(cfg: Any) -> dict[str, str]:
    """The kohya header keys LyCORIS's sd-scripts network writes (``ss_network_module`` "lycoris.kohya",
    ``ss_network_args`` as string values); empty for LoRA."""
    from ..adapters.lycoris import Network

    network = Network.of(cfg)
    if not network.lycoris:
        return {}
    return {"ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps(network.network_args(dropout=cfg.lora_dropout))}
