"""Video clips as training samples: header facts, frame sampling at a target fps, decoding to pixels.

Decoding: PyAV (``av``, FFmpeg's libraries bundled in its wheels) for real containers (.mp4 .webm .mkv .mov .avi),
Pillow for animated GIF / WebP. Why PyAV and not torchcodec: torchcodec's wheels carry no FFmpeg (it loads the
system's libavcodec 4-9 at import, and a box without FFmpeg installed, like this one and a slim Docker image,
cannot decode at all) and each release pins one torch minor; PyAV's wheels are self-contained for Python 3.11, read
container and stream headers without decoding (the --validate-only audit), and also encode (the tests write clips
with it). PyAV is imported lazily: image-only runs never need it, and a video folder without it is a config error
naming the package.

Frames are chosen by time, not by index: target frame i shows at ``start + i / target_fps`` and takes the source
frame on screen at that instant (the last one whose presentation time is <= it). That is one rule for constant and
variable frame rates, for GIF's per-frame durations, and for target fps above or below the source's.

Wan's VAE compresses time 4x with a causal first frame, so a clip is 4k+1 frames (1 frame: an image). A clip with
fewer frames at the target fps than asked is handled by ``short_clip``:
  "shorten" (default): it trains at the largest 4k+1 it holds (its own frame bucket);
  "pad": its last frame is repeated up to the asked count;
  "skip": it is left out (listed, like a broken file).
A clip with more frames than asked trains on windows of them: ``windows`` (the config's ``video_windows``, K)
window starts spread evenly over the slack (what the window leaves over: the first at the clip's start, the last
ending at its end); a clip without slack, K = 1 or ``start`` "first" has the one window at its start. Which window
an epoch trains, ``start``:
  "first": the first, every epoch;
  "uniform": window (epoch mod K) in epoch e: over K epochs every window once;
  "random": one drawn per (seed, epoch, clip) from a private seeded generator: the same on a resume.
A finite set of windows, known before training, is what lets the latent cache encode every window up front and a
cached run train exactly the windows an uncached one decodes.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif"})
ANIMATED_IMAGE_EXTENSIONS = frozenset({".gif", ".webp"})  # Pillow; a one-frame WebP/GIF is an image
START_CHOICES = ("first", "uniform", "random")
SHORT_CLIP_RULES = ("shorten", "pad", "skip")
# Average and nominal rates further apart than this make a clip variable-frame-rate (phones' recordings).
_VFR_TOLERANCE = 0.01
_EPS = 1e-6


class VideoError(Exception):
    """A clip that cannot be read: ``code`` is the audit's problem code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class VideoInfo:
    """What a container's headers say (no frame decoded beyond the first: ``probe``)."""
    path: str
    container: str  # "mov,mp4,m4a,3gp,3g2,mj2", "gif", "webp" ...
    codec: str  # "h264", "vp9", "gif" ...
    width: int
    height: int
    fps: float  # average frames per second over the clip
    duration: float  # seconds, first frame's start to last frame's end
    frames: int  # from the header where it says; else round(duration * fps) (frames_estimated)
    frames_estimated: bool
    vfr: bool  # the average rate disagrees with the nominal one (or GIF frame durations differ)
    rotation: int = 0  # degrees the player rotates by (display matrix); width/height are as stored

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def is_video_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _require_av():
    try:
        import av
    except ImportError as exc:  # the caller turns this into a config error naming the package
        raise VideoError("needs_pyav", "video files need PyAV: pip install av") from exc
    av.logging.set_level(av.logging.PANIC)  # FFmpeg's own stderr chatter would interleave with the JSON events
    return av


