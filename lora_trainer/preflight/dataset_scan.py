"""Walk the dataset folder once: every image's size, mode, caption and problems, without decoding pixels.

``--validate-only`` must answer in about a second for 1,000 images, so each image costs one ``open``:
PIL reads the header (size, mode), then the last few KiB are checked for the format's end marker
(PNG IEND, JPEG EOI, RIFF/BMP declared sizes). Only a file that fails that cheap check is decoded in
full, which separates a truncated download from a JPEG with data appended after its EOI (phones'
motion photos). Corruption in the middle of a file is only found with ``deep=True`` (a full decode);
the trainer skips such an image when it fails to load.

Video clips are records too where the family trains clips (preflight/video_scan.py reads their headers; a bad
clip is listed and skipped like a broken image); for an image family they are ignored files.

Order is deterministic (sorted names, depth first) so that sample order, bucket plans and the
fingerprint are the same on every machine.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..data import captions as cap
from ..data import video as V
from . import video_scan as VS
from .file_ends import cut_short, tail_problem
from .scan_index import ScanIndex, identity
from ..data.buckets import bucket_finder, bucket_range, make_buckets, upscale_factor
from ..data.masks import is_sidecar

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
# Modes the trainer's loader (data.to_rgb) turns into 8-bit RGB; it rescales 16-bit and float modes
# itself, since PIL's convert("RGB") would clip them to white. Keep the two in sync.
SUPPORTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                             "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
_REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")
# Reads in flight per scanning process: enough to keep an SSD's or a network filesystem's queue busy on a cold
# page cache (bench/bench_validate_only.py measures it), few enough that thread start-up stays negligible.
IO_THREADS = 16
PARALLEL_MIN_FILES = 4000  # below this, worker start-up costs more than it saves (2 cores: ~0.6 s vs 0.2 ms/file)

# Problem codes of a single image (ImageRecord.problem["code"]).
ZERO_BYTE = "zero_byte"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
DECOMPRESSION_BOMB = "decompression_bomb"
PERMISSION_DENIED = "permission_denied"
UNSUPPORTED_MODE = "unsupported_mode"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class ImageRecord:
    path: str  # absolute; a str, not a Path: building 200,000 Path objects was a tenth of a 100k-image scan
    rel_path: str  # POSIX, relative to the dataset root
    width: int | None  # after EXIF orientation (what the trainer sees after ImageOps.exif_transpose)
    height: int | None
    mode: str | None
    format: str | None  # PIL's name for the content ("JPEG" even if the file is named .png)
    file_size: int
    mtime_ns: int
    caption: str | None  # None: no caption file (or unreadable)
    caption_path: str | None
    caption_warnings: tuple[str, ...]
    repeats: int
    folder: str  # relative folder, "" for the root; the key of kohya's ss_tag_frequency
    missing_triggers: tuple[str, ...]
    problem: dict | None = None  # {"code", "message"}; None when usable
    exif_rotated: bool = False  # width/height were swapped for EXIF orientation 5..8
    clip: Any = None  # a video clip's preflight/video_scan.ClipRecord (header facts, frames it trains); None: image

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def has_caption(self) -> bool:
        return bool(self.caption and self.caption.strip())


@dataclass(frozen=True)
class DatasetScan:
    root: Path
    records: tuple[ImageRecord, ...]  # every image file found, usable or not, in scan order
    usable: tuple[ImageRecord, ...]
    bad: tuple[ImageRecord, ...]
    without_caption: tuple[ImageRecord, ...]  # usable images whose caption is missing or blank
    missing_trigger: tuple[ImageRecord, ...]  # usable images with a caption lacking >= 1 trigger word
    too_small: tuple[ImageRecord, ...]  # usable images training would enlarge (see _too_small)
    samples_per_epoch: int  # sum of repeats over usable images
    fingerprint: str  # sha256 hex; see _fingerprint
    resolution: int  # what too_small was judged against
    bucketing: bool
    folders: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> {images, usable, repeats}
    ignored_files: int = 0  # non-image, non-caption files
    caption_warnings: tuple[tuple[str, str], ...] = ()  # (rel caption path, warning)
    held_out: tuple[ImageRecord, ...] = ()  # the validation loss's images, never trained on (eval_set.py)
    masks: Any = None  # preflight/mask_scan.py MaskAudit, with masked_loss
    videos: Any = None  # preflight/video_scan.VideoAudit of the clips, where the family trains clips

    def keeping(self, usable: tuple[ImageRecord, ...], fingerprint: str, **changes: Any) -> "DatasetScan":
        """This scan with only ``usable`` (a subset of its usable records) left to train on, and the fingerprint
        of that choice: the per-image lists and the sample count follow (mask_scan's skips, eval_set's split)."""
        kept = {r.rel_path for r in usable}
        return replace(self, usable=usable, samples_per_epoch=sum(r.repeats for r in usable), fingerprint=fingerprint,
                       without_caption=tuple(r for r in self.without_caption if r.rel_path in kept),
                       missing_trigger=tuple(r for r in self.missing_trigger if r.rel_path in kept),
                       too_small=tuple(r for r in self.too_small if r.rel_path in kept), **changes)


def _problem(code: str, message: str) -> dict:
    return {"code": code, "message": message}


def _repeats_for(rel_dir_parts: tuple[str, ...], default: int) -> int:
    # The nearest kohya-style folder wins, so "5_style/10_char/x.png" trains x 10 times per epoch.
    for part in reversed(rel_dir_parts):
        m = _REPEATS_DIR.match(part)
        if m and int(m.group(1)) >= 1:
            return int(m.group(1))
    return default


def _walk(root: Path, recursive: bool, skip_dirs: set[str]):
    """Yield (dir_path, rel_parts, sorted non-hidden file entries, name lookup) depth first.

    Directory symlinks are followed (people link subsets in), with (dev, inode) guarding against loops.
    """
    seen: set[tuple[int, int]] = set()
    stack = [(root, ())]
    while stack:
        d, rel = stack.pop()
        try:
            st = os.stat(d)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            with os.scandir(d) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:
            continue
        files, subdirs = [], []
        for e in entries:
            try:
                if e.is_dir():
                    if recursive and os.path.realpath(e.path) not in skip_dirs:
                        subdirs.append(e)
                elif e.is_file():
                    files.append(e)
            except OSError:
                continue
        yield d, rel, files
        for e in reversed(subdirs):  # reversed: the stack pops them in sorted order
            stack.append((Path(e.path), rel + (e.name,)))


def _inspect_image(path: Path, size: int, *, verify: bool, deep: bool):
    """(width, height, mode, format, exif_rotated, problem)."""
    if size == 0:
        return None, None, None, None, False, _problem(ZERO_BYTE, "file is empty (0 bytes)")
    try:
        fp = open(path, "rb")
    except PermissionError:
        return None, None, None, None, False, _problem(PERMISSION_DENIED, "permission denied")
    except OSError as exc:
        return None, None, None, None, False, _problem(UNREADABLE, f"cannot open: {exc.strerror or exc}")
    with fp:
        try:
            with Image.open(fp) as im:
                w, h = im.size
                mode, fmt = im.mode, im.format
                rotated = False
                if "exif" in im.info:  # PNG's getexif() may decode the image when no EXIF was seen: avoid
                    try:
                        rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)
                    except Exception:  # noqa: BLE001 - broken EXIF: the pixels may still be fine
                        rotated = False
                if deep:
                    im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return None, None, None, None, False, _problem(DECOMPRESSION_BOMB, f"{exc} (refused as a possible decompression bomb)")
        except UnidentifiedImageError:
            return None, None, None, None, False, _problem(NOT_AN_IMAGE, "not an image PIL can read, despite the extension")
        except PermissionError:
            return None, None, None, None, False, _problem(PERMISSION_DENIED, "permission denied")
        except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as exc:
            # WebP (and some JPEGs) fail already in open() when cut short: tell truncation apart by the
            # format's declared size / end marker, which is what the user can act on (re-download).
            short = cut_short(fp, size)
            if short or "truncat" in str(exc).lower():
                return None, None, None, None, False, _problem(TRUNCATED, f"truncated: {short or exc}")
            return None, None, None, None, False, _problem(CORRUPT, f"cannot decode: {exc}")
        if rotated:
            w, h = h, w
        if w <= 0 or h <= 0:
            return None, None, mode, fmt, False, _problem(CORRUPT, f"image reports size {w}x{h}")
        if verify and not deep:
            msg = None
            try:
                msg = tail_problem(fp, fmt, size)
                if msg is not None:
                    # Cut short, or data appended after a complete image? Only a full decode can tell.
                    fp.seek(0)
                    with Image.open(fp) as im2:
                        im2.load()
            except Exception as exc:  # noqa: BLE001 - any failure here means the pixels cannot be read
                detail = msg if msg else str(exc)
                return w, h, mode, fmt, rotated, _problem(TRUNCATED, f"truncated or corrupt: {detail}")
        if mode not in SUPPORTED_MODES:
            return w, h, mode, fmt, rotated, _problem(
                UNSUPPORTED_MODE, f"image mode {mode} cannot be converted to RGB; save it as 8-bit RGB")
    return w, h, mode, fmt, rotated, None


def _caption_for(d: str, stem: str, ext: str, names: dict[str, str]) -> str | None:
    name = stem + ext
    if name in names:
        return os.path.join(d, name)
    alt = names.get(name.lower())  # IMG_1.TXT next to IMG_1.jpg is still its caption
    return os.path.join(d, alt) if alt else None


def _too_small(rec: ImageRecord, resolution: int, nearest) -> bool:
    """True when training would enlarge the image: its shorter side is below resolution (square
    training), or it does not cover its nearest bucket (bucketing). One rule for both modes: any
    upscale blurs what the LoRA learns."""
    if nearest is None:  # square training
        return min(rec.width, rec.height) < resolution
    return upscale_factor(rec.width, rec.height, nearest(rec.width, rec.height)) > 1.0


def resolve_training_shape(cfg: Any, family: str | None = None, prediction_type: str | None = None) -> tuple[int, bool]:
    """(resolution, bucketing) after the null defaults: the family's native size (for its prediction type where
    that decides it, e.g. SD2's 512 px epsilon base) and its bucketing default.

    A model of unknown prediction type gets the family's default_resolution (for SD2 the 768-v kind, SD 2.x's
    flagship). An unknown family is taken for the registered one with the smallest native size (SD1.x), so that no
    image is called too small for a model that may not need it.
    """
    from ..families import SPECS

    fam = family or (cfg.model_type if cfg.model_type != "auto" else None)
    spec = SPECS.get(fam or "") or min(SPECS.values(), key=lambda s: s.default_resolution)
    res = cfg.resolution
    if res is None:
        res = spec.prediction_resolution.get(prediction_type or "", spec.default_resolution)
    bucketing = cfg.enable_bucketing if cfg.enable_bucketing is not None else spec.bucketing_default
    return res, bool(bucketing)


def _fingerprint(records: list[ImageRecord]) -> str:
    """sha256 over each image's relative path, size, mtime_ns and caption text: any added, removed,
    replaced or re-captioned file changes it, at no cost of reading image bytes."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.rel_path.encode("utf-8", "surrogateescape"))
        h.update(b"\0%d\0%d\0" % (r.file_size, r.mtime_ns))
        h.update(b"-" if r.caption is None else b"+" + r.caption.encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def _cached_caption(index: ScanIndex, cpath: Path | None, crel: str | None):
    if cpath is None:
        return (None, None)
    if not index.knows_caption(crel):  # a first scan: the worker that reads the caption stats it (no stat twice)
        return None
    try:
        return index.caption(crel, identity(os.stat(cpath)))
    except OSError:
        return None  # read (and fail) in pass 2, which reports why


def _inspect_one(job: tuple, verify: bool, deep: bool) -> tuple:
    """(inspect result or None when only the caption is asked for, (caption text, warning, caption identity or
    None when unreadable))."""
    path, size, cpath, image_too = job
    result = _inspect_image(Path(path), size, verify=verify, deep=deep) if image_too else None
    caption = (None, None, None)
    if cpath is not None:
        try:
            ident = identity(os.stat(cpath))
            text, warn = cap.read_caption(cpath)
            caption = (text, warn, ident)
        except OSError as exc:
            caption = (None, f"caption file cannot be read: {exc.strerror or exc}", None)
    return result, caption


def _inspect_serial(jobs: list, verify: bool, deep: bool) -> list:
    return [_inspect_one(j, verify, deep) for j in jobs]


def _inspect_chunk(jobs: list, verify: bool, deep: bool) -> list:
    """Inspect ``jobs`` in order, IO_THREADS at a time: a file's first read on a cold page cache waits on the disk
    (a header and a 4 KiB tail: latency, not bandwidth), and reads in flight together overlap those waits. Threads
    suffice for that (the wait releases the GIL); the parsing itself still takes turns. Each thread takes a run of
    files, not one future per file: per-file futures cost as much as a warm header parse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's format-guess chatter must not reach stderr
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if len(jobs) < 2 * IO_THREADS:
            return _inspect_serial(jobs, verify, deep)
        from concurrent.futures import ThreadPoolExecutor

        size = -(-len(jobs) // (IO_THREADS * 4))  # several runs per thread: one slow folder does not stall the end
        runs = [jobs[i:i + size] for i in range(0, len(jobs), size)]
        with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="scan") as pool:
            return [r for part in pool.map(_inspect_serial, runs, [verify] * len(runs), [deep] * len(runs))
                    for r in part]


def _inspect_all(jobs: list, *, verify: bool, deep: bool, workers: int | None) -> list:
    """Inspect in worker processes when there are enough files to repay starting them (about 0.3 s each): the work
    is PIL header parsing, which holds the GIL, so threads would not help."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers <= 1 or len(jobs) < PARALLEL_MIN_FILES:
        return _inspect_chunk(jobs, verify, deep)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    size = max(200, len(jobs) // (workers * 8))  # several chunks per worker: a slow folder does not stall one
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    # spawn, not fork: the trainer has a heartbeat thread running, and forking a threaded process is unsafe.
    from concurrent.futures.process import BrokenProcessPool

    out: list = []
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for part in pool.map(_inspect_chunk, chunks, [verify] * len(chunks), [deep] * len(chunks)):
                out.extend(part)
        return out
    except (BrokenProcessPool, OSError):
        # A worker could not start (e.g. __main__ is a script spawn cannot re-import, like `python -`): one
        # process does the same work.
        return _inspect_chunk(jobs, verify, deep)


def scan_dataset(cfg: Any, *, verify: bool = True, deep: bool = False, resolution: int | None = None,
                 bucketing: bool | None = None, family: str | None = None, index: ScanIndex | None = None,
                 workers: int | None = None) -> DatasetScan:
    """Scan cfg.dataset_path. Raises FileNotFoundError / NotADirectoryError if the root is not a folder.

    resolution/bucketing decide only what counts as too small; when None they come from the config
    (and ``family``), as the trainer will resolve them. ``index``: results of an earlier scan to reuse for files
    whose identity is unchanged (it is updated; the caller saves it). ``workers``: processes for the files left
    to inspect (default: the usable cores).
    """
    root = Path(cfg.dataset_path)
    if not root.exists():
        raise FileNotFoundError(str(root))
    if not root.is_dir():
        raise NotADirectoryError(str(root))
    default_res, default_bucketing = resolve_training_shape(cfg, family)
    resolution = resolution or default_res
    bucketing = default_bucketing if bucketing is None else bucketing
    skip = {os.path.realpath(cfg.output_path)} if getattr(cfg, "output_path", None) else set()
    caption_ext = cfg.caption_extension
    triggers = tuple(cfg.trigger_words)
    clips = VS.takes_clips(family or (cfg.model_type if cfg.model_type != "auto" else None))
    wanted = IMAGE_EXTENSIONS | V.VIDEO_EXTENSIONS if clips else IMAGE_EXTENSIONS

    index = index or ScanIndex(None, {})
    # Pass 1: walk, stat, and take what the index already knows; the rest is inspected in pass 2.
    found: list[tuple] = []  # (path, rel_path, folder, repeats, identity, caption path, caption rel path)
    ignored = 0
    for d, rel, files in _walk(root, cfg.recursive, skip):
        names = {e.name: e.name for e in files}
        names.update({e.name.lower(): e.name for e in files if e.name.lower() not in names})
        folder = "/".join(rel)
        repeats = _repeats_for(rel, cfg.repeats)
        used_captions: set[str] = set()
        others = []  # not training samples: captions (counted below once the used ones are known) and the rest
        for e in files:
            stem, ext = os.path.splitext(e.name)
            if ext.lower() not in wanted or is_sidecar(stem):  # a -masklabel file is a mask, not an image
                others.append(e.name)
                continue
            try:
                ident = identity(e.stat())
            except OSError:
                ident = [0, 0, 0, 0]
            cpath = _caption_for(str(d), stem, caption_ext, names)
            cname = os.path.basename(cpath) if cpath is not None else None
            if cname is not None:
                used_captions.add(cname)
            found.append((e.path, "/".join(rel + (e.name,)), folder, repeats, ident,
                          cpath, "/".join(rel + (cname,)) if cname is not None else None))
        ignored += sum(name not in used_captions for name in others)

    inspected = [index.image(f[1], f[4]) if f[4][0] else None for f in found]
    captions = [_cached_caption(index, f[5], f[6]) for f in found]
    todo = [i for i in range(len(found)) if inspected[i] is None or captions[i] is None]
    VS.probe_into(found, inspected, index, clips)
    jobs = [(found[i][0], found[i][4][0], found[i][5], inspected[i] is None) for i in todo]
    for i, (result, caption) in zip(todo, _inspect_all(jobs, verify=verify, deep=deep, workers=workers)):
        if result is not None:
            inspected[i] = result
            if found[i][4][0]:  # a file that could not even be stat'ed is looked at again next time
                index.put_image(found[i][1], found[i][4], result)
        if found[i][5] is not None:
            captions[i] = caption[:2]
            if caption[2] is not None:  # an unreadable caption is tried again next time
                index.put_caption(found[i][6], caption[2], caption[0], caption[1])
        else:
            captions[i] = (None, None)

    records: list[ImageRecord] = []
    caption_warnings: list[tuple[str, str]] = []
    for (path, rel_path, folder, repeats, ident, cpath, crel), result, (text, warn) in zip(found, inspected, captions):
        clip = VS.clip_record(path, rel_path, result, cfg) if result[0] == "clip" else None
        w, h, mode, fmt, rotated, problem = VS.as_image(clip) if clip is not None else result
        cwarn = (warn,) if warn else ()
        for wmsg in cwarn:
            caption_warnings.append((crel, wmsg))
        missing = tuple(cap.missing_triggers(text, triggers)) if text and text.strip() else ()
        records.append(ImageRecord(
            path=path, rel_path=rel_path, width=w, height=h, mode=mode, format=fmt, file_size=ident[0],
            mtime_ns=ident[1], caption=text, caption_path=cpath, caption_warnings=cwarn,
            repeats=repeats, folder=folder, missing_triggers=missing, problem=problem, exif_rotated=rotated,
            clip=clip))

    buckets = None
    if bucketing:
        try:
            buckets = make_buckets(resolution, *bucket_range(cfg.min_bucket_resolution, cfg.max_bucket_resolution,
                                                               resolution))
        except ValueError:
            buckets = None  # the config check reports impossible bucket settings; judge as square
    nearest = bucket_finder(buckets) if buckets is not None else None
    usable = tuple(r for r in records if r.usable)
    folders: dict[str, dict[str, int]] = {}
    for r in records:
        f = folders.setdefault(r.folder, {"images": 0, "usable": 0, "repeats": r.repeats})
        f["images"] += 1
        f["usable"] += r.usable
    return DatasetScan(
        root=root,
        records=tuple(records),
        usable=usable,
        bad=tuple(r for r in records if not r.usable),
        without_caption=tuple(r for r in usable if not r.has_caption),
        missing_trigger=tuple(r for r in usable if r.missing_triggers),
        too_small=tuple(r for r in usable if _too_small(r, resolution, nearest)),
        samples_per_epoch=sum(r.repeats for r in usable),
        fingerprint=_fingerprint(records),
        resolution=resolution,
        bucketing=bool(bucketing),
        folders=folders,
        ignored_files=ignored,
        caption_warnings=tuple(caption_warnings),
        videos=VS.audit_of([r.clip for r in records if r.clip], cfg) if clips else None,
    )

