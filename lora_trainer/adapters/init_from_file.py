"""Starting a run from an existing LoRA file (`init_lora`): continue training a LoRA that this trainer, sd-scripts
or diffusers wrote, instead of starting from zero.

Both layouts our export writes are read: kohya (``lora_unet_*`` / ``lora_te*_`` with ``lora_down`` / ``lora_up`` /
``alpha`` / ``dora_scale``; SGM or diffusers block names for SDXL) and PEFT/diffusers (``unet.<path>.lora_A.weight``
...). Each file module is matched to a module of the model by computing the kohya name of every adapted module
(kohya_names.py), so the mapping is the export's own, inverted. A family whose tool file fuses modules (FLUX.2's
q/k/v) says so in its convert module: ``tool_file_fused_parts(key)`` (how many modules a key may fuse, for the
header's rank check) and ``tool_file_to_peft(state)`` (the file back in PEFT names, one module per PEFT module). The delta is kept exactly: when the file's
alpha / rank differs from the config's, lora_up is rescaled by the ratio. The file is loaded right after injection,
before anything is sharded (training/attach.py), so the modules are whole.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..contract.errors import ConfigError
from ..families import get_spec
from ..families._unet.kohya_names import KohyaNames, te_path

if TYPE_CHECKING:  # torch is imported lazily: preflight (header_problems) runs without it
    import torch

_KOHYA = re.compile(r"^(lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")
# PEFT names; "diffusion_model." is the denoiser's in the ComfyUI files of the DiT families that keep diffusers'
# module names (Qwen-Image's, ai-toolkit's), which carry a per-module .alpha.
_PEFT = re.compile(r"^(unet|transformer|diffusion_model|text_encoder|text_encoder_2)\.(.+)\.(lora_A\.weight|"
                   r"lora_B\.weight|lora_magnitude_vector(?:\.weight)?|dora_scale|alpha)$")


def _problem(message: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"init_lora: {message}", [{"path": "init_lora", "value": value, "message": message,
                                                  "allowed": allowed}])


def _part(key: str) -> tuple[str, str] | None:
    if m := _KOHYA.match(key):
        return m.group(1), m.group(2)
    if m := _PEFT.match(key):
        return f"{m.group(1)}.{m.group(2)}", m.group(3)
    return None


def _converter(family: str | None):
    """The family's convert module when it reads its own tool file back (tool_file_to_peft), else None."""
    from ..families import SPECS, get_part

    conv = get_part(family, "convert") if family in SPECS else None
    return conv if hasattr(conv, "tool_file_to_peft") else None


def header_problems(path: Path, *, rank: int, use_dora: bool, family: str | None = None) -> list[dict]:
    """What preflight can tell from the header alone (no torch, no tensor data): readable, a LoRA layout, the
    configured rank, DoRA or not as configured. Same wording as apply_init_lora's errors. ``family``: a fused
    module of its tool file (convert.tool_file_fused_parts) may hold up to that many times the rank."""
    from ..preflight.probe import read_safetensors_header

    if not path.is_file():
        return [{"path": "init_lora", "value": str(path), "message": f"{path} does not exist",
                 "allowed": "a .safetensors LoRA file"}]
    header, problem = read_safetensors_header(path)
    if header is None:
        return [{"path": "init_lora", "value": str(path), "message": problem["message"],
                 "allowed": "a .safetensors LoRA file"}]
    keys = [k for k in header if k != "__metadata__"]
    parts = [_part(k) for k in keys]
    if not keys or None in parts:
        bad = next((k for k, p in zip(keys, parts) if p is None), None)
        return [{"path": "init_lora", "value": bad, "message": f"{path.name} is not a LoRA in kohya or PEFT layout",
                 "allowed": "a LoRA written by this trainer, sd-scripts or diffusers"}]
    conv = _converter(family)

    def unfused(key: str, r: int) -> int:
        n = conv.tool_file_fused_parts(key) if conv is not None else 1
        return rank if n > 1 and r % rank == 0 and 1 <= r // rank <= n else r

    ranks = sorted({unfused(k, int(header[k]["shape"][0])) for k, p in zip(keys, parts)
                    if p[1] in ("lora_down.weight", "lora_A.weight")})
    problems = []
    if ranks != [rank]:
        problems.append({"path": "lora_rank", "value": rank, "message": f"{path.name} has rank {ranks}",
                         "allowed": f"{ranks[0]} to continue that LoRA" if len(ranks) == 1 else "one rank"})
    has_dora = any(p[1].startswith(("dora_scale", "lora_magnitude_vector")) for p in parts)
    if has_dora != use_dora:
        problems.append({"path": "use_dora", "value": use_dora, "message": f"{path.name} "
                         f"{'has' if has_dora else 'has no'} DoRA magnitudes", "allowed": str(has_dora).lower()})
    return problems


