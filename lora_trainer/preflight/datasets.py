"""`--validate-only` and the training preflight for a `datasets` run: each entry is scanned and audited exactly as
`dataset_path` is (run._check_dataset on the entry's config), its issues renamed to the entry (`datasets[1].path`,
`datasets[1].resolution` ...), and the entries are combined into one MultiScan the trainer builds its images from.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..data.datasets import OVERRIDES, DatasetEntry, build_run_images, entry_config, fingerprint, run_counts
from .dataset_scan import DatasetScan
from .model_checks import _issue
from .scan_index import ScanIndex


@dataclass(frozen=True)
class MultiScan:
    """The scans of every entry, in config order; read like a DatasetScan where the run needs one scan."""

    entries: tuple[tuple[DatasetEntry, DatasetScan], ...]
    fingerprint: str
    resolution: int  # the largest entry's: what the memory plan must fit
    bucketing: bool

    def _all(self, name: str) -> tuple:
        return tuple(r for _, scan in self.entries for r in getattr(scan, name))

    folder_held_out: tuple = ()  # eval_dataset_path's images (a split's are in each train entry's scan)

    @property
    def held_out(self) -> tuple:
        return self._all("held_out") + self.folder_held_out

    records = property(lambda self: self._all("records"))
    usable = property(lambda self: self._all("usable"))
    bad = property(lambda self: self._all("bad"))


class _EntryIndex:
    """The run's scan index seen by one entry: relative paths of different datasets must not share entries."""

    def __init__(self, index: ScanIndex | None, i: int):
        self.index, self.prefix = index or ScanIndex(None, {}), f"datasets[{i}]/"
        self.start = self.index.hits

    hits = property(lambda self: self.index.hits - self.start)  # this entry's
    path = property(lambda self: self.index.path)

    def image(self, rel, ident):
        return self.index.image(self.prefix + rel, ident)

    def caption(self, rel, ident):
        return self.index.caption(self.prefix + rel, ident)

    def knows_caption(self, rel):
        return self.index.knows_caption(self.prefix + rel)

    def put_image(self, rel, ident, result):
        self.index.put_image(self.prefix + rel, ident, result)

    def put_caption(self, rel, ident, text, warning):
        self.index.put_caption(self.prefix + rel, ident, text, warning)


def _rename(issue: dict, i: int, entry: DatasetEntry) -> dict:
    """An entry's issue, pointed at the key to fix: the entry's own where it sets (or could set) that key."""
    path = issue.get("path")
    if path == "dataset_path":
        path = f"datasets[{i}].path"
    elif path in OVERRIDES:
        path = f"datasets[{i}].{path}"
    return {**issue, "path": path, "message": f"datasets[{i}] ({entry.path.name}): {issue['message']}"}


def _reg_captions(i: int, entry: DatasetEntry, scan: DatasetScan, errors: list, warnings: list) -> None:
    """A regularisation image without a caption file trains on the class prompt; without one either it would
    train on an empty caption, which teaches the unconditional prediction instead of the class."""
    warnings[:] = [w for w in warnings if w["code"] != "caption_missing"]
    if scan.without_caption and entry.class_prompt is None:
        errors.append(_issue("class_prompt_missing", f"datasets[{i}].class_prompt",
                             f"datasets[{i}] ({entry.path.name}): {len(scan.without_caption)} regularisation image(s) "
                             "have no caption and the entry has no class_prompt",
                             hint="set class_prompt (e.g. \"photo of a woman\"), or add caption files",
                             files=[r.rel_path for r in scan.without_caption]))


def check_datasets(cfg: Any, family: str | None, prediction: str | None, errors: list, warnings: list,
                   verify: bool, deep: bool, index: ScanIndex | None, check_one,
                   variant: str | None = None) -> tuple[dict, MultiScan | None]:
    """Every entry through ``check_one`` (run._check_dataset, passed in: run imports this module)."""
    infos, scans = [], []
    for i, entry in enumerate(cfg.datasets):
        ecfg = entry_config(cfg, entry)
        errs: list[dict] = []
        warns: list[dict] = []
        info, scan = check_one(ecfg, family, prediction, errs, warns, verify, deep, _EntryIndex(index, i), variant)
        if scan is not None and entry.is_reg:
            _reg_captions(i, entry, scan, errs, warns)
        errors.extend(_rename(e, i, entry) for e in errs)
        warnings.extend(_rename(w, i, entry) for w in warns)
        # The run's plan (below) replaces the entry's own: a regularisation set's samples are balanced to the train's.
        info = {k: v for k, v in info.items() if k not in ("batches_per_epoch", "steps_per_epoch", "num_epochs",
                                                          "total_steps")}
        infos.append({"role": entry.role, "class_prompt": entry.class_prompt, "loss_weight": entry.loss_weight,
                      "batch_size": ecfg.batch_size, "repeats": ecfg.repeats, **info})
        if scan is None:
            continue
        scans.append((entry, scan))
    summary: dict[str, Any] = {"path": None, "datasets": infos,
                               "resolution": max((d["resolution"] for d in infos), default=None),
                               "bucketing": infos[0]["bucketing"] if infos else None}
    if len(scans) < len(cfg.datasets):  # a folder is missing: its error says so, there is nothing to combine
        return summary, None
    multi = _combine(cfg, scans, summary, family, variant)
    if getattr(cfg, "eval_dataset_path", None):
        from .eval_set import check_eval_folder

        held = check_eval_folder(cfg, [e.path for e in cfg.datasets], summary, errors, warnings, verify=verify,
                                 deep=deep, family=family)
        multi = dataclasses.replace(multi, folder_held_out=held or ())
    elif getattr(cfg, "eval_split", 0):
        summary["eval"] = {"source": "split", "fraction": cfg.eval_split, "images": len(multi.held_out),
                           "per_dataset": [d.get("eval", {}).get("images", 0) for d in infos]}
    return summary, multi


def _combine(cfg: Any, scans: list, summary: dict, family: str | None, variant: str | None) -> MultiScan:
    multi = MultiScan(entries=tuple(scans), fingerprint=fingerprint(scans, cfg), resolution=summary["resolution"],
                      bucketing=summary["bucketing"])
    summary.update(images=len(multi.records), usable=len(multi.usable), bad=len(multi.bad),
                   fingerprint=multi.fingerprint)
    # The trainer's images and epoch plan (clips grouped by their frames too), not a re-derivation of them.
    images = build_run_images(cfg, multi, multi.resolution, multi.bucketing, family, variant)
    if images:  # counted, not built and shuffled (data/datasets.run_counts)
        batches, samples = run_counts(cfg, images, 0)
        steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
        total = cfg.num_epochs * steps_per_epoch if cfg.num_epochs is not None else cfg.max_train_steps
        for d, info in enumerate(summary["datasets"]):
            info["samples_per_epoch"] = samples.get(d, 0)
        summary.update(samples_per_epoch=sum(samples.values()), batches_per_epoch=batches,
                       steps_per_epoch=steps_per_epoch, total_steps=total,
                       num_epochs=cfg.num_epochs or (math.ceil(total / steps_per_epoch) if steps_per_epoch else None))
    return multi
