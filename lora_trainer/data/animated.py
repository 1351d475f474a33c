"""Animated GIF / WebP frame timing from the file's block headers, without decoding a frame.

Pillow tells an animated file from a still one cheaply (``n_frames``: GIF's blocks skipped undecoded, WebP's
demuxer), but it hands out a frame's duration only once it has decoded that frame (GIF: seeking decodes the frame
before; WebP: ``info["duration"]`` is set by ``load``). A clip's audit needs every frame's duration (they make its
length and say whether its rate varies) and must stay fast on thousands of files, so the durations are read here
from the blocks that carry them: GIF's graphic control extensions (one before each image, in 10 ms units) and WebP's
ANMF chunk headers (24-bit milliseconds). Pillow still opens the file (so it is an image it can decode) and decodes
the pixels when a clip trains (data/video.py). A frame without a duration is None: the caller applies the rule
browsers do (data/video.frame_seconds).
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO


class BlockError(ValueError):
    """The file's block structure is cut short or not the format's."""


def _read(fp: BinaryIO, n: int) -> bytes:
    data = fp.read(n)
    if len(data) < n:
        raise BlockError("the file ends inside a block (cut short)")
    return data


def _skip_sub_blocks(fp: BinaryIO) -> bytes | None:
    """Skip GIF data sub-blocks up to their terminator; the first one's bytes (None if there is none)."""
    first = None
    while (n := _read(fp, 1)[0]) != 0:
        data = _read(fp, n)
        first = data if first is None else first
    return first


def gif_durations(fp: BinaryIO) -> list[int | None]:
    """Each image's delay in ms (None: no graphic control extension before it), in file order."""
    head = _read(fp, 13)
    if head[:6] not in (b"GIF87a", b"GIF89a"):
        raise BlockError("not a GIF")
    if head[10] & 0x80:  # global colour table
        fp.seek(3 << ((head[10] & 7) + 1), 1)
    out: list[int | None] = []
    pending = None
    while (tag := fp.read(1)) not in (b"", b";"):
        if tag == b"!":
            label = _read(fp, 1)
            first = _skip_sub_blocks(fp)
            if label == b"\xf9" and first is not None and len(first) >= 3:
                pending = struct.unpack_from("<H", first, 1)[0] * 10
        elif tag == b",":
            desc = _read(fp, 9)
            if desc[8] & 0x80:  # local colour table
                fp.seek(3 << ((desc[8] & 7) + 1), 1)
            _read(fp, 1)  # LZW minimum code size
            _skip_sub_blocks(fp)
            out.append(pending)
            pending = None
        else:
            raise BlockError(f"unexpected GIF block {tag!r}")
    return out


def webp_durations(fp: BinaryIO) -> list[int | None]:
    """Each ANMF frame's duration in ms; [None] for a still WebP (no ANMF chunk)."""
    head = _read(fp, 12)
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        raise BlockError("not a WebP")
    end = 8 + struct.unpack_from("<I", head, 4)[0]
    out: list[int | None] = []
    pos = 12
    while pos + 8 <= end:
        fp.seek(pos)
        chunk = fp.read(8)
        if len(chunk) < 8:
            break  # a missing tail: the frames read so far (Pillow reports the cut itself)
        fourcc, size = chunk[:4], struct.unpack_from("<I", chunk, 4)[0]
        if fourcc == b"ANMF":
            frame = _read(fp, 16)
            out.append(int.from_bytes(frame[12:15], "little"))
        pos += 8 + size + (size & 1)
    return out or [None]


def durations(path: str | Path) -> list[int | None]:
    """Per-frame durations (ms) of an animated GIF or WebP (by its content, whatever its name). Raises BlockError."""
    with open(path, "rb") as fp:
        magic = fp.read(12)
        fp.seek(0)
        if magic[:3] == b"GIF":
            return gif_durations(fp)
        if magic[:4] == b"RIFF" and magic[8:12] == b"WEBP":
            return webp_durations(fp)
    raise BlockError("neither a GIF nor a WebP")
