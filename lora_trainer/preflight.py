"""Everything that can be checked before torch is imported: dataset, base model, output folder, resume.

``--validate-only`` prints this and exits; training runs it first so that a run that cannot succeed
fails in a second instead of after minutes of model loading. Every problem is collected (not just the
first), as a dict {code, path, message, hint?, files?, count?} where ``path`` names the config key to
fix and ``files`` lists at most MAX_FILES affected files (``count`` has the total).

Errors make training impossible; warnings do not (a bad image is skipped, a missing caption falls back
to the trigger words). Checks run in the order dataset, model, output, resume, so the first error is
the most basic one; ``PreflightResult.exit_code`` is derived from it.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .buckets import bucket_plan, make_buckets
from .dataset_scan import DatasetScan, ImageRecord, resolve_training_shape, scan_dataset
from .errors import EXIT_CONFIG, EXIT_DATASET, EXIT_IO, EXIT_MODEL_LOAD, EXIT_OK
from .family_spec import DDPM_KEYS, FLOW_KEYS, SPECS, expand_targets, objective_summary
from .model_probe import (HUB_ID, ModelProbe, find_cached_snapshot, hf_hub_cache_dir, hub_offline, probe_model,
                          read_safetensors_header)

MAX_FILES = 20
LOW_DISK_BYTES = 2 * 1024 ** 3
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

_EXIT_BY_CODE = {
    "dataset_missing": EXIT_DATASET, "dataset_empty": EXIT_DATASET, "no_usable_images": EXIT_DATASET,
    "model_not_found": EXIT_MODEL_LOAD, "model_pickle_refused": EXIT_MODEL_LOAD, "model_incomplete": EXIT_MODEL_LOAD,
    "model_corrupt": EXIT_MODEL_LOAD, "model_unsupported": EXIT_MODEL_LOAD, "model_config_missing": EXIT_MODEL_LOAD,
    "output_not_writable": EXIT_IO,
}


@dataclass(frozen=True)
class PreflightResult:
    ok: bool
    errors: list[dict]
    warnings: list[dict]
    summary: dict
    # The trainer reuses these instead of scanning twice; not part of the JSON output.
    scan: DatasetScan | None = field(default=None, compare=False, repr=False)
    probe: ModelProbe | None = field(default=None, compare=False, repr=False)

    @property
    def exit_code(self) -> int:
        if not self.errors:
            return EXIT_OK
        return _EXIT_BY_CODE.get(self.errors[0]["code"], EXIT_CONFIG)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "errors": self.errors, "warnings": self.warnings, "summary": self.summary}


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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------------- checkpoints

def _manifest_ok(folder: Path) -> bool:
    # Cheap completeness test only (the manifest is written last); checkpoint.verify_checkpoint hashes
    # every file at resume time, but it needs torch and would cost seconds here.
    try:
        with open(folder / CHECKPOINT_MANIFEST, "rb") as fh:
            manifest = json.loads(fh.read(16 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "step" in manifest


def list_checkpoints(output_path: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) for every real <output>/checkpoints/step-NNNNNN folder, oldest first;
    complete means it has a parseable manifest.json (symlinked folders are ignored, as the trainer does)."""
    root = Path(output_path) / CHECKPOINT_DIR
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    out = []
    for e in entries:
        m = _STEP_DIR.match(e.name)
        if m and e.is_dir(follow_symlinks=False):
            out.append((int(m.group(1)), Path(e.path), _manifest_ok(Path(e.path))))
    return sorted(out)


def _check_resume(cfg: Any, errors: list, warnings: list) -> dict:
    if cfg.resume is False or cfg.resume is None:
        return {"mode": "off"}
    if cfg.resume == "auto":
        cps = list_checkpoints(cfg.output_path)
        complete = [c for c in cps if c[2]]
        latest = complete[-1] if complete else None
        return {"mode": "auto", "found": latest is not None, "checkpoint": str(latest[1]) if latest else None,
                "step": latest[0] if latest else None, "incomplete": len(cps) - len(complete),
                "action": "resume" if latest else "fresh start"}
    p = cfg.resolve(str(cfg.resume))
    info = {"mode": "path", "checkpoint": str(p), "found": False, "step": None}
    if not p.is_dir():
        errors.append(_issue("resume_not_found", "resume", f"checkpoint folder {p} does not exist",
                             hint="use \"auto\" to pick the newest checkpoint, or false to start fresh"))
    elif not _manifest_ok(p):
        errors.append(_issue("resume_not_found", "resume", f"{p} has no valid {CHECKPOINT_MANIFEST}: not a complete checkpoint "
                             "(interrupted while saving?)", hint="point resume at an earlier step-NNNNNN folder, or use \"auto\""))
    else:
        m = _STEP_DIR.match(p.name)
        info.update(found=True, step=int(m.group(1)) if m else None)
    return info


