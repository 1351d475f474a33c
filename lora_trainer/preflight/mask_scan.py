"""The masked-loss audit of ``--validate-only`` and of every run's preflight: which image has which mask, and which
masks cannot be used.

Per usable image: its mask source (data/masks.py find_mask), the mask's header (the dataset scan's own check:
unreadable, truncated, not an image), its size against the image's (another aspect ratio cannot be aligned and is
refused; another size of the same aspect is scaled), and whether it is all black (decoded: the one full read, done
on IO threads; with mask_min_value > 0 an all-black mask still trains at the floor and passes). An image whose mask
is unusable is skipped (warning ``mask_unusable``: training it unmasked would teach what the mask hides); an image
with no mask trains unmasked (warning ``mask_missing``), or is an error with require_masks.

The mask files' identities join the dataset fingerprint: a repainted mask is a changed dataset, so a resume across it
is refused as one across a replaced image is.
"""
from __future__ import annotations

import hashlib
import os
import warnings as pywarnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.masks import ALPHA, find_mask, read_mask
from .dataset_scan import IO_THREADS, _inspect_image
from .model_checks import _issue


@dataclass(frozen=True)
class MaskAudit:
    sources: dict[str, str | None]  # usable image's rel path -> mask file, ALPHA, or None
    missing: tuple[str, ...]  # rel paths of images without a mask
    unusable: tuple[tuple[str, str], ...]  # (rel path, why): skipped images
    scaled: tuple[tuple[str, str], ...]  # (rel path, "mask WxH, image WxH"): masks of another size, same aspect

    def summary(self) -> dict:
        kinds = [s for s in self.sources.values() if s is not None]
        return {"masked": len(kinds), "alpha": sum(s == ALPHA for s in kinds), "files": sum(s != ALPHA for s in kinds),
                "missing": len(self.missing), "unusable": len(self.unusable), "scaled": len(self.scaled)}


def _same_aspect(mw: int, mh: int, w: int, h: int) -> bool:
    # Within a pixel of rounding at the larger of the two sizes: a half-size mask of an odd-sized image passes.
    return abs(mw * h - mh * w) <= max(w, h, mw, mh)


def _check_one(job: tuple[str, str, int, int, float]) -> tuple[str | None, str | None]:
    """(problem or None, "scaled" note or None) of one image's mask."""
    source, image_path, w, h, floor = job
    if source != ALPHA:
        try:
            size = os.stat(source).st_size
        except OSError as exc:
            return f"mask {os.path.basename(source)} cannot be opened: {exc.strerror or exc}", None
        mw, mh, _mode, _fmt, _rot, problem = _inspect_image(Path(source), size, verify=True, deep=False)
        if problem is not None:
            return f"mask {os.path.basename(source)}: {problem['message']}", None
        if (mw, mh) != (w, h) and not _same_aspect(mw, mh, w, h):
            return f"mask {os.path.basename(source)} is {mw}x{mh}, another aspect ratio than the image's {w}x{h}", None
        note = f"mask {mw}x{mh}, image {w}x{h}" if (mw, mh) != (w, h) else None
    else:
        note = None
    if floor > 0:
        return None, note
    try:
        peak = read_mask(source, image_path).getextrema()[1]
    except Exception as exc:  # noqa: BLE001 - any decoder error makes the mask unusable
        return f"mask cannot be decoded: {type(exc).__name__}: {exc}", note
    if peak == 0:
        what = "the alpha channel is fully transparent" if source == ALPHA else "mask is all black"
        return f"{what}: nothing of this image would train", note
    return None, note


