"""Preflight's model checks (no torch): where a single file's other components come from, that target_modules
name layers of this model, and the config rules that need the model's family. Issues have preflight's shape."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..families import SPECS

from ..families.spec import DDPM_KEYS, FLOW_KEYS, expand_targets, objective_summary
from .probe import HUB_ID, ModelProbe, find_cached_snapshot, hf_hub_cache_dir, hub_offline, weight_shapes


MAX_FILES = 20  # files listed per issue; ``count`` has the total


def _issue(code: str, path: str, message: str, *, hint: str | None = None, files: Iterable[str] | None = None,
           **extra: Any) -> dict:
    d: dict[str, Any] = {"code": code, "path": path, "message": message}
    if hint:
        d["hint"] = hint
    if files is not None:
        files = list(files)
        d["files"] = files[:MAX_FILES]
        d["count"] = len(files)
    d.update(extra)
    return d


def _check_single_file_config(cfg: Any, probe: ModelProbe, errors: list, warnings: list) -> dict | None:
    """A single-file checkpoint holds weights only: its component configs and tokenizers come from
    base_model_config (a diffusers folder or hub id) or else diffusers' default repo for the family. Checked here
    so that an offline machine learns it before training, not after loading gigabytes."""
    if probe.kind != "single_file" or probe.problems or probe.family is None:
        return None
    if SPECS[probe.family].is_flow:
        return _check_dit_single_file_config(cfg, probe, errors, warnings)
    src = (cfg.base_model_config or "").strip()
    if src:
        local = cfg.resolve(src)
        if local.is_dir():
            if not (local / "model_index.json").is_file():
                errors.append(_issue("model_config_missing", "base_model_config",
                                     f"{local} has no model_index.json: not a diffusers pipeline folder",
                                     hint="point it at a diffusers folder of the same family (configs and tokenizers "
                                          "are enough, no weights needed)"))
            return {"source": str(local), "kind": "folder"}
        if not HUB_ID.match(src):
            errors.append(_issue("model_config_missing", "base_model_config", f"{local} does not exist and "
                                 f"'{src}' is not a hub id", hint="a diffusers folder or a hub id (org/name)"))
            return {"source": src, "kind": "invalid"}
        repo, why = src, "base_model_config"
    else:
        # Where diffusers' from_single_file takes component configs and tokenizers when no `config` is given
        # (diffusers 0.42 loaders/single_file_utils.py DIFFUSERS_DEFAULT_PIPELINE_PATHS).
        repos = SPECS[probe.family].single_file_config_repo
        repo = repos.get(getattr(probe, "variant", None), repos[None])
        why = f"diffusers' default for {probe.family} single files"
    if find_cached_snapshot(repo) is not None:
        return {"source": repo, "kind": "hub", "in_cache": True}
    fetch = f"hf download {repo} --include '*.json' '*.txt'"
    if hub_offline():
        errors.append(_issue("model_config_missing", "base_model_config",
                             f"the single-file checkpoint takes its component configs and tokenizers from {repo} ({why}), "
                             f"which is not in the local Hugging Face cache ({hf_hub_cache_dir()}), and HF_HUB_OFFLINE is set",
                             hint="set base_model_config to a diffusers folder of the same family (configs and tokenizers "
                                  f"are enough, no weights), or fetch them where there is network: {fetch}"))
    else:
        warnings.append(_issue("single_file_config_download", "base_model_config",
                               f"component configs and tokenizers for the single-file checkpoint will be fetched from "
                               f"{repo} ({why}) at the start of training: a few MB, no weights",
                               hint=f"to avoid the download, set base_model_config to a local diffusers folder or run {fetch}"))
    return {"source": repo, "kind": "hub", "in_cache": False}


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def _gated_models() -> str:
    """The gated default config repos, for people: "FLUX.1-dev" where only some of a family's variants' repos are
    gated, "the SD3/3.5 repos" where all are."""
    names = []
    for spec in SPECS.values():
        repos = spec.single_file_config_repo
        if not spec.gated_repos:
            continue
        if all(r in spec.gated_repos for r in repos.values()):
            names.append(f"the {spec.label} repos")
        else:
            names.extend(f"{spec.label}-{v}" for v, r in repos.items() if v is not None and r in spec.gated_repos)
    return _and(names)


def _check_dit_single_file_config(cfg: Any, probe: ModelProbe, errors: list, warnings: list) -> dict:
    """A FLUX.1 / SD3 single file holds the transformer only (or more, which is not used): the VAE and text
    encoders, with their weights, come from base_model_config or the family's default repo."""
    from ..runtime.single_file import default_config_repo, download_command, single_file_problems

    spec = SPECS[probe.family]
    denoiser = _and(list(spec.denoisers))
    # T5-XXL (4.7 B parameters) is most of the download wherever a family has it.
    size = "about 10 GB, mostly T5-XXL; " if spec.t5_tokenizers else ""
    gated = _gated_models()

    src = (cfg.base_model_config or "").strip()
    local = cfg.resolve(src) if src else None
    if local is not None and local.is_dir():
        for e in single_file_problems(probe.family, probe.path, local):
            errors.append(_issue("model_config_missing", "base_model_config", e.message, hint=e.hint))
        return {"source": str(local), "kind": "folder"}
    if src and not HUB_ID.match(src):
        errors.append(_issue("model_config_missing", "base_model_config", f"{local} does not exist and '{src}' is "
                             "not a hub id", hint="a diffusers folder or a hub id (org/name)"))
        return {"source": src, "kind": "invalid"}
    repo = src or default_config_repo(probe.family, probe.variant)
    why = "base_model_config" if src else f"the default for {probe.family} {probe.variant or ''} single files"
    snap = find_cached_snapshot(repo)
    problems = single_file_problems(probe.family, probe.path, snap) if snap else None
    for e in [p for p in problems or [] if p.kind != "incomplete"]:  # another model: a download will not help
        errors.append(_issue("model_config_missing", "base_model_config", e.message, hint=e.hint))
    if problems == []:
        return {"source": repo, "kind": "hub", "in_cache": True}
    fetch = download_command(repo, probe.family)
    if hub_offline():
        errors.append(_issue("model_config_missing", "base_model_config",
                             f"the single-file checkpoint holds the {denoiser}; its VAE and text encoders (weights), "
                             f"tokenizers and configs come from {repo} ({why}), which is not (fully) in the local "
                             "Hugging Face cache, and HF_HUB_OFFLINE is set",
                             hint="set base_model_config to a local diffusers folder of the same model (VAE and text "
                                  f"encoder weights included), or fetch them where there is network: {fetch}"))
    else:
        warnings.append(_issue("single_file_config_download", "base_model_config",
                               f"the VAE and text encoders (weights, {size}not the {denoiser}), "
                               f"tokenizers and configs for the single-file checkpoint will be downloaded from {repo} "
                               f"({why}) at the start of training",
                               hint=f"to avoid it, set base_model_config to a local diffusers folder of the same "
                                    f"model, or run {fetch}"
                                    + (f"; {gated} are gated: accept the licence and set HF_TOKEN" if gated else "")))
    return {"source": repo, "kind": "hub", "in_cache": snap is not None}