# ---------------------------------------------------------------------------------- output

def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def probe_writable(folder: Path) -> tuple[bool, str | None]:
    """Create and delete a temp file: os.access says nothing about read-only mounts, ACLs or quotas."""
    try:
        fd, name = tempfile.mkstemp(prefix=".lora_trainer_write_test_", dir=folder)
    except OSError as exc:
        return False, exc.strerror or str(exc)
    try:
        os.close(fd)
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    return True, None


def _check_output(cfg: Any, errors: list, warnings: list) -> dict:
    out = Path(cfg.output_path)
    final = out / f"{cfg.output_name}.safetensors"
    info: dict[str, Any] = {"path": str(out), "exists": out.exists(), "writable": False,
                            "free_bytes": None, "final_lora": str(final), "final_lora_exists": final.exists()}
    if out.exists() and not out.is_dir():
        errors.append(_issue("output_not_writable", "output_path", f"{out} exists and is not a folder"))
        return info
    anchor = _nearest_existing(out)
    if not anchor.is_dir():
        errors.append(_issue("output_not_writable", "output_path", f"{anchor} is a file, so {out} cannot be created"))
        return info
    writable, why = probe_writable(anchor)
    info["writable"] = writable
    info["tested_in"] = str(anchor)
    if not writable:
        what = "the output folder" if anchor == out else f"{anchor}, where {out} would be created,"
        errors.append(_issue("output_not_writable", "output_path", f"cannot write to {what}: {why}",
                             hint="choose a folder you can write to, or fix its permissions"))
    try:
        free = shutil.disk_usage(anchor).free
        info["free_bytes"] = free
        info["free_gib"] = round(free / 1024 ** 3, 2)
        if free < LOW_DISK_BYTES:
            warnings.append(_issue("low_disk_space", "output_path",
                                   f"only {free / 1024 ** 3:.2f} GiB free at {anchor}; checkpoints and latent caches may not fit",
                                   hint="free space, lower checkpoints_total_limit, or choose another output_path"))
    except OSError:
        pass
    if info["final_lora_exists"] and not cfg.overwrite_output:
        errors.append(_issue("output_exists", "overwrite_output", f"{final} already exists",
                             hint="set overwrite_output to true, or choose another output_name"))
    return info


# ---------------------------------------------------------------------------------- dataset

def _files(records: Iterable[ImageRecord], detail: bool = False) -> list[str]:
    if detail:
        return [f"{r.rel_path}: {r.problem['message']}" for r in records]
    return [r.rel_path for r in records]


def _steps(cfg: Any, scan: DatasetScan, buckets: list | None) -> dict:
    samples = scan.samples_per_epoch
    plan = bucket_plan(scan.usable, buckets, cfg.batch_size) if buckets is not None else None
    batches = plan["total_batches"] if plan else math.ceil(samples / cfg.batch_size)
    steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
    if cfg.num_epochs is not None:
        epochs, total = cfg.num_epochs, cfg.num_epochs * steps_per_epoch
    else:
        total = cfg.max_train_steps
        epochs = math.ceil(total / steps_per_epoch) if steps_per_epoch else None
    return {"batches_per_epoch": batches, "steps_per_epoch": steps_per_epoch, "num_epochs": epochs,
            "total_steps": total, "bucket_plan": plan}


