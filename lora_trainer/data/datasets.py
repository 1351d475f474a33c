"""Several datasets in one run (the `datasets` config key): the entries, the config each one is scanned and built
with, how an epoch mixes train and regularisation batches, and the fingerprint that resume compares.

An entry overrides the data keys it names and inherits the rest from the top level, so a dataset is scanned, cached
and bucketed by the same code as ``dataset_path``, with ``entry_config(cfg, entry)`` standing in for the config. A
later per-dataset key (a mask folder, say) is one more name in OVERRIDES and in the schema's ``dataset_entry``.

Torch-free: ``--validate-only`` plans epochs with it.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

TRAIN, REG = "train", "regularization"
# Data keys an entry may set for itself (else the top-level value applies), in the order the README lists them.
OVERRIDES = ("repeats", "caption_extension", "resolution", "batch_size", "recursive", "mask_path", "alpha_mask",
             "require_masks")
ENTRY_KEYS = ("path", "role", *OVERRIDES, "class_prompt", "loss_weight")


@dataclass(frozen=True)
class DatasetEntry:
    path: Path
    role: str = TRAIN
    class_prompt: str | None = None
    loss_weight: float = 1.0
    overrides: tuple[tuple[str, Any], ...] = ()  # (key, value) for the OVERRIDES the entry sets

    @property
    def is_reg(self) -> bool:
        return self.role == REG

    def setting(self, cfg: Any, key: str) -> Any:
        return dict(self.overrides).get(key, getattr(cfg, key))

    def to_dict(self) -> dict[str, Any]:
        """The entry as a config file holds it (run_started.config, the manifest, settings_problems re-parse it)."""
        return {"path": str(self.path), "role": self.role, **dict(self.overrides),
                **({"class_prompt": self.class_prompt} if self.class_prompt is not None else {}),
                "loss_weight": self.loss_weight}


def parse_entries(raw: Iterable[dict] | None, base_dir: Path) -> tuple[DatasetEntry, ...]:
    """Schema-valid entry objects -> DatasetEntry (paths relative to the config file's folder)."""
    out = []
    for item in raw or ():
        p = Path(os.path.expanduser(item["path"]))
        out.append(DatasetEntry(path=p if p.is_absolute() else base_dir / p, role=item.get("role", TRAIN),
                                class_prompt=(item.get("class_prompt") or "").strip() or None,
                                loss_weight=float(item.get("loss_weight", 1.0)),
                                overrides=tuple((k, item[k]) for k in OVERRIDES if k in item)))
    return tuple(out)


def key_problems(raw: Any, problem) -> list[dict]:
    """Unknown keys inside entries, each named by its path with a did-you-mean (the schema check skips them)."""
    out = []
    for i, item in enumerate(raw if isinstance(raw, list) else ()):
        for key in item if isinstance(item, dict) else ():
            if key not in ENTRY_KEYS:
                close = difflib.get_close_matches(key, ENTRY_KEYS, n=1, cutoff=0.6)
                out.append(problem(f"datasets[{i}].{key}", item[key], f"unknown key '{key}' in a dataset entry"
                                   + (f"; did you mean '{close[0]}'?" if close else ""), ", ".join(ENTRY_KEYS)))
    return out


def entry_config(cfg: Any, entry: DatasetEntry) -> Any:
    """The config a dataset is scanned and built with: its overrides over the top level. A regularisation set has
    no trigger words (they are not prepended to its captions and none is missing from them)."""
    # A mask folder mirrors one dataset: never inherited (config_problems refuses a top-level one). The held-out
    # set is the run's: a folder is scanned once for all entries, a split is taken from each train entry.
    held_out = {"eval_dataset_path": None, **({"eval_split": 0.0} if entry.is_reg else {})}
    return dataclasses.replace(cfg, **{"dataset_path": entry.path, "datasets": (), "mask_path": None, **held_out,
                                       **dict(entry.overrides), **({"trigger_words": ()} if entry.is_reg else {})})


def config_problems(cfg: Any, problems: list[dict], warnings: list[dict], problem, within, resolution_problems) -> None:
    """Cross-field rules of `dataset_path` / `datasets` (config.py passes its helpers in: no import cycle)."""
    if cfg.dataset_path is None and not cfg.datasets:
        problems.append(problem("dataset_path", None, "'dataset_path' is required (or a 'datasets' list)",
                                "a folder of images, or datasets: [{\"path\": ...}, ...]"))
    if cfg.dataset_path is not None and cfg.datasets:
        problems.append(problem("datasets", f"{len(cfg.datasets)} entries", "give dataset_path or datasets, not both",
                                "move dataset_path into datasets as {\"path\": ..., \"role\": \"train\"}"))
    if cfg.datasets and getattr(cfg, "mask_path", None):
        problems.append(problem("mask_path", cfg.mask_path, "with datasets, each dataset names its own mask folder",
                                "move mask_path into the datasets entries it mirrors"))
    if cfg.datasets and not any(e.role == TRAIN for e in cfg.datasets):
        problems.append(problem("datasets", f"{len(cfg.datasets)} entries", "datasets has no train entry",
                                "at least one entry with role \"train\""))
    seen: dict[Path, int] = {}
    for i, e in enumerate(cfg.datasets):
        at = f"datasets[{i}]"
        if e.path in seen:
            problems.append(problem(f"{at}.path", str(e.path), f"the same folder as datasets[{seen[e.path]}]",
                                    "each folder once (repeats weights a dataset)"))
        seen.setdefault(e.path, i)
        if e.path == cfg.output_path or within(cfg.output_path, e.path) or within(e.path, cfg.output_path):
            problems.append(problem(f"{at}.path", str(e.path), "output_path is this dataset's folder, inside it or "
                                    "contains it: outputs would be read as images, or pruning could touch them",
                                    "an output_path outside every dataset folder"))
        if e.class_prompt is not None and not e.is_reg:
            warnings.append({"code": "unused_setting", "path": f"{at}.class_prompt",
                             "message": f"{at}.class_prompt applies to role \"regularization\" only"})
        if "resolution" in dict(e.overrides) and e.setting(cfg, "resolution") is not None:
            resolution_problems(entry_config(cfg, e), problems, f"{at}.resolution")


class PlanItem(NamedTuple):
    """What the epoch plan needs of an image (data.images.TrainImage has these fields too)."""
    index: int
    bucket: tuple[int, int]
    repeats: int
    dataset: int = 0
    role: str = TRAIN
    frames: int = 1


def plan_epoch(images: Iterable, batch_sizes: int | dict[int, int], seed: int, epoch: int) -> list[list[int]]:
    """Batches of image indices for one epoch, each from one bucket of one dataset (tensors must stack, and a
    dataset may have its own resolution and batch size), all datasets' batches shuffled together.

    Train images appear ``repeats`` times. Regularisation images fill as many samples as the train images do
    (sd-scripts' balance): their pool (each image ``repeats`` times, in dataset order) is read cyclically from
    where the last epoch stopped, so a large set is used in turn and a small one repeats. With one train dataset
    this is the plan data/images.py made before datasets existed (same draws from the same RNG; tests/test_datasets.py
    keeps that one as the reference), so a `dataset_path` run's plan and its old checkpoints are unchanged. A pure
    function of (seed, epoch), as exact resume needs.
    """
    size = _sizes(batch_sizes)
    rng = random.Random(f"plan:{seed}:{epoch}")
    by_group = _groups(images, epoch)
    batches: list[list[int]] = []
    for group in sorted(by_group):
        idx = by_group[group]
        rng.shuffle(idx)
        step = size(group[0])
        batches.extend(idx[i:i + step] for i in range(0, len(idx), step))
    rng.shuffle(batches)
    return batches


def epoch_counts(images: Iterable, batch_sizes: int | dict[int, int], epoch: int) -> tuple[int, dict[int, int]]:
    """(len(plan_epoch(...)), its samples per dataset) without building and shuffling it (--validate-only's step
    count on 100,000 images)."""
    size, batches, samples = _sizes(batch_sizes), 0, {}
    for (dataset, _), idx in _groups(images, epoch).items():
        batches += -(-len(idx) // size(dataset))
        samples[dataset] = samples.get(dataset, 0) + len(idx)
    return batches, samples


def _sizes(batch_sizes: int | dict[int, int]):
    return (lambda d: batch_sizes) if isinstance(batch_sizes, int) else batch_sizes.__getitem__


def _groups(images: Iterable, epoch: int) -> dict[tuple[int, tuple[int, ...]], list[int]]:
    """An epoch's samples (image indices, repeats included) by (dataset, (frames, w, h)), unshuffled."""
    images = list(images)
    by_group: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    train = [img for img in images if img.role != REG]
    # Grouped by (frames, w, h): a batch's tensors stack. Images (1 frame) sort as they did by (w, h) alone.
    for img in train:
        by_group.setdefault((img.dataset, _shape(img)), []).extend([img.index] * img.repeats)
    pool = [img for img in images if img.role == REG for _ in range(img.repeats)]
    if pool:
        wanted = sum(img.repeats for img in train)
        start = epoch * wanted
        for k in range(wanted):
            img = pool[(start + k) % len(pool)]
            by_group.setdefault((img.dataset, _shape(img)), []).append(img.index)
    return by_group


def _shape(img: Any) -> tuple[int, ...]:
    return (getattr(img, "frames", 1), *img.bucket)


def fingerprint(entries: list[tuple[DatasetEntry, Any]], cfg: Any) -> str:
    """What resume compares for a `datasets` run: every entry's role and the settings that shape its epoch plan or
    its loss, with its scan's fingerprint (files, sizes, mtimes, captions)."""
    h = hashlib.sha256()
    for e, scan in entries:
        settings = [e.role, e.class_prompt, e.loss_weight] + [e.setting(cfg, k) for k in OVERRIDES]
        h.update(json.dumps(settings, default=str).encode() + b"\0" + scan.fingerprint.encode() + b"\n")
    return h.hexdigest()


def run_plan(cfg: Any, images: list, epoch: int) -> list[list[int]]:
    """The run's epoch plan: plan_epoch with each dataset's batch size."""
    return plan_epoch(images, _run_sizes(cfg), cfg.seed, epoch)


def run_counts(cfg: Any, images: list, epoch: int) -> tuple[int, dict[int, int]]:
    """(len(run_plan(cfg, images, epoch)), its samples per dataset), counted (epoch_counts)."""
    return epoch_counts(images, _run_sizes(cfg), epoch)


def _run_sizes(cfg: Any) -> int | dict[int, int]:
    return {i: e.setting(cfg, "batch_size") for i, e in enumerate(cfg.datasets)} or cfg.batch_size


def build_run_images(cfg: Any, scan: Any, resolution: int, bucketing: bool, family: str | None = None,
                     variant: str | None = None) -> list:
    """The run's TrainImages: a `dataset_path` scan's as always; a MultiScan's per entry at the entry's resolution,
    a regularisation image's caption falling back to its class prompt. Torch-free: ``--validate-only`` plans its
    steps on these too. ``family`` / ``variant``: how a clip's tokens are counted (data/samples.clip_geometry)."""
    from .samples import clip_geometry, images_at

    geometry = clip_geometry(family, variant)
    if not getattr(scan, "entries", None):
        return images_at(cfg, scan.usable, resolution, bucketing, geometry)
    images: list = []
    for d, (entry, s) in enumerate(scan.entries):
        for img in images_at(cfg, s.usable, s.resolution, bucketing, geometry):
            caption = img.caption if not entry.is_reg or (img.caption or "").strip() else entry.class_prompt
            images.append(dataclasses.replace(
                img, index=len(images), dataset=d, role=entry.role, loss_weight=entry.loss_weight, caption=caption,
                triggers=() if entry.is_reg else None,
                folder=f"{entry.path.name}/{img.folder}" if img.folder else entry.path.name))
    return images


def loss_weights(by_index: dict, batch: list[int], device: Any):
    """The batch's per-sample dataset loss weights for objectives' LossWeights, or None when all are 1 (the
    objective then computes exactly what it did before datasets existed)."""
    weights = [by_index[i].loss_weight for i in batch]
    if all(w == 1.0 for w in weights):
        return None
    import torch

    from ..objectives.ddpm import LossWeights

    return LossWeights(samples=torch.tensor(weights, dtype=torch.float32, device=device))


def describe(cfg: Any, scan: Any, images: list) -> list[dict]:
    """Every dataset with its counts (run_started, the manifest, the model card): images it trains on and the
    samples it gives an epoch (a regularisation set's balanced share)."""
    pairs = list(scan.entries) if getattr(scan, "entries", None) else [(DatasetEntry(path=cfg.dataset_path), scan)]
    counts: dict[int, int] = {}
    by_index = {img.index: img for img in images}
    for batch in run_plan(cfg, images, 0):
        d = by_index[batch[0]].dataset
        counts[d] = counts.get(d, 0) + len(batch)
    return [{"path": str(e.path), "role": e.role, "images": sum(img.dataset == d for img in images),
             "samples_per_epoch": counts.get(d, 0), "resolution": s.resolution,
             "batch_size": e.setting(cfg, "batch_size"), "loss_weight": e.loss_weight, "class_prompt": e.class_prompt}
            for d, (e, s) in enumerate(pairs)]