def read_modules(path: Path, family: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{file module name: {"down", "up", "alpha"?, "magnitude"?}} from a kohya or PEFT file; names are kohya
    names ("lora_unet_...") or "<component>.<path>" for PEFT files (a family's fused tool file is read back into
    PEFT names first: convert.tool_file_to_peft)."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a missing, truncated or non-safetensors file
        raise _problem(f"cannot read {path}: {exc}", str(path), "a .safetensors LoRA file") from None
    conv = _converter(family)
    if conv is not None:
        sd = conv.tool_file_to_peft(sd)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    rename = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "magnitude",
              "lora_A.weight": "down", "lora_B.weight": "up", "lora_magnitude_vector": "magnitude",
              "lora_magnitude_vector.weight": "magnitude"}
    for key, tensor in sd.items():
        found = _part(key)
        if found is None:
            unknown.append(key)
            continue
        modules.setdefault(found[0], {})[rename[found[1]]] = tensor
    if unknown or not modules:
        raise _problem(f"{path.name} is not a LoRA in kohya or PEFT layout"
                       + (f" (e.g. key {unknown[0]!r})" if unknown else " (no LoRA keys)"),
                       unknown[:5], "a LoRA written by this trainer, sd-scripts or diffusers")
    # PEFT files carry alpha per component in diffusers' lora_adapter_metadata (without it diffusers assumes
    # alpha == rank, i.e. scale 1, and so do we).
    with safe_open(str(path), "pt") as fh:
        meta = (fh.metadata() or {}).get("lora_adapter_metadata")
    try:
        adapter = json.loads(meta) if meta else {}
    except ValueError:
        adapter = {}
    for name, parts in modules.items():
        component = name.split(".", 1)[0]
        if "alpha" not in parts and adapter.get(f"{component}.lora_alpha") is not None:
            parts["alpha"] = torch.tensor(float(adapter[f"{component}.lora_alpha"]))
    broken = [n for n, parts in modules.items() if not {"down", "up"} <= set(parts)]
    if broken:
        raise _problem(f"module {broken[0]} lacks lora_down or lora_up", broken[:5], "complete LoRA modules")
    return modules


def init_from_file(cfg, family_name: str, comps, modules: dict[str, torch.nn.Module], events, *,
                   path: Path | None = None) -> None:
    """The recipe's step: load cfg.init_lora (relative to the config file; ``path``: one expert's file,
    init_experts.py) into the fresh adapters of ``modules`` (component -> adapted module), and say so."""
    path = cfg.resolve(cfg.init_lora) if path is None else path
    unet = comps.denoisers.get("unet")
    if cfg.network_type != "lora":  # a LoKr / LoHa file
        from ..families import get_family
        from .init_lycoris import apply_init_lycoris

        info = apply_init_lycoris(path, get_family(family_name), dict(modules),
                                  {n: d.config for n, d in comps.denoisers.items()}, rank=cfg.lora_rank,
                                  alpha=cfg.alpha)
    else:
        info = apply_init_lora(path, family_name, dict(modules), rank=cfg.lora_rank, alpha=cfg.alpha,
                               use_dora=cfg.use_dora, unet_config=unet.config if unet is not None else None)
    events.emit("status", phase="init_lora", message=f"starting from {path.name}: {info['modules']} module(s)"
                + (f", {info['rescaled']} rescaled for lora_alpha {cfg.alpha}" if info["rescaled"] else "")
                + (f"; {len(info['unread'])} module(s) on text-encoder layers whose output {get_spec(family_name).label}"
                   f" never reads left out (e.g. {info['unread'][0]})" if info["unread"] else ""))
    if info["not_in_file"]:
        events.emit("warning", code="init_lora_partial", path="init_lora",
                    message=f"{len(info['not_in_file'])} adapted module(s) are not in {path.name} and start from "
                            f"zero (e.g. {info['not_in_file'][0]})")