def _check_dataset(cfg: Any, family: str | None, prediction: str | None, errors: list, warnings: list,
                   verify: bool, deep: bool) -> tuple[dict, DatasetScan | None]:
    resolution, bucketing = resolve_training_shape(cfg, family, prediction)
    info: dict[str, Any] = {"path": str(cfg.dataset_path), "resolution": resolution, "bucketing": bucketing,
                            "resolution_source": "config" if cfg.resolution is not None else
                            (f"{family} default" if family else "assumed (model family unknown)")}
    try:
        scan = scan_dataset(cfg, verify=verify, deep=deep, resolution=resolution, bucketing=bucketing)
    except FileNotFoundError:
        errors.append(_issue("dataset_missing", "dataset_path", f"dataset folder {cfg.dataset_path} does not exist"))
        return info, None
    except NotADirectoryError:
        errors.append(_issue("dataset_missing", "dataset_path", f"{cfg.dataset_path} is a file, not a folder"))
        return info, None
    info.update(images=len(scan.records), usable=len(scan.usable), bad=len(scan.bad),
                without_caption=len(scan.without_caption), missing_trigger=len(scan.missing_trigger),
                too_small=len(scan.too_small), samples_per_epoch=scan.samples_per_epoch,
                folders=scan.folders, ignored_files=scan.ignored_files, fingerprint=scan.fingerprint)
    if not scan.records:
        hint = "images must be .png, .jpg, .jpeg, .webp or .bmp"
        if not cfg.recursive and any(p.is_dir() for p in Path(cfg.dataset_path).iterdir()):
            hint += "; recursive is false and there are sub-folders"
        errors.append(_issue("dataset_empty", "dataset_path", f"no images in {cfg.dataset_path}"
                             + (f" ({_plural(scan.ignored_files, 'other file')})" if scan.ignored_files else ""), hint=hint))
        return info, scan
    if scan.bad:
        codes = sorted({r.problem["code"] for r in scan.bad})
        issue = _issue("image_unreadable", "dataset_path",
                       f"{_plural(len(scan.bad), 'image')} cannot be used and will be skipped ({', '.join(codes)})",
                       files=_files(scan.bad, detail=True))
        warnings.append(issue)  # alone never fatal: no_usable_images below is the error
    if not scan.usable:
        errors.append(_issue("no_usable_images", "dataset_path", f"none of the {len(scan.records)} images can be read"))
        return info, scan
    if scan.without_caption:
        warnings.append(_issue("caption_missing", "caption_extension",
                               f"{_plural(len(scan.without_caption), 'image')} have no (or an empty) {cfg.caption_extension} caption; "
                               f"they train on the trigger words alone", files=_files(scan.without_caption)))
    if scan.missing_trigger and not cfg.prepend_trigger_words:
        warnings.append(_issue("trigger_missing", "prepend_trigger_words",
                               f"{_plural(len(scan.missing_trigger), 'caption')} lack a trigger word and prepend_trigger_words is false",
                               hint="add the trigger words to the captions or set prepend_trigger_words to true",
                               files=[f"{r.rel_path}: missing {', '.join(r.missing_triggers)}" for r in scan.missing_trigger]))
    if scan.caption_warnings:
        warnings.append(_issue("caption_encoding", "caption_extension",
                               f"{_plural(len(scan.caption_warnings), 'caption file')} are not clean UTF-8 (decoded best-effort)",
                               files=[f"{p}: {w}" for p, w in scan.caption_warnings]))
    if scan.too_small:
        rule = ("do not cover their bucket" if bucketing else f"have a shorter side below {resolution} px")
        warnings.append(_issue("image_too_small", "resolution",
                               f"{_plural(len(scan.too_small), 'image')} {rule} and will be upscaled (blurrier training data)",
                               files=[f"{r.rel_path}: {r.width}x{r.height}" for r in scan.too_small]))
    buckets = None
    if bucketing:
        try:
            buckets = make_buckets(resolution, cfg.min_bucket_resolution, cfg.max_bucket_resolution)
        except ValueError as exc:
            errors.append(_issue("config_invalid", "resolution", f"no aspect-ratio buckets possible: {exc}"))
    info.update(_steps(cfg, scan, buckets))
    return info, scan


# ---------------------------------------------------------------------------------- model

def _check_single_file_config(cfg: Any, probe: ModelProbe, errors: list, warnings: list) -> dict | None:
    """A single-file checkpoint holds weights only: its component configs and tokenizers come from
    base_model_config (a diffusers folder or hub id) or else diffusers' default repo for the family. Checked here
    so that an offline machine learns it before training, not after loading gigabytes."""
    if probe.kind != "single_file" or probe.problems or probe.family is None:
        return None
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


def _weight_ndims(root: Path, files: Iterable[str]) -> dict[str, int]:
    """module path -> rank of its weight, from safetensors headers only (no tensor data is read)."""
    dims: dict[str, int] = {}
    for rel in files:
        if rel.endswith(".safetensors"):
            header, _ = read_safetensors_header(root / rel)
            for key, info in (header or {}).items():
                if key.endswith(".weight") and isinstance(info, dict):
                    dims[key[: -len(".weight")]] = len(info.get("shape") or ())
    return dims


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


