"""ComfyUI's LoKr and LoHa reconstruction, re-implemented (Comfy-Org/ComfyUI a125cd84 comfy/weight_adapter/lokr.py
LoKrAdapter.calculate_weight and loha.py LoHaAdapter.calculate_weight; Forge's backend/patcher/lora.py and A1111's
network_lokr.py / network_hada.py use the same formulas and the same dim / alpha rules, see
shared/reference/training-methods.md 1.2), plus which keys ComfyUI's load_lora consumes for them.

Everything here works on key names and tensors only, so the test can apply a LoKr / LoHa file the way the UIs do."""
from __future__ import annotations

import torch

LOKR_KEYS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def adapter_keys(x: str, keys) -> list[str]:
    """comfy/weight_adapter LoKrAdapter.load / LoHaAdapter.load on key names: what they consume for prefix x (LoHa
    needs hada_w1_a; LoKr any of w1, w2, w1_a, w2_a) -- [] when neither takes it."""
    keys = set(keys)
    if f"{x}.hada_w1_a" in keys:
        return [f"{x}.{k}" for k in LOHA_KEYS if f"{x}.{k}" in keys]
    lokr = [f"{x}.{k}" for k in LOKR_KEYS if f"{x}.{k}" in keys]
    if any(f"{x}.{k}" in keys for k in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
        return lokr
    return []


def not_loaded(sd, key_map) -> list[str]:
    """comfy/lora.py load_lora: the file keys it logs as "lora key not loaded" (alpha and dora_scale of every mapped
    prefix, then the adapter's keys)."""
    loaded = set()
    for x in key_map:
        loaded |= {k for k in (f"{x}.alpha", f"{x}.dora_scale") if k in sd}
        loaded |= set(adapter_keys(x, sd))
    return sorted(set(sd) - loaded)


def _cp(t, wb, wa):
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


def comfy_delta(sd, x: str, shape) -> torch.Tensor:
    """The delta ComfyUI adds to the weight of ``shape`` for prefix ``x`` at strength 1 (float32)."""
    t = {k.rsplit(".", 1)[1]: v.float() for k, v in sd.items() if k.rsplit(".", 1)[0] == x}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            m1, m2 = _cp(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"]), _cp(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            m1, m2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return (m1 * m2).reshape(shape) * scale
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim = t["lokr_w1_b"].shape[0]
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim = t["lokr_w2_b"].shape[0]
        w2 = _cp(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"]) if "lokr_t2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


def prefixes(sd) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in sd}