def _weight_ndims(root: Path, files: Iterable[str]) -> dict[str, int]:
    """module path -> rank of its weight, from safetensors headers only (no tensor data is read)."""
    return {k[: -len(".weight")]: len(shape) for k, shape in weight_shapes(root, files).items()
            if k.endswith(".weight")}


def _check_targets(cfg: Any, probe: ModelProbe, errors: list) -> None:
    """target_modules must name layers of this model, and Linear or Conv2d ones (weights of rank 2 or 4: what PEFT
    wraps), matched as PEFT matches them (the name or a "."-suffix of it). Read from the weight files' headers, so
    a typo fails here instead of after loading gigabytes. Diffusers folders only: single files use other names."""
    if probe.kind not in ("diffusers_dir", "hub") or probe.path is None or not probe.weight_files:
        return
    spec = SPECS.get(probe.family or "")
    if spec is None:
        return
    checks = [("target_modules", spec.targets(cfg.target_modules), spec.denoisers)]
    if cfg.train_text_encoder:
        checks.append(("text_encoder_target_modules", cfg.text_encoder_target_modules, spec.lora_text_encoders))
    for key, targets, comps in checks:
        dims: dict[str, int] = {}
        for comp in comps:
            dims.update(_weight_ndims(Path(probe.path), probe.weight_files.get(comp, ())))
        if not dims:
            continue
        unknown, not_layers = [], []
        for t, names in expand_targets(tuple(targets), dims).items():
            matched = {name: dims[name] for name in names}
            if not matched:
                unknown.append(t)
            # rank 1: norms; a rank-2 "*embedding" is an nn.Embedding (token/position tables), not a Linear
            elif any(d not in (2, 4) or name.rsplit(".", 1)[-1].endswith("embedding") for name, d in matched.items()):
                not_layers.append(t)
        examples = ("to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2, conv1, conv2"
                    if key == "target_modules" else "q_proj, k_proj, v_proj, out_proj, fc1, fc2")
        if unknown:
            errors.append(_issue("target_modules_unknown", key, f"{key} names modules this model does not have: "
                                 f"{', '.join(unknown)}", value=unknown, allowed=f"module names such as {examples}"))
        if not_layers:
            errors.append(_issue("target_modules_unsupported", key, f"{key}: {', '.join(not_layers)} are not Linear "
                                 "or Conv2d layers (norms, embeddings): LoRA wraps only those", value=not_layers,
                                 allowed=f"module names such as {examples}"))