def _check_all(jobs: list) -> list:
    with pywarnings.catch_warnings():
        pywarnings.simplefilter("ignore")
        pywarnings.simplefilter("error", Image.DecompressionBombWarning)
        if len(jobs) < 2 * IO_THREADS:
            return [_check_one(j) for j in jobs]
        from concurrent.futures import ThreadPoolExecutor

        # PIL releases the GIL while it inflates: decoding masks on threads overlaps with reading them.
        with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="masks") as pool:
            return list(pool.map(_check_one, jobs, chunksize=max(1, len(jobs) // (IO_THREADS * 4))))


def _fingerprint(base: str, sources: dict[str, str | None]) -> str:
    h = hashlib.sha256(base.encode())
    for rel, source in sources.items():
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        if source is None or source == ALPHA:
            h.update(b"-\n" if source is None else b"a\n")
            continue
        try:
            st = os.stat(source)
            h.update(source.encode("utf-8", "surrogateescape") + b"\0%d\0%d\n" % (st.st_size, st.st_mtime_ns))
        except OSError:
            h.update(b"?\n")
    return h.hexdigest()


def check_masks(cfg: Any, scan: Any, info: dict, errors: list, warnings: list) -> Any:
    """Audit the masks of ``scan.usable``; returns the scan without the images whose mask is unusable and with the
    audit in ``scan.masks`` (what the trainer reads). Adds info["masks"]."""
    mask_root = None
    if cfg.mask_path:
        root = cfg.resolve(cfg.mask_path)
        if not root.is_dir():
            errors.append(_issue("mask_path_missing", "mask_path", f"mask folder {root} does not exist"
                                 + (" (it is a file)" if root.exists() else ""),
                                 hint="a folder mirroring dataset_path: the same sub-folders and file stems"))
            return scan
        ds = Path(cfg.dataset_path).resolve()
        if root.resolve() == ds or (cfg.recursive and ds in root.resolve().parents):
            errors.append(_issue("config_invalid", "mask_path", f"mask_path {root} is dataset_path or inside it: the "
                                 "masks would be read as training images",
                                 hint="a folder outside dataset_path, or sidecar <stem>-masklabel.png files"))
            return scan
        mask_root = str(root)
    cache: dict = {}
    sources = {r.rel_path: find_mask(r.rel_path, r.path, r.mode, mask_root=mask_root, alpha=cfg.alpha_mask,
                                     cache=cache) for r in scan.usable}
    masked = [r for r in scan.usable if sources[r.rel_path] is not None]
    results = _check_all([(sources[r.rel_path], r.path, r.width, r.height, float(cfg.mask_min_value))
                          for r in masked])
    unusable = tuple((r.rel_path, why) for r, (why, _) in zip(masked, results) if why is not None)
    scaled = tuple((r.rel_path, note) for r, (why, note) in zip(masked, results) if why is None and note)
    missing = tuple(r.rel_path for r in scan.usable if sources[r.rel_path] is None)

    if missing:
        how = "mask_path, a <stem>-masklabel.png sidecar" + (" or an alpha channel" if cfg.alpha_mask else "")
        issue = _issue("mask_missing", "require_masks" if cfg.require_masks else "mask_path",
                       f"{len(missing)} image(s) have no mask ({how})"
                       + ("" if cfg.require_masks else ": they train unmasked"),
                       hint="add their masks" + ("" if cfg.require_masks else ", or set require_masks to make this "
                                                                              "an error"), files=missing)
        (errors if cfg.require_masks else warnings).append(issue)
    if unusable:
        warnings.append(_issue("mask_unusable", "mask_path",
                               f"{len(unusable)} image(s) have a mask that cannot be used: they are skipped",
                               hint="fix or remove these masks", files=[f"{rel}: {why}" for rel, why in unusable]))
    if scaled:
        warnings.append(_issue("mask_scaled", "mask_path",
                               f"{len(scaled)} mask(s) differ in size from their image (same aspect ratio): scaled",
                               files=[f"{rel}: {note}" for rel, note in scaled]))
    skip = {rel for rel, _ in unusable}
    usable = tuple(r for r in scan.usable if r.rel_path not in skip)
    audit = MaskAudit(sources={r.rel_path: sources[r.rel_path] for r in usable}, missing=missing, unusable=unusable,
                      scaled=scaled)
    info["masks"] = {"mask_path": mask_root, "alpha_mask": bool(cfg.alpha_mask), **audit.summary()}
    fingerprint = _fingerprint(scan.fingerprint, {r.rel_path: sources[r.rel_path] for r in usable})
    info.update(usable=len(usable), samples_per_epoch=sum(r.repeats for r in usable), fingerprint=fingerprint)
    return scan.keeping(usable, fingerprint, masks=audit)