# -- header facts ----------------------------------------------------------------------------------
def probe(path: str | Path, *, check_decode: bool = True, count_packets: bool = True) -> VideoInfo:
    """The clip's header facts; ``check_decode`` decodes its first frame (a codec FFmpeg cannot decode, or a file
    cut short before its first keyframe, fails here rather than mid-training). Where the header has no frame count
    (Matroska / WebM) and ``count_packets``, the packets are demuxed, not decoded: their timestamps give the count,
    the duration and whether the rate varies. Raises VideoError."""
    path = Path(path)
    if path.suffix.lower() in ANIMATED_IMAGE_EXTENSIONS:
        return _probe_pillow(path)
    av = _require_av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise VideoError("not_a_video", f"cannot open as a video container: {exc}") from exc
    with container:
        if not container.streams.video:
            raise VideoError("no_video_stream", "container has no video stream")
        s = container.streams.video[0]
        cc = s.codec_context
        avg = s.average_rate or s.guessed_rate or s.base_rate
        if not avg or float(avg) <= 0:
            raise VideoError("no_frame_rate", "video stream has no frame rate")
        fps = float(avg)
        nominal = s.guessed_rate or s.base_rate
        vfr = bool(nominal) and abs(float(nominal) - fps) > _VFR_TOLERANCE * fps
        if s.duration is not None and s.time_base is not None:
            duration = float(s.duration * s.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000  # AV_TIME_BASE
        else:
            duration = 0.0
        frames, estimated = int(s.frames or 0), False
        if frames <= 0 and count_packets:
            counted = _packet_times(container, s)
            if counted:
                frames, duration, fps, vfr = counted
        if frames <= 0:
            frames, estimated = max(0, round(duration * fps)), True
        if duration <= 0 and frames > 0:
            duration = frames / fps
        if frames <= 0:
            raise VideoError("empty", "video stream has no frames")
        if not cc.width or not cc.height:
            raise VideoError("no_size", "video stream has no frame size")
        if check_decode:
            try:
                next(container.decode(s))
            except StopIteration:
                raise VideoError("empty", "no frame decodes") from None
            except av.error.FFmpegError as exc:
                raise VideoError("corrupt", f"first frame does not decode: {exc}") from exc
        rotation = 0
        try:
            rotation = int(round(s.side_data.get("DISPLAYMATRIX", 0) or 0)) if hasattr(s, "side_data") else 0
        except (TypeError, ValueError, AttributeError):
            rotation = 0
        return VideoInfo(str(path), container.format.name, cc.name, int(cc.width), int(cc.height), fps, duration,
                         frames, estimated, vfr, rotation)


def _packet_times(container, s):
    """(frames, duration, fps, vfr) from the stream's packet timestamps (demuxed, not decoded), None if it has none."""
    pts = sorted(p.pts for p in container.demux(s) if p.pts is not None and p.size)
    container.seek(0)
    if not pts:
        return None
    tb = float(s.time_base)
    gaps = np.diff(pts) * tb
    step = float(np.median(gaps)) if len(gaps) else 0.0
    duration = (pts[-1] - pts[0]) * tb + step
    if duration <= 0:
        return None
    vfr = bool(len(gaps)) and float(gaps.max() - gaps.min()) > _VFR_TOLERANCE * max(step, _EPS) + tb
    return len(pts), duration, len(pts) / duration, vfr


def frame_seconds(ms: int | None) -> float:
    """An animated image frame's display time: no (or a 0) delay shows ~100 ms and anything under 10 ms is raised to
    it, as browsers do."""
    return max(float(ms or 100), 10.0) / 1000


def _pillow_times(path: Path) -> list[float]:
    """Per-frame durations (s) of an animated GIF / WebP from its block headers (data/animated.py: no frame decoded;
    Pillow would decode each frame to report its duration)."""
    from .animated import BlockError, durations

    try:
        return [frame_seconds(d) for d in durations(path)]
    except (BlockError, OSError) as exc:
        raise VideoError("corrupt", f"cannot read the frame timing: {exc}") from exc


def _probe_pillow(path: Path) -> VideoInfo:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            count = getattr(im, "n_frames", 1)  # GIF: blocks skipped undecoded; WebP: demuxed
            w, h, fmt = im.width, im.height, (im.format or "").lower()
            im.load()  # the first frame decodes, as a container's first frame must (probe's check_decode)
    except (UnidentifiedImageError, OSError, EOFError, ValueError, SyntaxError) as exc:
        raise VideoError("not_a_video", f"cannot open as an animated image: {exc}") from exc
    durations = _pillow_times(path)
    if len(durations) != count:
        raise VideoError("corrupt", f"{count} frames but {len(durations)} frame headers")
    total = sum(durations)
    return VideoInfo(str(path), fmt, fmt, w, h, len(durations) / total, total, len(durations), False,
                     len(set(round(d, 4) for d in durations)) > 1)


# -- frame sampling --------------------------------------------------------------------------------
def frames_at(duration: float, target_fps: float) -> int:
    """Target-fps frames whose show time (i / target_fps) falls inside the clip."""
    return max(1, math.ceil(duration * target_fps - _EPS))


def largest_4k1(n: int) -> int:
    """The largest 4k+1 <= n (n >= 1)."""
    return ((max(1, n) - 1) // 4) * 4 + 1


def clip_length(available: int, wanted: int, short_clip: str = "shorten") -> int | None:
    """Frames a clip trains with: ``wanted`` (a 4k+1) where it has them, else by the short_clip rule; None: skipped."""
    if wanted < 1 or (wanted - 1) % 4:
        raise ValueError(f"frame count must be 4k+1, got {wanted}")
    if available >= wanted or short_clip == "pad":
        return wanted
    if short_clip == "skip":
        return None
    if short_clip != "shorten":
        raise ValueError(f"short_clip must be one of {SHORT_CLIP_RULES}, got {short_clip!r}")
    return largest_4k1(available)


def window_starts(duration: float, target_fps: float, frames: int, *, windows: int = 1,
                  start: str = "first") -> list[float]:
    """Where a clip's windows of ``frames`` target-fps frames start (seconds), spread evenly over the slack."""
    if start not in START_CHOICES:
        raise ValueError(f"start must be one of {START_CHOICES}, got {start!r}")
    slack = max(0.0, duration - frames / target_fps)
    if start == "first" or windows <= 1 or slack <= _EPS:
        return [0.0]
    return [slack * k / (windows - 1) for k in range(windows)]


def window_index(count: int, *, start: str = "first", epoch: int = 0, seed: int = 0, key: str = "") -> int:
    """Which of a clip's ``count`` windows epoch ``epoch`` trains. ``key`` names the clip (its relative path), so
    two clips draw independently and a rescan does not reorder; the generator is private (no global RNG state)."""
    if count <= 1 or start == "first":
        return 0
    if start == "uniform":
        return epoch % count
    digest = hashlib.sha256(f"window:{seed}:{epoch}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little")).randrange(count)


def sample_times(duration: float, target_fps: float, frames: int, start: float = 0.0) -> list[float]:
    """Show times of the window's frames; past the clip's end (a padded short clip) they clamp to its last frame."""
    last = max(0.0, duration - _EPS)
    return [min(start + i / target_fps, last) for i in range(frames)]


def source_indices(frame_starts: list[float], times: list[float]) -> list[int]:
    """For each time, the source frame on screen then: the last frame starting at or before it
    (``frame_starts`` ascending, seconds)."""
    import bisect

    return [max(0, bisect.bisect_right(frame_starts, t + _EPS) - 1) for t in times]


# -- decoding --------------------------------------------------------------------------------------
def read_frames(path: str | Path, times: list[float]) -> np.ndarray:
    """RGB frames [F, H, W, 3] uint8 on screen at ``times`` (ascending, seconds from the clip's first frame).
    Decodes from the keyframe before the first time to the last time, not the whole clip."""
    path = Path(path)
    if not times:
        raise ValueError("no frame times")
    if path.suffix.lower() in ANIMATED_IMAGE_EXTENSIONS:
        return _read_pillow(path, times)
    av = _require_av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError("not_a_video", f"cannot open as a video container: {exc}") from exc
    with container:
        s = container.streams.video[0]
        tb = s.time_base
        origin = s.start_time if s.start_time is not None else 0
        first, last = times[0], times[-1]
        if first > 0:
            # A seek lands on the keyframe at or before the target; decoding from there is exact.
            container.seek(origin + int(Fraction(first).limit_denominator(1_000_000) / tb), stream=s, backward=True,
                           any_frame=False)
        out: list[np.ndarray | None] = [None] * len(times)
        prev = None
        j = 0
        try:
            for frame in container.decode(s):
                if frame.pts is None:
                    continue
                t = float((frame.pts - origin) * tb)
                # Every time before this frame's start shows the previous frame.
                while j < len(times) and times[j] + _EPS < t:
                    if prev is not None:
                        out[j] = prev
                    j += 1
                prev = frame.to_ndarray(format="rgb24")
                if j >= len(times) or t > last + _EPS:
                    break
        except av.error.FFmpegError as exc:
            raise VideoError("corrupt", f"decoding failed: {exc}") from exc
        while j < len(times) and prev is not None:  # times at or past the last frame's start
            out[j] = prev
            j += 1
        if prev is None or any(o is None for o in out):
            missing = sum(o is None for o in out)
            raise VideoError("corrupt", f"{missing} of {len(times)} frames could not be decoded")
        return np.stack(out)


def _read_pillow(path: Path, times: list[float]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        durations = _pillow_times(path)
        starts = list(np.cumsum([0.0, *durations[:-1]]))
        frames = []
        for idx in source_indices(starts, times):
            im.seek(idx)
            # Transparency composited on white, as data/images.to_rgb does for an image (not imported: images.py
            # reaches this module through data/clips.py).
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            frames.append(np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8))
    return np.stack(frames)


def to_tensor(frames: np.ndarray, bucket: tuple[int, int], *, random_crop: bool = False,
              rng: random.Random | None = None, flip: bool = False, with_crop: bool = False):
    """[F, H, W, 3] uint8 -> [3, F, h, w] float32 in [-1, 1] at ``bucket`` (w, h): one resize and crop for the
    whole clip (the same as an image's, data/buckets.resize_and_crop), so the frames stay aligned. ``with_crop``:
    also (left, top) of the crop, which a clip's mask follows."""
    import torch
    import torch.nn.functional as F

    from .buckets import resize_and_crop

    n, h, w, _ = frames.shape
    bw, bh = bucket
    rw, rh, left, top = resize_and_crop(w, h, (bw, bh), random_crop=random_crop, rng=rng)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    # antialias bilinear: close to PIL's LANCZOS for downscaling, and one batched call for every frame.
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    x = x[:, :, top:top + bh, left:left + bw]
    if flip:
        x = x.flip(-1)
    # Rounded to 8-bit levels as an image's pixels are (load_pixels goes through uint8).
    x = x.round_().clamp_(0, 255).div_(127.5).sub_(1.0).permute(1, 0, 2, 3).contiguous()
    return (x, (left, top)) if with_crop else x


# -- buckets over (frames, h, w) -----------------------------------------------------------------------
def latent_frames(frames: int, temporal: int = 4) -> int:
    """Latent frames of a 4k+1 clip through a causal VAE compressing time ``temporal``x: the first frame alone."""
    return (frames - 1) // temporal + 1


def tokens(frames: int, width: int, height: int, *, token_pixels: int = 16, temporal: int = 4) -> int:
    """Denoiser tokens of a clip bucket: latent frames x (width / token_pixels) x (height / token_pixels)."""
    return latent_frames(frames, temporal) * (width // token_pixels) * (height // token_pixels)


def clip_bucket(width: int, height: int, frames: int, spatial: list[tuple[int, int]], token_budget: int, *,
                token_pixels: int = 16, temporal: int = 4) -> tuple[int, int, int]:
    """(frames, w, h) of a clip: the spatial bucket nearest its aspect (as an image's), then as many of its frames
    (a 4k+1) as the token budget allows at that size. A batch groups clips of one (frames, w, h): equal shapes, and
    every bucket costs at most the budget's memory. An image is a 1-frame clip and always fits."""
    from .buckets import nearest_bucket

    bw, bh = nearest_bucket(width, height, spatial)
    per_latent_frame = (bw // token_pixels) * (bh // token_pixels)
    most = max(1, token_budget // max(1, per_latent_frame))  # latent frames within the budget
    n = min(largest_4k1(frames), (most - 1) * temporal + 1)
    return n, bw, bh