def _check_family_keys(cfg: Any, family: str | None, variant: str | None, errors: list, *,
                       files_read: bool = True) -> dict | None:
    """Options of one objective on a family of the other, and family-specific keys on a family without the
    feature, are config errors naming the key (the schema cannot know the family). Returns the objective summary.
    ``files_read``: the variant comes from the model's files (False: a hub id not downloaded yet, variant unknown)."""
    _check_quantization(cfg, errors)  # needs no family: checked even before a hub model is downloaded
    spec = SPECS.get(family or "")
    if spec is None:
        return None
    ex = cfg.explicit_keys

    def refuse(key: str, why: str, allowed: str) -> None:
        errors.append(_issue("config_invalid", key, f"{key}: {why}", value=getattr(cfg, key), allowed=allowed))

    if spec.is_flow:
        ddpm = "/".join(s.label for s in SPECS.values() if not s.is_flow)
        for key in DDPM_KEYS:
            if key in ex and getattr(cfg, key) not in (None, 0, 0.0, "auto"):
                refuse(key, f"{spec.label} trains with flow matching; {key} is a DDPM ({ddpm}) option",
                       "remove it (see the flow_* options)")
    else:
        for key in FLOW_KEYS:
            if key in ex and getattr(cfg, key) is not None:
                refuse(key, f"{spec.label} trains with the DDPM objective; {key} is a flow-matching option",
                       "remove it, or use a FLUX.1 / SD3 base model")
    # An unknown variant (a hub model not downloaded yet) may have the embedder: checked again after the download.
    maybe = variant is None and any(v is not None for v in spec.train_guidance.values())
    if "train_guidance_scale" in ex and cfg.train_guidance_scale is not None and not maybe \
            and not spec.has_guidance_embedder(variant):
        refuse("train_guidance_scale", f"this {spec.label} model has no guidance embedder "
               "(only guidance-distilled models such as FLUX.1-dev have one)", "null")
    # An unknown variant of a family with expert variants (a hub id not downloaded yet) is checked after download.
    if cfg.train_experts != "both" and (files_read or not spec.experts) and variant not in spec.experts:
        refuse("train_experts", f"this {spec.label} model has one denoiser, not two experts (only Wan 2.2 T2V-A14B "
               "has: transformer for high noise, transformer_2 for low noise)", "\"both\"")
    if cfg.shard_base and cfg.train_experts == "both" and variant in spec.experts:  # distributed/routed.py
        refuse("shard_base", f"both experts of this {spec.label} model train, each step's samples routed to one: a "
               "sharded expert needs every process in each of its passes, which a process whose samples all went to "
               "the other never joins", "false (or train_experts naming one expert)")
    if cfg.train_text_encoder and not spec.lora_text_encoders:
        refuse("train_text_encoder", f"{spec.label}'s text encoder gets no LoRA (its pipeline's LoRA loader reads "
               "transformer layers only)", "false")
    if cfg.use_dora and not spec.tool_file_dora:  # refused before training, not at the export after it
        refuse("use_dora", f"{spec.label}'s tool file fuses q/k/v (the layout its UIs load), which cannot carry DoRA's "
               "per-part magnitudes", "false")
    if cfg.network_type != "lora" and not spec.tool_file_dora:  # outputs/lycoris.py tool_names would refuse it
        refuse("network_type", f"{spec.label}'s tool file fuses q/k/v (the layout its UIs load), and a "
               f"{cfg.network_type} delta of three layers cannot be written as one of the fused layer exactly", "\"lora\"")
    if "max_sequence_length" in ex and cfg.max_sequence_length is not None and not spec.max_sequence_length:
        refuse("max_sequence_length", f"{spec.label} has no T5 text encoder", "null")
    if cfg.resolution is not None and cfg.resolution % spec.pixel_multiple_for(variant):
        m = spec.pixel_multiple_for(variant)
        errors.append(_issue("config_invalid", "resolution", f"{spec.label} needs image sides that are multiples of "
                             f"{m} px (VAE downsampling x the denoiser's patch size)", value=cfg.resolution,
                             allowed=f"a multiple of {m}, e.g. {max(m, cfg.resolution // m * m)}"))
    return objective_summary(cfg, spec, variant)