def _check_family_keys(cfg: Any, family: str | None, variant: str | None, errors: list) -> dict | None:
    """Options of one objective on a family of the other, and family-specific keys on a family without the
    feature, are config errors naming the key (the schema cannot know the family). Returns the objective summary."""
    spec = SPECS.get(family or "")
    if spec is None:
        return None
    ex = cfg.explicit_keys

    def refuse(key: str, why: str, allowed: str) -> None:
        errors.append(_issue("config_invalid", key, f"{key}: {why}", value=getattr(cfg, key), allowed=allowed))

    if spec.is_flow:
        for key in DDPM_KEYS:
            if key in ex and getattr(cfg, key) not in (None, 0, 0.0, "auto"):
                refuse(key, f"{spec.label} trains with flow matching; {key} is a DDPM (SD1.x/SD2.x/SDXL) option",
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
    if "max_sequence_length" in ex and cfg.max_sequence_length is not None and not spec.max_sequence_length:
        refuse("max_sequence_length", f"{spec.label} has no T5 text encoder", "null")
    if cfg.resolution is not None and cfg.resolution % spec.pixel_multiple:
        m = spec.pixel_multiple
        errors.append(_issue("config_invalid", "resolution", f"{spec.label} needs image sides that are multiples of "
                             f"{m} px (VAE downsampling x the denoiser's patch size)", value=cfg.resolution,
                             allowed=f"a multiple of {m}, e.g. {max(m, cfg.resolution // m * m)}"))
    return objective_summary(cfg, spec)


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


# ---------------------------------------------------------------------------------- entry point

def run_preflight(cfg: Any, config_warnings: Iterable[dict] = (), *, verify: bool = True,
                  deep: bool = False) -> PreflightResult:
    """Run every check; never raises for a problem with the inputs (they are reported instead)."""
    t0 = time.perf_counter()
    errors: list[dict] = []
    warnings: list[dict] = [dict(w) for w in config_warnings]

    # The model is probed first (its family decides resolution and bucketing) but reported after the
    # dataset, so that the first error is the most basic one.
    probe = probe_model(cfg.base_model, cfg.base_dir, model_type=cfg.model_type)
    family = probe.family or (cfg.model_type if cfg.model_type != "auto" else None)
    prediction = probe.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type
    if prediction is None and probe.kind == "single_file" and family == "sd2" and not cfg.base_model_config:
        warnings.append(_issue("prediction_type_unknown", "prediction_type",
                               "SD2 single-file checkpoints do not record their prediction type; diffusers assumes "
                               "v_prediction (stable-diffusion-2-1, 768 px)",
                               hint="set prediction_type to \"epsilon\" for a 512-base SD2 checkpoint, or to "
                                    "\"v_prediction\" to silence this"))
    dataset_info, scan = _check_dataset(cfg, family, prediction, errors, warnings, verify, deep)
    errors.extend(_model_issue(p) for p in probe.problems)
    warnings.extend(_model_issue(p) for p in probe.warnings)
    config_info = _check_single_file_config(cfg, probe, errors, warnings)
    objective_info = _check_family_keys(cfg, family, getattr(probe, "variant", None), errors)
    _check_targets(cfg, probe, errors)
    if getattr(cfg, "init_lora", None):
        from .init_lora import header_problems

        errors.extend(dict(p, code="init_lora_mismatch") for p in header_problems(
            cfg.resolve(cfg.init_lora), rank=cfg.lora_rank, use_dora=cfg.use_dora))
    output_info = _check_output(cfg, errors, warnings)
    resume_info = _check_resume(cfg, errors, warnings)

    summary = {
        "dataset": dataset_info,
        "model": {**_model_summary(probe), **({"config": config_info} if config_info else {}),
                  **({"objective": objective_info} if objective_info else {})},
        "output": output_info,
        "resume": resume_info,
        "duration_s": round(time.perf_counter() - t0, 3),
    }
    return PreflightResult(ok=not errors, errors=errors, warnings=warnings, summary=summary, scan=scan, probe=probe)


def raise_for_preflight(pre: "PreflightResult") -> None:
    """Map the first preflight error to the documented error class (and so the exit code)."""
    from .errors import ConfigError, DatasetError, ModelLoadError, OutputError

    first = pre.errors[0]
    details = {"problems": pre.errors}
    if pre.exit_code == EXIT_DATASET:
        raise DatasetError(first["message"], hint=first.get("hint"), details=details)
    if pre.exit_code == EXIT_MODEL_LOAD:
        raise ModelLoadError(first["message"], hint=first.get("hint"), details=details)
    if pre.exit_code == EXIT_IO:
        raise OutputError(first["message"], hint=first.get("hint"), details=details)
    raise ConfigError(f"{len(pre.errors)} problem(s) found before training: {first['message']}", pre.errors,
                      hint="run with --validate-only for the full report")
