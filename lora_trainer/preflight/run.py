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

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..data.buckets import bucket_finder, bucket_plan, bucket_range, make_buckets
from ..data.datasets import build_run_images, run_counts
from .cache_plan import plan_caches, vae_config_of
from .video_plan import clip_frames, planned_frames, record_frames, scan_clip_frames
from .video_scan import takes_clips
from .checkpoints import pick_resume, quick_check, read_manifest, rejection_message
from .dataset_scan import DatasetScan, ImageRecord, resolve_training_shape, scan_dataset
from .eval_set import check_eval_set
from ..contract.errors import EXIT_CONFIG, EXIT_DATASET, EXIT_IO, EXIT_MODEL_LOAD, EXIT_OK
from .probe import ModelProbe, probe_model
from .scan_index import ScanIndex
from ..runtime.run_lock import active_holder, checkpoint_lineage, describe, lora_lineage
from .memory_checks import check_memory, check_offload_host, check_shard, detect_run_gpu
from .model_checks import (MAX_FILES, _check_family_keys, _check_single_file_config, _check_targets,  # noqa: F401
                              _check_validation_model, _check_video_samples,
                              _issue, _model_issue, _model_summary)

LOW_DISK_BYTES = 2 * 1024 ** 3
CHECKPOINT_DIR = "checkpoints"
MAX_FOLDERS = 100  # folders listed in the summary (a 100,000-image dataset may have thousands); folder_count has all

