"""What the base model is, from its files alone: no weights loaded, no torch, no network.

``probe_model`` tells a diffusers folder (folder.py), a single .safetensors file (single_file.py) and a hub id
(hub.py) apart; which family a model is, its variant, and what it must hold are the families' facts
(families/*/signature.py, families/*/spec.py), asked in the order families/signature.py describes. The tables of
models this trainer does not train (named in the refusal) stay here, as data.

The public API other modules use (the layout inside this package is free to change): ``probe_model`` and
``ModelProbe``; ``probe_single_file``; the header readers; JSON and component helpers the single-file loader
shares; the hub cache lookup."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .folder import component_weights, probe_diffusers_dir, tokenizer_problem
from .headers import (PICKLE_MESSAGE, PICKLE_SUFFIXES, has_pipeline_index, read_json, read_pipeline_index,
                      read_safetensors_header, weight_headers,
                      weight_shapes)
from .hub import HUB_ID, find_cached_snapshot, hf_hub_cache_dir, hub_offline, probe_hub
from .result import ModelProbe, problem, refused
from ...families.signature import Refusal
from .single_file import probe_single_file


def _probe(base_model: str, base_dir: Path) -> ModelProbe:
    raw = base_model.strip()
    p = Path(os.path.expanduser(raw))
    if not p.is_absolute():
        p = Path(base_dir) / p
    suffix = p.suffix.lower()
    if p.is_dir():
        return probe_diffusers_dir(p, base_model)
    if p.exists():
        if suffix in PICKLE_SUFFIXES:
            return ModelProbe("invalid", base_model, p, None, None, problems=(
                problem("model_pickle_refused", f"{p.name}: {PICKLE_MESSAGE}",
                        "convert it, e.g. with diffusers' scripts or safetensors.torch.save_file"),))
        if suffix == ".safetensors":
            return probe_single_file(p, base_model)
        return ModelProbe("invalid", base_model, p, None, None, problems=(
            problem("model_unsupported", f"{p.name}: not a .safetensors file or a diffusers folder"),))
    if suffix in PICKLE_SUFFIXES:  # missing, but refused anyway: say both
        return ModelProbe("invalid", base_model, p, None, None, problems=(
            problem("model_not_found", f"{p} does not exist"), problem("model_pickle_refused", PICKLE_MESSAGE)))
    if suffix != ".safetensors" and HUB_ID.match(raw) and ".." not in raw:
        probe = probe_hub(raw)
        if p.parent.is_dir() and not probe.in_cache:
            # "models/base" may be a mistyped local folder rather than a hub id: say both readings.
            probe = dataclasses.replace(probe, notes=probe.notes + (f"there is no local folder {p} either",),
                                        warnings=tuple(dict(w, message=w["message"] + f"; there is no local folder {p} either")
                                                       for w in probe.warnings))
        return probe
    return ModelProbe("invalid", base_model, p, None, None, problems=(
        problem("model_not_found", f"{p} does not exist and '{raw}' is not a hub id (org/name)",
                "a diffusers folder, a .safetensors file or a Hugging Face id like stabilityai/stable-diffusion-xl-base-1.0"),))


def _named_variant(probe: ModelProbe) -> ModelProbe:
    """The family's rule for releases told apart by name only (Qwen-Image-2512)."""
    from ...families import get_signature

    if probe.family is None:
        return probe
    variant = get_signature(probe.family).named_variant(probe.source, probe.variant)
    if isinstance(variant, Refusal):  # a file its name shows to be part of a model (one of Wan 2.2 A14B's experts)
        return dataclasses.replace(probe, family=None, variant=None, problems=probe.problems + (refused(variant),))
    if variant == probe.variant:
        return probe
    return dataclasses.replace(probe, variant=variant,
                               family_evidence=f"{probe.family_evidence}; {variant} by its name {probe.source!r}")


def _distilled(probe: ModelProbe) -> ModelProbe:
    """The family's distilled-release rule on what the probe found: a ``model_distilled`` warning."""
    from ...families import get_signature, get_spec
    from ...families.signature import DistillFacts

    if probe.family is None:
        return probe
    index = config = metadata = sched = {}
    if probe.path is not None and probe.path.is_dir():
        index = read_pipeline_index(probe.path)[0] or {}
        sched = read_json(probe.path / "scheduler" / "scheduler_config.json")[0] or {}
        config = read_json(probe.path / get_spec(probe.family).denoisers[0] / "config.json")[0] or {}
    elif probe.path is not None and probe.path.is_file():
        metadata = (read_safetensors_header(probe.path)[0] or {}).get("__metadata__") or {}
    found = get_signature(probe.family).distilled(DistillFacts(probe.source, index, config, metadata, sched))
    if found is None:
        return probe
    warning = problem("model_distilled", f"{found.model} is a distilled checkpoint ({found.evidence}): a LoRA trained "
                      f"on it directly degrades it ({found.why})", f"train on {found.base}")
    return dataclasses.replace(probe, warnings=probe.warnings + (warning,))


def probe_model(base_model: str, base_dir: Path | str = ".", *, model_type: str = "auto") -> ModelProbe:
    """Inspect base_model; with an explicit model_type a different detected family is a problem."""
    probe = _distilled(_named_variant(_probe(base_model, Path(base_dir))))
    if model_type != "auto" and probe.family is not None and probe.family != model_type:
        mismatch = problem("model_type_mismatch",
                           f"model_type is '{model_type}' but the base model is {probe.family} ({probe.family_evidence})",
                           f"set model_type to '{probe.family}' or 'auto'")
        probe = dataclasses.replace(probe, problems=probe.problems + (mismatch,))
    return probe


__all__ = ["HUB_ID", "PICKLE_MESSAGE", "PICKLE_SUFFIXES", "ModelProbe", "component_weights", "find_cached_snapshot",
           "has_pipeline_index", "hf_hub_cache_dir", "hub_offline", "probe_diffusers_dir", "probe_hub", "probe_model", "probe_single_file",
           "read_json", "read_pipeline_index", "read_safetensors_header", "tokenizer_problem", "weight_headers", "weight_shapes"]
