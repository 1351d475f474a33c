"""The held-out set of the validation loss (eval_* keys; training/eval_loss.py computes the loss): which images,
checked before torch is imported.

Either a folder (``eval_dataset_path``, scanned like the dataset) or a fraction of the dataset (``eval_split``). The
split ranks the usable images by a hash of (seed, relative path) and sets aside the first ones: a pure function of
the seed and the file list, and adding or removing one image does not reshuffle the others. The held-out images are
taken out of the training scan here, so every later stage (the step plan, the caches, the trainer) sees only the
training images, and the training scan's fingerprint names the split: a resume with another split is refused as a
dataset change.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Sequence

from .dataset_scan import DatasetScan, ImageRecord, scan_dataset
from .model_checks import _issue


def enabled(cfg: Any) -> bool:
    return bool(getattr(cfg, "eval_dataset_path", None) or getattr(cfg, "eval_split", 0))


def split_records(records: Sequence[ImageRecord], fraction: float, seed: int, cap: int
                  ) -> tuple[tuple[ImageRecord, ...], tuple[ImageRecord, ...]]:
    """(training, held out), each in scan order: round(fraction * n) images (at least 1, at most ``cap``)."""
    if not records or fraction <= 0:
        return tuple(records), ()
    count = min(cap, max(1, round(fraction * len(records))))
    rank = sorted(records, key=lambda r: hashlib.sha256(f"eval-split:{seed}:{r.rel_path}".encode(
        "utf-8", "surrogateescape")).hexdigest())
    held = {r.rel_path for r in rank[:count]}
    return tuple(r for r in records if r.rel_path not in held), tuple(r for r in records if r.rel_path in held)


def _within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except (ValueError, OSError):
        return False


def _scan_folder(cfg: Any, folder: Path, errors: list, warnings: list, verify: bool, deep: bool,
                 roots: list[Path], family: str | None = None) -> tuple[ImageRecord, ...] | None:
    key = "eval_dataset_path"
    inside = [r for r in roots
              if _within(folder, r) and (cfg.recursive or folder.resolve() == r.resolve())]
    if inside:
        errors.append(_issue("config_invalid", key, f"{folder} lies inside dataset_path: its images would be trained on",
                             hint="move the held-out images out of the dataset folder, or use eval_split"))
        return None
    try:
        # With the run's family: a video family's held-out clips are records as its training clips are.
        scan = scan_dataset(dataclasses.replace(cfg, dataset_path=folder), verify=verify, deep=deep, family=family)
    except (FileNotFoundError, NotADirectoryError):
        errors.append(_issue("eval_set_missing", key, f"held-out folder {folder} does not exist or is not a folder"))
        return None
    if scan.bad:
        warnings.append(_issue("eval_image_unreadable", key,
                               f"{len(scan.bad)} held-out image(s) cannot be used and are left out",
                               files=[f"{r.rel_path}: {r.problem['message']}" for r in scan.bad]))
    if not scan.usable:
        errors.append(_issue("eval_set_empty", key, f"no usable image in the held-out folder {folder}"
                             + (f" ({len(scan.records)} unreadable)" if scan.records else ""),
                             hint="add images (.png, .jpg, .jpeg, .webp, .bmp), or set eval_dataset_path to null"))
        return None
    return scan.usable


def _summary(cfg: Any, info: dict) -> dict[str, Any]:
    summary: dict[str, Any] = {"source": "folder" if cfg.eval_dataset_path else "split", "every_steps": cfg.eval_steps,
                               "timesteps": list(cfg.eval_timesteps) if cfg.eval_timesteps else "objective default",
                               "max_images": cfg.eval_max_images}
    info["eval"] = summary
    return summary


def check_eval_folder(cfg: Any, roots: list[Path], info: dict, errors: list, warnings: list, *, verify: bool,
                      deep: bool, family: str | None = None) -> tuple[ImageRecord, ...] | None:
    """The held-out folder (eval_dataset_path; none of the dataset folders ``roots`` may contain it): its images,
    capped at eval_max_images; None when it cannot be used (the problem is in ``errors``)."""
    folder = cfg.resolve(cfg.eval_dataset_path)
    summary = _summary(cfg, info)
    summary["path"] = str(folder)
    usable = _scan_folder(cfg, folder, errors, warnings, verify, deep, roots=roots, family=family)
    if usable is None:
        return None
    held = tuple(usable[:cfg.eval_max_images])
    summary.update(found=len(usable), images=len(held))
    return held


def check_eval_set(cfg: Any, scan: DatasetScan, info: dict, errors: list, warnings: list, *, verify: bool,
                   deep: bool, family: str | None = None) -> DatasetScan:
    """Resolve the held-out set: ``info["eval"]`` gets its counts, problems go to errors/warnings, and the returned
    scan is the training one (held-out images moved to ``held_out``). Unchanged without a held-out set."""
    if not enabled(cfg):
        return scan
    if cfg.eval_dataset_path:
        held = check_eval_folder(cfg, [Path(cfg.dataset_path)], info, errors, warnings, verify=verify, deep=deep,
                                 family=family)
        if held is None:
            return scan
        info["eval"]["training_images"] = len(scan.usable)
        return dataclasses.replace(scan, held_out=held)
    summary = _summary(cfg, info)
    train, held = split_records(scan.usable, cfg.eval_split, cfg.seed, cfg.eval_max_images)
    summary.update(fraction=cfg.eval_split, images=len(held), training_images=len(train),
                   files=[r.rel_path for r in held[:20]])
    if not train:
        errors.append(_issue("config_invalid", "eval_split",
                             f"eval_split {cfg.eval_split} sets aside all {len(held)} usable image(s): none left to train on",
                             hint="lower eval_split or eval_max_images, add images, or use eval_dataset_path"))
        return scan
    digest = hashlib.sha256(scan.fingerprint.encode())
    for r in held:
        digest.update(b"\0held-out\0" + r.rel_path.encode("utf-8", "surrogateescape"))
    info.update(samples_per_epoch=sum(r.repeats for r in train))
    return scan.keeping(train, digest.hexdigest(), held_out=held)
