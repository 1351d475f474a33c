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
OVERRIDES = ("repeats", "caption_extension", "resolution", "batch_size", "recursive")
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
        return {"path": str(self.path), "role": self.role, **dict(self.overrides), "class_prompt": self.class_prompt,
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
    return dataclasses.replace(cfg, dataset_path=entry.path, datasets=(), **dict(entry.overrides),
                               **({"trigger_words": ()} if entry.is_reg else {}))


def config_problems(cfg: Any, problems: list[dict], warnings: list[dict], problem, within, resolution_problems) -> None:
    """Cross-field rules of `dataset_path` / `datasets` (config.py passes its helpers in: no import cycle)."""
    if cfg.dataset_path is None and not cfg.datasets:
        problems.append(problem("dataset_path", None, "'dataset_path' is required (or a 'datasets' list)",
                                "a folder of images, or datasets: [{\"path\": ...}, ...]"))
    if cfg.dataset_path is not None and cfg.datasets:
        problems.append(problem("datasets", f"{len(cfg.datasets)} entries", "give dataset_path or datasets, not both",
                                "move dataset_path into datasets as {\"path\": ..., \"role\": \"train\"}"))
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


def plan_epoch(images: Iterable, batch_sizes: int | dict[int, int], seed: int, epoch: int) -> list[list[int]]:
    """Batches of image indices for one epoch, each from one bucket of one dataset (tensors must stack, and a
    dataset may have its own resolution and batch size), all datasets' batches shuffled together.

    Train images appear ``repeats`` times. Regularisation images fill as many samples as the train images do
    (sd-scripts' balance): their pool (each image ``repeats`` times, in dataset order) is read cyclically from
    where the last epoch stopped, so a large set is used in turn and a small one repeats. With one train dataset
    this is data.images.plan_epoch exactly (same draws from the same RNG), so a `dataset_path` run's plan and its
    old checkpoints are unchanged. A pure function of (seed, epoch), as exact resume needs.
    """
    images = list(images)
    size = (lambda d: batch_sizes) if isinstance(batch_sizes, int) else batch_sizes.__getitem__
    rng = random.Random(f"plan:{seed}:{epoch}")
    by_group: dict[tuple[int, tuple[int, int]], list[int]] = {}
    train = [img for img in images if img.role != REG]
    for img in train:
        by_group.setdefault((img.dataset, img.bucket), []).extend([img.index] * img.repeats)
    pool = [img for img in images if img.role == REG for _ in range(img.repeats)]
    if pool:
        wanted = sum(img.repeats for img in train)
        start = epoch * wanted
        for k in range(wanted):
            img = pool[(start + k) % len(pool)]
            by_group.setdefault((img.dataset, img.bucket), []).append(img.index)
    batches: list[list[int]] = []
    for group in sorted(by_group):
        idx = by_group[group]
        rng.shuffle(idx)
        step = size(group[0])
        batches.extend(idx[i:i + step] for i in range(0, len(idx), step))
    rng.shuffle(batches)
    return batches


def fingerprint(entries: list[tuple[DatasetEntry, Any]], cfg: Any) -> str:
    """What resume compares for a `datasets` run: every entry's role and the settings that shape its epoch plan or
    its loss, with its scan's fingerprint (files, sizes, mtimes, captions)."""
    h = hashlib.sha256()
    for e, scan in entries:
        settings = [e.role, e.class_prompt, e.loss_weight] + [e.setting(cfg, k) for k in OVERRIDES]
        h.update(json.dumps(settings, default=str).encode() + b"\0" + scan.fingerprint.encode() + b"\n")
    return h.hexdigest()