_EXIT_BY_CODE = {
    "dataset_missing": EXIT_DATASET, "dataset_empty": EXIT_DATASET, "no_usable_images": EXIT_DATASET,
    "model_not_found": EXIT_MODEL_LOAD, "model_pickle_refused": EXIT_MODEL_LOAD, "model_incomplete": EXIT_MODEL_LOAD,
    "model_corrupt": EXIT_MODEL_LOAD, "model_unsupported": EXIT_MODEL_LOAD, "model_config_missing": EXIT_MODEL_LOAD,
    "model_unreadable": EXIT_MODEL_LOAD, "eval_set_missing": EXIT_DATASET, "eval_set_empty": EXIT_DATASET,
    "output_not_writable": EXIT_IO,
    "mask_path_missing": EXIT_DATASET, "mask_missing": EXIT_DATASET,
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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------------- checkpoints

def _check_resume(cfg: Any, errors: list, warnings: list) -> dict:
    if cfg.resume is False or cfg.resume is None:
        return {"mode": "off"}
    if cfg.resume == "auto":
        pick = pick_resume(Path(cfg.output_path) / CHECKPOINT_DIR)
        latest = pick["checkpoint"]
        for bad in pick["rejected"]:
            warnings.append(_issue("checkpoint_rejected", "resume",
                                   rejection_message(Path(bad["checkpoint"]), bad["reason"], latest),
                                   files=[bad["checkpoint"]],
                                   hint="delete or repair it; resume: \"auto\" skips it either way"))
        return {"mode": "auto", "found": latest is not None, "checkpoint": str(latest) if latest else None,
                "step": pick["step"], "incomplete": pick["incomplete"], "rejected": pick["rejected"],
                "action": "resume" if latest else "fresh start"}
    p = cfg.resolve(str(cfg.resume))
    info = {"mode": "path", "checkpoint": str(p), "found": False, "step": None}
    if not p.is_dir():
        errors.append(_issue("resume_not_found", "resume", f"checkpoint folder {p} does not exist",
                             hint="use \"auto\" to pick the newest checkpoint, or false to start fresh"))
        return info
    ok, reason = quick_check(p)
    if not ok:
        errors.append(_issue("resume_not_found", "resume", f"{p} is not a usable checkpoint: {reason}",
                             hint="point resume at an earlier step-NNNNNN folder, or use \"auto\""))
    else:
        info.update(found=True, step=read_manifest(p)[0]["step"])
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


def _owner(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:
        return None


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
        what = "the output folder" if anchor == out else f"{anchor} (where {out} would be created)"
        owner = _owner(anchor)
        errors.append(_issue("output_not_writable", "output_path", f"cannot write to {what}: {why}",
                             hint="choose a folder you can write to, or fix its permissions"
                                  + (f"; it belongs to uid {owner} and this process runs as uid {os.getuid()} (in "
                                     f"Docker: docker run --user {owner}:...)" if owner is not None
                                     and hasattr(os, "getuid") and owner != os.getuid() else "")))
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
    holder = active_holder(out)
    if holder is not None and holder.get("pid") != os.getpid():
        info["in_use_by"] = holder
        warnings.append(_issue("output_in_use", "output_path",
                               f"{out} is in use by {describe(holder)}: training now would exit 8 (output_in_use)",
                               hint="wait for that run to finish, or choose another output_path"))
    if info["final_lora_exists"] and not cfg.overwrite_output:
        own = _own_checkpoint(cfg, final)
        if own is not None:
            info["final_lora_rewrite"] = {"checkpoint": str(own), "reason": "the LoRA is this run's (its lineage "
                                          "matches the checkpoint's): the retry finishes the run and rewrites it"}
        else:
            errors.append(_issue("output_exists", "overwrite_output", f"{final} already exists (from another run)",
                                 hint="set overwrite_output to true, or choose another output_name"))
    return info


def _own_checkpoint(cfg: Any, final: Path) -> Path | None:
    """The checkpoint a resume would load, when the existing final LoRA was written by the same run (lineage):
    a retry of a run killed while exporting, or one extended with more steps. None otherwise."""
    if cfg.resume is False or cfg.resume is None:
        return None
    if cfg.resume == "auto":
        folder = pick_resume(Path(cfg.output_path) / CHECKPOINT_DIR)["checkpoint"]
    else:
        folder = cfg.resolve(str(cfg.resume))
    lineage = lora_lineage(final)
    return folder if folder is not None and lineage and checkpoint_lineage(folder) == lineage else None


# ---------------------------------------------------------------------------------- dataset

def _files(records: Iterable[ImageRecord], detail: bool = False) -> list[str]:
    if detail:
        return [f"{r.rel_path}: {r.problem['message']}" for r in records]
    return [r.rel_path for r in records]


def _steps(cfg: Any, scan: Any, buckets: list | None, family: str | None, variant: str | None) -> dict:
    """Batches and steps an epoch as the trainer plans them: its TrainImages (a clip's (frames, w, h) bucket in the
    token budget) through its epoch plan (data/datasets.run_counts counts run_plan's batches, grouped by dataset
    and (frames, w, h))."""
    images = build_run_images(cfg, scan, scan.resolution, scan.bucketing, family, variant)
    batches, _ = run_counts(cfg, images, 0)  # len(run_plan(...)), counted without building it
    plan = bucket_plan(images, buckets, cfg.batch_size) if buckets is not None else None
    steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
    if cfg.num_epochs is not None:
        epochs, total = cfg.num_epochs, cfg.num_epochs * steps_per_epoch
    else:
        total = cfg.max_train_steps
        epochs = math.ceil(total / steps_per_epoch) if steps_per_epoch else None
    return {"batches_per_epoch": batches, "steps_per_epoch": steps_per_epoch, "num_epochs": epochs,
            "total_steps": total, "bucket_plan": plan}


def _audit_videos(cfg: Any, scan: DatasetScan, info: dict, warnings: list) -> None:
    """Video clips beside the images: their headers audited (preflight/video_scan.py: no frame decoded past the
    first), the result in ``info["videos"]``; broken or too-short clips are listed. A family that trains clips has
    them in its scan already (records, the bad ones skipped); an image family's scan ignores them: audited here, and
    skipped with video_not_trained."""
    from .video_scan import audit_clips, video_files

    audit = scan.videos
    if audit is None:
        clips = video_files(cfg.dataset_path, recursive=cfg.recursive) if scan.ignored_files else []
        if not clips:
            return
        audit = audit_clips(clips, target_fps=cfg.video_fps, frames=cfg.video_frames, short_clip=cfg.video_short_clip)
    elif not audit.records:
        return
    info["videos"] = audit.summary()
    if audit.bad:
        codes = sorted({r.problem["code"] for r in audit.bad})
        warnings.append(_issue("video_unreadable", "dataset_path",
                               f"{_plural(len(audit.bad), 'video clip')} cannot be used and will be skipped "
                               f"({', '.join(codes)})",
                               files=[f"{r.rel_path}: {r.problem['message']}" for r in audit.bad]))
    if audit.usable and scan.videos is None:
        warnings.append(_issue("video_not_trained", "dataset_path",
                               f"{_plural(len(audit.usable), 'video clip')} audited and skipped: this model family "
                               "trains on images (a video family, Wan, trains clips; a clip's frames saved as images "
                               "train here)",
                               files=[r.rel_path for r in audit.usable]))


def _check_dataset(cfg: Any, family: str | None, prediction: str | None, errors: list, warnings: list,
                   verify: bool, deep: bool, index: ScanIndex | None = None,
                   variant: str | None = None) -> tuple[dict, DatasetScan | None]:
    resolution, bucketing = resolve_training_shape(cfg, family, prediction)
    info: dict[str, Any] = {"path": str(cfg.dataset_path), "resolution": resolution, "bucketing": bucketing,
                            "resolution_source": "config" if cfg.resolution is not None else
                            (f"{family} default" if family else "assumed (model family unknown)")}
    try:
        scan = scan_dataset(cfg, verify=verify, deep=deep, resolution=resolution, bucketing=bucketing, index=index,
                            family=family)
    except FileNotFoundError:
        errors.append(_issue("dataset_missing", "dataset_path", f"dataset folder {cfg.dataset_path} does not exist"))
        return info, None
    except NotADirectoryError:
        errors.append(_issue("dataset_missing", "dataset_path", f"{cfg.dataset_path} is a file, not a folder"))
        return info, None
    info.update(images=len(scan.records), usable=len(scan.usable), bad=len(scan.bad),
                without_caption=len(scan.without_caption), missing_trigger=len(scan.missing_trigger),
                too_small=len(scan.too_small), samples_per_epoch=scan.samples_per_epoch,
                folders=dict(list(scan.folders.items())[:MAX_FOLDERS]), folder_count=len(scan.folders),
                ignored_files=scan.ignored_files, fingerprint=scan.fingerprint,
                index={"path": str(index.path) if index and index.path else None,
                       "reused": index.hits if index else 0,
                       "inspected": len(scan.records) - (index.hits if index else 0)})
    _audit_videos(cfg, scan, info, warnings)
    if scan.videos is not None:
        info["clips"] = sum(r.clip is not None for r in scan.usable)
    if not scan.records:
        hint = "images must be .png, .jpg, .jpeg, .webp or .bmp"
        if not cfg.recursive and any(p.is_dir() for p in Path(cfg.dataset_path).iterdir()):
            hint += "; recursive is false and there are sub-folders"
        errors.append(_issue("dataset_empty", "dataset_path", f"no images in {cfg.dataset_path}"
                             + (f" ({_plural(scan.ignored_files, 'other file')})" if scan.ignored_files else ""), hint=hint))
        return info, scan
    bad_images = [r for r in scan.bad if r.clip is None]  # bad clips: video_unreadable above
    if bad_images:
        codes = sorted({r.problem["code"] for r in bad_images})
        issue = _issue("image_unreadable", "dataset_path",
                       f"{_plural(len(bad_images), 'image')} cannot be used and will be skipped ({', '.join(codes)})",
                       files=_files(bad_images, detail=True))
        warnings.append(issue)  # alone never fatal: no_usable_images below is the error
    if not scan.usable:
        errors.append(_issue("no_usable_images", "dataset_path", f"none of the {len(scan.records)} images can be read"))
        return info, scan
    if cfg.masked_loss:
        from .mask_scan import check_masks

        scan = check_masks(cfg, scan, info, errors, warnings)  # skips the images whose mask is unusable
        if not scan.usable:
            errors.append(_issue("no_usable_images", "dataset_path", "no image has a usable mask"))
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
    # held-out images out
    scan = check_eval_set(cfg, scan, info, errors, warnings, verify=verify, deep=deep, family=family)
    buckets = None
    if bucketing:
        try:
            buckets = make_buckets(resolution, *bucket_range(cfg.min_bucket_resolution, cfg.max_bucket_resolution,
                                                               resolution))
        except ValueError as exc:
            errors.append(_issue("config_invalid", "resolution", f"no aspect-ratio buckets possible: {exc}"))
    info.update(_steps(cfg, scan, buckets, family, variant))
    return info, scan




# ---------------------------------------------------------------------------------- entry point

def _plan_caches(cfg: Any, family: str | None, scan: DatasetScan | None, info: dict,
                 gpu: dict | None, probe: Any = None) -> dict | None:
    from ..data.captions import build_caption

    if scan is None or not scan.usable:
        return None
    res = info["resolution"]
    buckets = make_buckets(res, *bucket_range(cfg.min_bucket_resolution, cfg.max_bucket_resolution, res)) \
        if info["bucketing"] else None
    nearest = bucket_finder(buckets) if buckets else None
    shapes = [nearest(r.width, r.height) if nearest else (res, res) for r in scan.usable]
    # A video family's clips: as (w, h, frames), at the largest size (their spatial buckets are not planned here).
    shapes = [s + ((f,) if (f := record_frames(r)) > 1 else ()) for s, r in zip(shapes, scan.usable)]
    if not scan_clip_frames(scan):
        shapes += [(res, res, f) for f, n in clip_frames(family, info, scan).items() for _ in range(n)]
    built: dict = {}  # datasets repeat captions: build each distinct one once
    captions = [built[r.caption] if r.caption in built else built.setdefault(
        r.caption, build_caption(r.caption, cfg.trigger_words, prepend=cfg.prepend_trigger_words)) for r in scan.usable]
    return plan_caches(cfg, family, shapes, captions, vae_config=vae_config_of(getattr(probe, "path", None)),
                       device_free_bytes=gpu["free_bytes"] if gpu is not None and gpu.get("known", True) else None)


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
    from ..families import FAMILIES, get_signature

    if prediction is None and probe.kind == "single_file" and family in FAMILIES \
            and get_signature(family).file_prediction is None and not cfg.base_model_config:
        warnings.append(_issue("prediction_type_unknown", "prediction_type",
                               "SD2 single-file checkpoints do not record their prediction type; diffusers assumes "
                               "v_prediction (stable-diffusion-2-1, 768 px)",
                               hint="set prediction_type to \"epsilon\" for a 512-base SD2 checkpoint, or to "
                                    "\"v_prediction\" to silence this"))
    # A family that trains clips reads a GIF / WebP by its frame count (clip or image): its index is its own.
    clips = {"clips": True} if takes_clips(family) else {}
    index = ScanIndex.for_output(cfg.output_path, {"verify": verify, "deep": deep, **clips})
    if getattr(cfg, "datasets", ()):
        from .datasets import check_datasets

        dataset_info, scan = check_datasets(cfg, family, prediction, errors, warnings, verify, deep, index,
                                             _check_dataset, variant=probe.variant)
    else:
        dataset_info, scan = _check_dataset(cfg, family, prediction, errors, warnings, verify, deep, index,
                                            variant=probe.variant)
    errors.extend(_model_issue(p) for p in probe.problems)
    warnings.extend(_model_issue(p) for p in probe.warnings)
    config_info = _check_single_file_config(cfg, probe, errors, warnings)
    objective_info = _check_family_keys(cfg, family, getattr(probe, "variant", None), errors,
                                        files_read=bool(getattr(probe, "path", None)))
    _check_targets(cfg, probe, errors)
    _check_video_samples(cfg, family, errors, warnings)
    if getattr(cfg, "init_lora", None):
        from ..adapters.init_experts import expert_files, file_problems

        # a model with experts: each trained expert's own file (init_experts.py), every one checked
        files, problems = expert_files(cfg.resolve(cfg.init_lora), family, getattr(probe, "variant", None),
                                       getattr(cfg, "train_experts", None) or "both") if family else (None, [])
        errors.extend(dict(p, code="init_lora_mismatch") for p in problems)
        for path in ([cfg.resolve(cfg.init_lora)] if files is None else [] if problems else files.values()):
            errors.extend(dict(p, code="init_lora_mismatch") for p in file_problems(cfg, path, family))
    if getattr(cfg, "merge_lora", None):
        from ..runtime.merge_lora import header_problems as merge_problems

        errors.extend(dict(p, code="config_invalid") for p in merge_problems(cfg.resolve(cfg.merge_lora)))
    if getattr(cfg, "validation_base_model", None):
        _check_validation_model(cfg, family, errors, getattr(probe, "variant", None))
    output_info = _check_output(cfg, errors, warnings)
    resume_info = _check_resume(cfg, errors, warnings)
    gpu = detect_run_gpu(cfg)
    caches = _plan_caches(cfg, family, scan, dataset_info, gpu, probe)
    memory = check_memory(cfg, probe, family, dataset_info.get("resolution"), gpu, caches, errors, warnings,
                          frames=planned_frames(family, dataset_info, scan))
    check_offload_host(memory, warnings)
    check_shard(cfg, warnings)
    if output_info.get("writable"):
        index.save()  # after the output checks, which report the folder as the user left it

    summary = {
        "dataset": dataset_info,
        "model": {**_model_summary(probe), **({"config": config_info} if config_info else {}),
                  **({"objective": objective_info} if objective_info else {})},
        "output": output_info,
        "resume": resume_info,
        "caches": caches,
        "memory": memory,
        "duration_s": round(time.perf_counter() - t0, 3),
    }
    return PreflightResult(ok=not errors, errors=errors, warnings=warnings, summary=summary, scan=scan, probe=probe)


def raise_for_preflight(pre: "PreflightResult") -> None:
    """Map the first preflight error to the documented error class (and so the exit code)."""
    from ..contract.errors import ConfigError, DatasetError, ModelLoadError, OutputError

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