def _check_validation_model(cfg: Any, family: str | None, errors: list, variant: str | None = None) -> None:
    """validation_base_model: it exists and is a release of the run's family (its denoiser takes the trained LoRA
    and the cached prompts) with the base model's denoisers (``variant``'s: both experts of Wan 2.2 A14B, each
    taking its own LoRA); a hub id not downloaded yet is checked when the run fetches it."""
    from .probe import probe_model

    key = "validation_base_model"
    if cfg.shard_base:
        errors.append(_issue("config_invalid", key, "validation_base_model cannot sample a sharded run (shard_base)",
                             hint="unset validation_base_model or shard_base"))
        return
    probe = probe_model(cfg.validation_base_model, cfg.base_dir)
    if probe.problems:
        p = probe.problems[0]
        errors.append(_issue("config_invalid", key, f"validation_base_model: {p['message']}", hint=p.get("hint")))
    elif probe.family is not None and family is not None and probe.family != family:
        errors.append(_issue("config_invalid", key, f"validation_base_model is a {probe.family} model, the base model "
                             f"a {family} one: samples need a release of the same family",
                             hint="name a release of the base model's family, e.g. its distilled sibling"))
    elif probe.family is not None and family in SPECS and \
            SPECS[family].denoisers_of(variant) != SPECS[family].denoisers_of(probe.variant):
        have, want = (", ".join(SPECS[family].denoisers_of(v)) for v in (probe.variant, variant))
        errors.append(_issue("config_invalid", key, f"validation_base_model has the denoiser(s) {have}, the base model "
                             f"{want}: the LoRA of each cannot go on the other's", value=cfg.validation_base_model,
                             hint="name a release with the base model's denoisers (Wan 2.2 A14B: a folder with both "
                                  "experts)"))


