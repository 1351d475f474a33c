"""``init_lora`` for LoKr / LoHa runs: start from a LoKr / LoHa file this trainer wrote (either of its two files) or
one in the same LyCORIS layout (kohya-named lycoris.kohya files of the SD families, for instance).

Modules are matched by the names the export gives them (outputs/lycoris.tool_names: the family's own tool-file names)
or by PEFT names. The file's delta is kept exactly: its scale as the UIs read it (alpha / rank where a factor is
low-rank and the file has ``.alpha``, else 1; the PEFT file's metadata alpha / r) over the run's alpha / rank goes into
w1. Factor shapes must match (same network_type, rank, lokr_factor, decompose_both, Tucker): a config error
otherwise, also from ``--validate-only`` (header_problems, from the header alone)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..contract.errors import ConfigError
from ..families._unet.kohya_names import te_path
from .lycoris import FIRST_FACTORS, PARTS


def _problem(message: str, value: Any, allowed: str, path: str = "init_lora") -> dict:
    return {"path": path, "value": value, "message": message, "allowed": allowed}


def header_problems(path: Path, *, network_type: str) -> list[dict]:
    """Readable, LyCORIS keys only, of the configured algorithm (no torch)."""
    from ..preflight.probe import read_safetensors_header

    if not path.is_file():
        return [_problem(f"{path} does not exist", str(path), "a .safetensors LoKr / LoHa file")]
    header, problem = read_safetensors_header(path)
    if header is None:
        return [_problem(problem["message"], str(path), "a .safetensors LoKr / LoHa file")]
    parts = {k.rpartition(".")[2] for k in header if k != "__metadata__"}
    if not parts or not parts <= {*PARTS, "alpha"}:
        bad = sorted(parts - {*PARTS, "alpha"})[:3]
        return [_problem(f"{path.name} is not a LoKr / LoHa file (keys ending {bad})", str(path),
                         f"a {network_type} file this trainer or LyCORIS wrote, or network_type \"lora\" for a LoRA")]
    algos = {"lokr" if p.startswith("lokr_") else "loha" for p in parts - {"alpha"}}
    if algos != {network_type}:
        return [_problem(f"{path.name} is {'/'.join(sorted(algos))}, not {network_type}", network_type,
                         "/".join(sorted(algos)), path="network_type")]
    return []


def _file_scale(parts: dict, meta_scale: float | None) -> float:
    """The scale ComfyUI / Forge / A1111 apply to a module of a file with ``.alpha`` (PEFT files: their metadata's)."""
    if "alpha" not in parts:
        return meta_scale if meta_scale is not None else 1.0
    if "hada_w1_b" in parts:
        return float(parts["alpha"]) / parts["hada_w1_b"].shape[0]
    dim = parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else (
        parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else None)
    return float(parts["alpha"]) / dim if dim else 1.0


def apply_init_lycoris(path: Path, family: Any, models: dict, configs: dict, *, rank: int, alpha: float) -> dict:
    """Load the file into the fresh LoKr / LoHa adapters of ``models`` (component -> module); returns
    {"modules", "rescaled", "not_in_file", "unread"} as apply_init_lora does."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..outputs.lycoris import tool_names
    from .lora import load_plain_lora_state, plain_lora_state

    try:
        sd = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("lora_adapter_metadata") or "{}")
    except Exception as exc:  # noqa: BLE001 - a truncated or non-safetensors file
        raise ConfigError(f"init_lora: cannot read {path}: {exc}", [_problem(str(exc), str(path), "a .safetensors "
                                                                               "LoKr / LoHa file")]) from None
    file_modules: dict[str, dict] = {}
    for key, tensor in sd.items():
        name, _, part = key.rpartition(".")
        file_modules.setdefault(name, {})[part] = tensor
    states = {c: plain_lora_state(m) for c, m in models.items()}
    names = tool_names(family, states, configs)
    used, not_in_file, rescaled = set(), [], 0
    ours = alpha / rank
    for component, model in models.items():
        state = states[component]
        new = dict(state)
        r = meta.get(f"{component}.r")
        meta_scale = float(meta[f"{component}.alpha"]) / float(r) if r and f"{component}.alpha" in meta else None
        for mpath in sorted({k.rsplit(".", 1)[0] for k in state}):
            candidates = (names[(component, mpath)], f"{component}.{mpath}", f"{component}.{te_path(mpath)}",
                          f"{component}.{mpath.removeprefix('text_model.')}")
            name = next((n for n in candidates if n in file_modules), None)
            if name is None:
                not_in_file.append(f"{component}.{mpath}")
                continue
            used.add(name)
            parts = file_modules[name]
            have = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == mpath}
            shapes = {p: tuple(t.shape) for p, t in parts.items() if p != "alpha"}
            if shapes != {p: tuple(t.shape) for p, t in have.items()}:
                raise ConfigError(f"init_lora: {name} has factors {shapes}, this run's are "
                                  f"{ {p: tuple(t.shape) for p, t in have.items()} }",
                                  [_problem(f"{name}: other factor shapes than this run's", name,
                                            "the network_type, lora_rank, lokr_factor, lokr_decompose_both and "
                                            "lycoris_effective_conv the file was trained with")])
            ratio = _file_scale(parts, meta_scale) / ours
            rescaled += ratio != 1.0
            for part, tensor in have.items():
                value = parts[part].to(torch.float32) * (ratio if part in FIRST_FACTORS else 1.0)
                new[f"{mpath}.{part}"] = value.to(tensor.dtype)
        load_plain_lora_state(model, {k: v.to(state[k].device) for k, v in new.items()})
    extra = sorted(set(file_modules) - used)
    if extra:
        raise ConfigError(f"init_lora has {len(extra)} module(s) this run does not train (e.g. {extra[0]})",
                          [_problem("modules in init_lora that target_modules / train_text_encoder do not adapt",
                                    extra[:5], "the targets the file was trained with", path="target_modules")])
    return {"modules": len(used), "rescaled": rescaled, "not_in_file": not_in_file, "unread": []}
