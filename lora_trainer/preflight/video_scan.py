"""The --validate-only audit of a dataset's video clips: each clip's container is opened and its headers read
(codec, size, fps, duration, frame count, variable frame rate), its first frame decoded, and nothing more (Matroska
/ WebM, whose headers hold no frame count, have their packets demuxed, not decoded). Broken clips are listed with a
problem code and skipped; clips the short-clip rule drops are listed too. What a clip trains as (frames at the
target fps, 4k+1) is worked out here from the headers alone, so the memory plan and the step count can count frames
before anything is decoded.

Problem codes: ``zero_byte``, ``permission_denied``, ``not_a_video`` (no container FFmpeg/Pillow can open: a
truncated mp4 without its moov atom lands here), ``no_video_stream``, ``no_frame_rate``, ``no_size``, ``empty``,
``corrupt`` (the first frame does not decode), ``needs_pyav`` (the package is missing), ``too_short`` (the
short-clip rule is "skip" and the clip has fewer frames than asked).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..data import video as V

# Reads in flight: FFmpeg releases the GIL while it parses, and a cold network filesystem wants a queue.
IO_THREADS = 8
PARALLEL_MIN_FILES = 16


@dataclass(frozen=True)
class ClipRecord:
    path: str
    rel_path: str
    info: V.VideoInfo | None
    train_frames: int | None  # frames it trains with at the target fps (4k+1); None: unusable or skipped
    problem: dict | None = None  # {"code", "message"}

    @property
    def usable(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict:
        out = {"file": self.rel_path, "train_frames": self.train_frames}
        if self.info is not None:
            i = self.info
            out.update(codec=i.codec, width=i.width, height=i.height, fps=round(i.fps, 3),
                       duration=round(i.duration, 3), frames=i.frames, frames_estimated=i.frames_estimated, vfr=i.vfr)
        if self.problem is not None:
            out["problem"] = self.problem
        return out


@dataclass(frozen=True)
class VideoAudit:
    records: tuple[ClipRecord, ...]
    target_fps: float
    frames: int
    short_clip: str
    usable: tuple[ClipRecord, ...] = field(default=())
    bad: tuple[ClipRecord, ...] = field(default=())

    def summary(self) -> dict:
        """What --validate-only reports: counts, frame buckets, and every broken or skipped clip by name."""
        buckets: dict[int, int] = {}
        for r in self.usable:
            buckets[r.train_frames] = buckets.get(r.train_frames, 0) + 1
        return {"clips": len(self.records), "usable": len(self.usable), "target_fps": self.target_fps,
                "frames": self.frames, "short_clip": self.short_clip,
                "frame_buckets": {str(k): v for k, v in sorted(buckets.items())},
                "vfr": sum(1 for r in self.usable if r.info.vfr),
                "shortened": sum(1 for r in self.usable if r.train_frames < self.frames),
                "bad": [r.to_dict() for r in self.bad]}


def _problem(code: str, message: str) -> dict:
    return {"code": code, "message": message}


def probe_clip(path: str | Path) -> tuple[V.VideoInfo | None, dict | None]:
    """(header facts, None) or (None, problem): what a clip is, whatever it will train as (the dataset scan caches
    this per file identity)."""
    path = str(path)
    try:
        size = os.path.getsize(path)
    except PermissionError:
        return None, _problem("permission_denied", "permission denied")
    except OSError as exc:
        return None, _problem("not_a_video", f"cannot stat: {exc}")
    if size == 0:
        return None, _problem("zero_byte", "file is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        return None, _problem("permission_denied", "permission denied")
    try:
        return V.probe(path), None
    except V.VideoError as exc:
        return None, _problem(exc.code, str(exc))


def record(path: str | Path, rel_path: str, info: V.VideoInfo | None, problem: dict | None, *, target_fps: float,
           frames: int, short_clip: str) -> ClipRecord:
    """What a probed clip trains as at the target fps (``too_short`` where the short-clip rule skips it)."""
    if problem is not None or info is None:
        return ClipRecord(str(path), rel_path, None, None, problem)
    have = V.frames_at(info.duration, target_fps)
    n = V.clip_length(have, frames, short_clip)
    if n is None:
        return ClipRecord(str(path), rel_path, info, None, _problem(
            "too_short", f"{info.duration:.2f} s holds {have} frames at {target_fps:g} fps, fewer than {frames}"))
    return ClipRecord(str(path), rel_path, info, n)


def audit_clip(path: str | Path, rel_path: str, *, target_fps: float, frames: int, short_clip: str) -> ClipRecord:
    info, problem = probe_clip(path)
    return record(path, rel_path, info, problem, target_fps=target_fps, frames=frames, short_clip=short_clip)


def animated(path: str | Path) -> bool:
    """Whether a GIF / WebP holds more than one frame (Pillow's count: GIF blocks skipped undecoded, WebP demuxed;
    0.1-0.5 ms a file). A file Pillow cannot open counts as animated when it is a GIF (the clip audit lists it) and
    as a still when it is a WebP (the image scan lists it, as it always has)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) > 1
    except Exception:  # noqa: BLE001 - any failure: the audit that reads it next reports why
        return Path(path).suffix.lower() == ".gif"