def _check_video_samples(cfg: Any, family: str | None, errors: list, warnings: list) -> None:
    """validation_frames / validation_video_format: moot for an image family (its spec compresses no time: samples
    are images); a video family's mp4 clips need PyAV (requirements.txt), checked here, not at the first sample."""
    spec = SPECS.get(family or "")
    if spec is None:
        return
    if not spec.temporal_compression:
        for key in ("validation_frames", "validation_video_format"):
            if key in cfg.explicit_keys:
                warnings.append(_issue("unused_setting", key, f"{key} has no effect: {spec.label} samples images, "
                                       "not clips"))
        return
    import importlib.util

    if cfg.validation_frames > 1 and cfg.validation_video_format == "mp4" and importlib.util.find_spec("av") is None:
        errors.append(_issue("config_invalid", "validation_video_format", "mp4 sample clips are encoded with PyAV "
                             "(the av package), which is not installed", value="mp4",
                             hint="pip install av, or set validation_video_format to \"webp\" (Pillow)"))


def _check_quantization(cfg: Any, errors: list) -> None:
    """base_quantization / text_encoder_quantization that cannot work (backend missing or too old, DoRA on a
    quantised layer) are config errors naming the key, found here without importing torch or the backend."""
    from ..runtime.quantize import config_problems

    for key, message, hint in config_problems(cfg):
        errors.append(_issue("config_invalid", key, message, hint=hint, value=getattr(cfg, key),
                             allowed="\"none\", or a format whose backend is installed"))


def _model_summary(probe: ModelProbe) -> dict:
    return {"kind": probe.kind, "source": probe.source, "path": str(probe.path) if probe.path else None,
            "family": probe.family, "variant": getattr(probe, "variant", None),
            "family_evidence": probe.family_evidence,
            "prediction_type": probe.prediction_type, "pipeline_class": probe.pipeline_class,
            "in_cache": probe.in_cache, "components_found": list(probe.components_found),
            "components_missing": list(probe.components_missing), "notes": list(probe.notes)}


def _model_issue(p: dict) -> dict:
    path = "model_type" if p["code"] == "model_type_mismatch" else "base_model"
    return _issue(p["code"], path, p["message"], hint=p.get("hint"), files=p.get("files"))


def _as_written(value: Any) -> Any:
    """A TrainConfig value as a config file would hold it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_as_written(v) for v in value]
    return value.to_dict() if hasattr(value, "to_dict") else value  # a `datasets` entry


def settings_problems(cfg: Any, change: dict, family: str | None, variant: str | None) -> list[dict]:
    """The problems the config's own rules find in ``cfg`` with ``change`` written into it, beyond those ``cfg``
    already has: the schema and cross-field rules (parse_config, on the file as the user wrote it: explicit keys and
    every value that is not the default) and preflight's family rules (_check_family_keys). Empty when a run would
    accept the change: the memory plan offers only such hints."""
    from ..config.config import parse_config
    from ..config.schema import optional_fields
    from ..contract.errors import ConfigError

    written = {"base_model": cfg.base_model, "output_path": str(cfg.output_path),
               "trigger_words": list(cfg.trigger_words),
               **({"dataset_path": str(cfg.dataset_path)} if cfg.dataset_path is not None else {})}
    for key, node in optional_fields().items():
        value = _as_written(getattr(cfg, key, node.get("default")))
        if key in cfg.explicit_keys or value != node.get("default"):
            written[key] = value

    def problems(raw: dict) -> set[tuple[str, str]]:
        try:
            new, _ = parse_config(raw, base_dir=cfg.base_dir, config_path=cfg.config_path)
        except ConfigError as exc:
            return {(p.get("path"), p.get("message")) for p in exc.problems}
        errors: list[dict] = []
        _check_family_keys(new, family, variant, errors)
        return {(p.get("path"), p.get("message")) for p in errors}

    new = problems({**written, **change}) - problems(written)
    return [{"path": path, "message": message} for path, message in sorted(new, key=str)]
