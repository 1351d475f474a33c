"""The dataset scan's index: a rerun reuses what it learnt about unchanged files and reads every changed one;
worker processes give the same scan as one process."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lora_trainer.preflight import dataset_scan as ds
from lora_trainer.preflight.dataset_scan import scan_dataset
from lora_trainer.preflight.run import run_preflight
from lora_trainer.preflight.scan_index import ScanIndex
from tests.test_dataset_scan import cfg_for, encoded, write
from tests.test_preflight import standin_model


def _dataset(root: Path, n: int = 6) -> Path:
    for i in range(n):
        write(root / f"img_{i}.png", encoded("PNG", 96 + 8 * (i % 3), 64))
        write(root / f"img_{i}.txt", f"ohwx, tag{i}")
    write(root / "bad.png", b"not a png at all")
    return root


def _view(scan) -> list:
    fields = ("rel_path", "width", "height", "mode", "format", "file_size", "caption", "problem", "caption_warnings")
    return [tuple(getattr(r, f) for f in fields) for r in scan.records] + [scan.fingerprint]


def test_rerun_reuses_unchanged_files_and_rereads_changed_ones(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "data")
    cfg = cfg_for(tmp_path, data)
    index_path = tmp_path / "index.json"
    first = scan_dataset(cfg, index=(idx := ScanIndex(index_path, {"verify": True})))
    assert idx.hits == 0
    idx.save()

    inspected = []
    real = ds._inspect_image
    monkeypatch.setattr(ds, "_inspect_image", lambda p, *a, **k: inspected.append(p.name) or real(p, *a, **k))
    again = scan_dataset(cfg, index=(idx := ScanIndex(index_path, {"verify": True})))
    assert inspected == [] and idx.hits == 7
    assert _view(again) == _view(first)

    # Same size, mtime put back: only the ctime (which user space cannot set) tells the change.
    target = data / "img_1.png"
    st = target.stat()
    new = encoded("PNG", 96 + 8, 72)
    new = new[:st.st_size] if len(new) >= st.st_size else new + b"\0" * (st.st_size - len(new))
    target.write_bytes(new)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    (data / "img_2.txt").write_text("ohwx, recaptioned")
    idx.save()
    third = scan_dataset(cfg, index=(idx := ScanIndex(index_path, {"verify": True})))
    assert inspected == ["img_1.png"]
    recs = {r.rel_path: r for r in third.records}
    assert recs["img_2.png"].caption == "ohwx, recaptioned" and third.fingerprint != first.fingerprint
    assert recs["img_1.png"].height == 72 or recs["img_1.png"].problem is not None

    # Other scan options (a deep scan finds more) never reuse the index.
    assert ScanIndex(index_path, {"verify": True, "deep": True}).images == {}


def test_workers_give_the_same_scan(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "data", n=12)
    cfg = cfg_for(tmp_path, data)
    serial = scan_dataset(cfg, workers=1)
    monkeypatch.setattr(ds, "PARALLEL_MIN_FILES", 1)
    parallel = scan_dataset(cfg, workers=2)
    assert _view(parallel) == _view(serial)


def test_validate_only_keeps_the_index_in_the_output_cache(tmp_path):
    data = _dataset(tmp_path / "data")
    model = standin_model(tmp_path / "model")
    cfg = dataclasses.replace(cfg_for(tmp_path, data), base_model=str(model))
    first = run_preflight(cfg)
    assert first.summary["dataset"]["index"]["reused"] == 0
    assert first.summary["output"]["exists"] is False  # reported as the user left it; the index is written after
    assert (tmp_path / "out" / "cache" / "dataset_index.json").is_file()
    second = run_preflight(cfg)
    assert second.summary["dataset"]["index"] == {**first.summary["dataset"]["index"], "reused": 7, "inspected": 0}
    assert second.summary["dataset"]["fingerprint"] == first.summary["dataset"]["fingerprint"]


def test_the_validation_summary_stays_bounded(tmp_path):
    from lora_trainer.preflight.run import MAX_FOLDERS
    from lora_trainer.preflight.model_checks import MAX_FILES

    data = tmp_path / "data"
    png = encoded("PNG", 64, 64)
    for i in range(MAX_FOLDERS + 5):
        write(data / f"f{i:03d}" / "a.png", png)
        write(data / f"f{i:03d}" / "b.png", b"broken")
    cfg = dataclasses.replace(cfg_for(tmp_path, data), base_model=str(standin_model(tmp_path / "model")))
    r = run_preflight(cfg)
    d = r.summary["dataset"]
    assert len(d["folders"]) == MAX_FOLDERS and d["folder_count"] == MAX_FOLDERS + 5  # counts stay complete
    bad = next(w for w in r.warnings if w["code"] == "image_unreadable")
    assert len(bad["files"]) == MAX_FILES and bad["count"] == MAX_FOLDERS + 5
