"""The config rules of ``network_type`` (lora | lokr | loha) and its LyCORIS keys; torch-free (``--validate-only``).

The family rule (a tool file that fuses q/k/v cannot hold a Kronecker or Hadamard delta) needs the probed family and
is preflight/model_checks.py's; the training side is adapters/lora.py, the files outputs/lycoris.py."""
from __future__ import annotations

from typing import Any

from .schema import problem

LYCORIS = ("lokr", "loha")
LOKR_KEYS = ("lokr_factor", "lokr_decompose_both")


def network_problems(cfg: Any, problems: list[dict], warnings: list[dict]) -> None:
    net = cfg.network_type
    if cfg.lokr_factor == 0:
        problems.append(problem("lokr_factor", 0, "lokr_factor 0 splits no dimension",
                                "-1 (the most balanced split) or a positive divisor of the layers' widths, e.g. 8"))
    if net not in LYCORIS:
        for key in (*LOKR_KEYS, "lycoris_effective_conv"):
            if key in cfg.explicit_keys:
                warnings.append({"code": "unused_setting", "path": key,
                                 "message": f"{key} has no effect because network_type is {net!r}"})
        return
    if net == "loha":
        for key in LOKR_KEYS:
            if key in cfg.explicit_keys:
                warnings.append({"code": "unused_setting", "path": key,
                                 "message": f"{key} has no effect because network_type is 'loha'"})
    if cfg.use_dora:
        # PEFT's LoKr / LoHa have no weight decomposition (LyCORIS's dora_wd); a half-supported DoKr would load
        # differently in every consumer.
        problems.append(problem("use_dora", True, f"use_dora cannot be combined with network_type {net!r}: PEFT's "
                                "LoKr and LoHa have no DoRA", "use_dora false, or network_type \"lora\""))
    quantised = [(key, getattr(cfg, key)) for key in ("base_quantization", "text_encoder_quantization")
                 if getattr(cfg, key) in ("int8", "nf4") and (key == "base_quantization" or cfg.train_text_encoder)]
    for key, fmt in quantised:
        # PEFT builds the Kronecker / Hadamard factors from base_layer.weight.shape, which for an NF4 layer is its
        # packed storage, and its LoKr / LoHa layers have no torchao (int8) dispatch as its LoRA has.
        problems.append(problem(key, fmt, f"{key} {fmt!r} cannot be combined with network_type {net!r}: PEFT's "
                                "LoKr / LoHa layers read the base weight's shape, which a packed int8 / NF4 layer "
                                "does not keep", "\"none\" or \"fp8\", or network_type \"lora\""))


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension: LyCORIS's and PEFT's split of a LoKr side (peft tuners/lokr/layer.py),
    here without torch for the memory plan."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def adapter_params(shape: list[int] | tuple[int, ...], rank: int, cfg: Any = None) -> int:
    """Trained parameters of one adapted layer (weight ``shape``: [out, in] or [out, in, k1, k2]) as PEFT builds
    them for ``cfg.network_type`` (None: LoRA)."""
    out, inp, kernel = shape[0], shape[1], list(shape[2:])
    k = 1
    for side in kernel:
        k *= side
    net = getattr(cfg, "network_type", "lora")
    effective = bool(getattr(cfg, "lycoris_effective_conv", False)) and k > 1
    if net == "loha":
        return 2 * (rank * rank * k + rank * (out + inp) if effective else rank * (out + inp * k))
    if net != "lokr":
        return rank * (inp * k + out)
    (out_l, out_k), (in_m, in_n) = factorization(out, cfg.lokr_factor), factorization(inp, cfg.lokr_factor)
    full_w1 = not (cfg.lokr_decompose_both and rank < max(out_l, in_m) / 2)
    w1 = out_l * in_m if full_w1 else rank * (out_l + in_m)
    if rank >= max(out_k, in_n) / 2:
        w2 = out_k * in_n * k
    elif effective:
        w2 = rank * rank * k + rank * (out_k + in_n)
    else:
        w2 = rank * (out_k + in_n * k)
    return w1 + w2