def _probe_candidate(path: str):
    """probe_clip's result, or None for a one-frame GIF / WebP (an image, inspected by the image scan)."""
    if Path(path).suffix.lower() in V.ANIMATED_IMAGE_EXTENSIONS and not animated(path):
        return None
    return probe_clip(path)


def probe_clips(paths: list[str]) -> list[tuple[V.VideoInfo | None, dict | None] | None]:
    """_probe_candidate over ``paths`` in order, IO_THREADS at a time where there are enough to repay the threads."""
    if len(paths) >= PARALLEL_MIN_FILES and IO_THREADS > 1:
        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            return list(pool.map(_probe_candidate, paths))
    return [_probe_candidate(p) for p in paths]


def summary_of(records: Iterable[ClipRecord], *, target_fps: float, frames: int, short_clip: str) -> VideoAudit:
    records = tuple(records)
    return VideoAudit(records, target_fps, frames, short_clip, usable=tuple(r for r in records if r.usable),
                      bad=tuple(r for r in records if not r.usable))


def audit_clips(files: Iterable[tuple[str | Path, str]], *, target_fps: float, frames: int,
                short_clip: str = "shorten", workers: int | None = None) -> VideoAudit:
    """``files``: (path, relative path) in the scan's order; the records keep it."""
    files = list(files)
    job = lambda f: audit_clip(f[0], f[1], target_fps=target_fps, frames=frames, short_clip=short_clip)  # noqa: E731
    if len(files) >= PARALLEL_MIN_FILES and (workers or IO_THREADS) > 1:
        with ThreadPoolExecutor(max_workers=workers or IO_THREADS) as pool:
            records = tuple(pool.map(job, files))
    else:
        records = tuple(map(job, files))
    return VideoAudit(records, target_fps, frames, short_clip, usable=tuple(r for r in records if r.usable),
                      bad=tuple(r for r in records if not r.usable))


def video_files(root: str | Path, *, recursive: bool = True) -> list[tuple[str, str]]:
    """(path, relative POSIX path) of every clip under ``root`` (for an image family's audit: its scan skips them),
    sorted depth first like the image scan; WebPs are an image family's images, animated or not."""
    root = Path(root)
    out = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".")) if recursive else []
        for name in sorted(names):
            if not name.startswith(".") and V.is_video_path(name):
                p = Path(d) / name
                out.append((str(p), p.relative_to(root).as_posix()))
    return out


# -- clips as dataset records (preflight/dataset_scan.py, for a family that trains clips) ---------------------------
def probe_into(found: list, inspected: list, index, clips: bool) -> None:
    """Probe the clips among the scan's ``found`` files that its index does not know, in place: each result is
    ["clip", header facts or None, problem or None], what the index keeps for the file's identity (the facts do not
    depend on the run's video settings, which clip_record applies). A GIF / WebP is a clip when it has several
    frames; a one-frame one is left to the image scan. Nothing is a clip unless the family trains clips (``clips``):
    an image family's WebPs are images, animated or not."""
    if not clips:
        return
    todo = [i for i, f in enumerate(found) if inspected[i] is None and (
        V.is_video_path(f[1]) or Path(f[1]).suffix.lower() in V.ANIMATED_IMAGE_EXTENSIONS)]
    for i, result in zip(todo, probe_clips([found[i][0] for i in todo])):
        if result is None:
            continue
        info, problem = result
        inspected[i] = ["clip", info.to_dict() if info is not None else None, problem]
        if found[i][4][0]:  # a file that could not even be stat'ed is looked at again next time
            index.put_image(found[i][1], found[i][4], inspected[i])


def clip_record(path: str, rel_path: str, result, cfg) -> ClipRecord:
    """A clip's ClipRecord from its (cached) probe result, under the run's video settings."""
    if not (isinstance(result, (list, tuple)) and len(result) == 3 and result[0] == "clip"):
        result = ["clip", None, _problem("corrupt", "unrecognised scan index entry")]
    info = V.VideoInfo(**result[1]) if result[1] else None
    return record(path, rel_path, info, result[2], target_fps=cfg.video_fps, frames=cfg.video_frames,
                  short_clip=cfg.video_short_clip)


def takes_clips(family: str | None) -> bool:
    """Whether ``family`` trains video clips (a temporal compression in its spec); unknown families do not."""
    from ..families import SPECS

    spec = SPECS.get(family or "")
    return bool(spec is not None and spec.temporal_compression)


def as_image(clip: ClipRecord) -> tuple:
    """A clip's (width, height, mode, format, exif_rotated, problem), as the image scan records an image's."""
    i = clip.info
    if i is None:
        return None, None, None, None, False, clip.problem
    return i.width, i.height, "RGB", i.codec, False, clip.problem


def audit_of(records: list, cfg) -> VideoAudit:
    return summary_of(records, target_fps=cfg.video_fps, frames=cfg.video_frames, short_clip=cfg.video_short_clip)