def _names_for(kohya: KohyaNames | None, component: str, path: str) -> list[str]:
    """Every name a file may use for this module: kohya (``kohya``: the family's kohya SD names, None for a family
    without; SGM for SDXL, and the diffusers-named variant some trainers write), and PEFT with or without the
    text_model level."""
    if component == "transformer":  # the PEFT file and FLUX.1's tool file; Qwen-Image's tool file
        return [f"transformer.{path}", f"diffusion_model.{path}"]
    names = [kohya(component, path)] if kohya is not None else []
    if component == "unet":
        names.append("lora_unet_" + path.replace(".", "_"))
        names.append(f"unet.{path}")
    else:
        names += [f"{component}.{te_path(path)}", f"{component}.{path.removeprefix('text_model.')}"]
    return names


def apply_init_lora(path: Path, family: str, models: dict[str, torch.nn.Module], *, rank: int, alpha: float,
                    use_dora: bool, unet_config: Any) -> dict:
    """Load the file into the PEFT adapters of ``models`` (component -> adapted module). Raises ConfigError when
    the file does not fit the config; returns {"modules", "rescaled", "not_in_file"} for the event stream."""
    from .lora import MAGNITUDE, load_plain_lora_state, plain_lora_state

    problems = header_problems(path, rank=rank, use_dora=use_dora, family=family)
    if problems:
        raise ConfigError(f"init_lora does not fit this run: {problems[0]['message']}", problems)
    file_modules = read_modules(path, family)
    spec = get_spec(family)
    kohya = KohyaNames(spec, unet_config) if "unet" in spec.denoisers else None
    used: set[str] = set()
    not_in_file: list[str] = []
    rescaled = 0
    unread = _unread_names(spec, kohya, models)
    for component, model in models.items():
        state = plain_lora_state(model)
        paths = sorted({k.rsplit(".lora_A.", 1)[0] for k in state if ".lora_A." in k})
        new_state = dict(state)
        for p in paths:
            name = next((n for n in _names_for(kohya, component, p) if n in file_modules), None)
            if name is None:
                not_in_file.append(f"{component}.{p}")
                continue
            used.add(name)
            parts = file_modules[name]
            a, b = state[f"{p}.lora_A.weight"], state[f"{p}.lora_B.weight"]
            down, up = parts["down"].to(a.dtype), parts["up"].to(b.dtype)
            if down.shape != a.shape or up.shape != b.shape:
                raise _problem(f"{name}: shapes {tuple(down.shape)}/{tuple(up.shape)} do not fit the model's "
                               f"{tuple(a.shape)}/{tuple(b.shape)}", name, "a LoRA trained on this model family")
            # Same delta: the file's scale (its alpha / rank; no alpha means 1, as the loaders read it) over ours.
            file_scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
            ratio = file_scale / (alpha / rank)
            if ratio != 1.0:
                up = up * ratio
                rescaled += 1
            new_state[f"{p}.lora_A.weight"], new_state[f"{p}.lora_B.weight"] = down, up
            if "magnitude" in parts:
                mag = state[f"{p}.{MAGNITUDE}"]
                new_state[f"{p}.{MAGNITUDE}"] = parts["magnitude"].to(mag.dtype).reshape(mag.shape)
        load_plain_lora_state(model, {k: v.to(state[k].device) for k, v in new_state.items()})
    # A file from a trainer that adapts every layer (sd-scripts, or this one before text_encoder_reads) has modules
    # on layers whose output the conditioning never reads: they cannot change an image, so they are left out.
    ignored = sorted(set(file_modules) & unread - used)
    extra = sorted(set(file_modules) - used - unread)
    if extra:
        raise ConfigError(f"init_lora has {len(extra)} module(s) this run does not train (e.g. {extra[0]})",
                          [{"path": "target_modules", "value": extra[:5], "message": "modules in init_lora that "
                            "target_modules / train_text_encoder do not adapt", "allowed": "the targets the LoRA "
                            "was trained with (and train_text_encoder if it has lora_te keys)"}])
    return {"modules": len(used), "rescaled": rescaled, "not_in_file": not_in_file, "unread": ignored}


def _unread_names(spec, kohya: KohyaNames | None, models: dict[str, torch.nn.Module]) -> set[str]:
    """Every name a file may use for a Linear layer of a LoRA'd text encoder that the family's conditioning never
    reads (spec.text_encoder_reads; such layers get no LoRA)."""
    import torch

    names: set[str] = set()
    for component, model in models.items():
        if component not in spec.text_encoder_reads:
            continue
        modules = dict(model.named_modules())
        skip = spec.text_encoder_layers_unread(component, modules)
        for path, layer in modules.items():
            if isinstance(layer, torch.nn.Linear) and any(path.startswith(p + ".") for p in skip):
                names.update(_names_for(kohya, component, path))
    return names
