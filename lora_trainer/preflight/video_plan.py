"""What a video family's clips add to the memory plan and the latent cache plan, torch-free: the clip lengths a run
trains (the frame buckets of the clip audit, preflight/video_scan.py, or, once clips are scan records, their
``frames``), the largest of them for the activations and the VAE encode (memory_plan.py), and each clip's latent
frames x cached windows for ``summary.caches``. An images-only run (or an image family) gets 1 frame and no clips:
its plan is exactly an image run's.
"""
from __future__ import annotations

from typing import Any

from ..families import SPECS


def _audits(info: dict | None) -> list[dict]:
    """The clip audits of a dataset_path run's info, or of each entry of a ``datasets`` run."""
    if not info:
        return []
    out = [info["videos"]] if info.get("videos") else []
    for entry in info.get("datasets") or ():
        out += _audits(entry)
    return out


def record_frames(record: Any) -> int:
    """The frames a scan record trains at: a usable clip's (its ClipRecord's train_frames, 4k + 1), 1 for an image."""
    clip = getattr(record, "clip", None)
    return int(clip.train_frames) if clip is not None and clip.train_frames else 1


def scan_clip_frames(scan: Any) -> list[int]:
    """Frames of the scan's usable clip records (a video family's scan holds its clips as records)."""
    return [f for r in (scan.usable if scan is not None else ()) if (f := record_frames(r)) > 1]


def clip_frames(family: str | None, info: dict | None, scan: Any = None) -> dict[int, int]:
    """Frames -> usable clips of that length the run trains; {} for an image family or a dataset without clips.
    Clips that are scan records are counted there (and nowhere else); otherwise from the audit's frame buckets."""
    spec = SPECS.get(family or "")
    if spec is None or spec.temporal_compression <= 0:
        return {}
    counts: dict[int, int] = {}
    in_scan = scan_clip_frames(scan)
    if in_scan:
        for f in in_scan:
            counts[f] = counts.get(f, 0) + 1
        return counts
    for audit in _audits(info):
        for frames, n in (audit.get("frame_buckets") or {}).items():
            counts[int(frames)] = counts.get(int(frames), 0) + int(n)
    return counts


def planned_frames(family: str | None, info: dict | None, scan: Any = None) -> int:
    """The frames of the largest clip bucket the run trains (what its peak step holds); 1 without clips."""
    return max(clip_frames(family, info, scan), default=1)


def latent_frames(frames: int, temporal: int) -> int:
    """Latent frames of a clip of ``frames`` (4k + 1) through a causal VAE compressing time ``temporal``x (the first
    frame alone, then each ``temporal``: data/video.latent_frames); 1 for an image family (``temporal`` 0)."""
    from ..data.video import latent_frames as of_clip

    return of_clip(max(1, frames), temporal) if temporal > 0 else 1


def windows(cfg: Any) -> int:
    """Windows cached per clip (each epoch's start may differ: video_start); 1 until the key exists."""
    return max(1, int(getattr(cfg, "video_windows", 1) or 1))
