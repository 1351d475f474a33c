"""Cheap end-of-file checks of an image file (the dataset scan's ``verify``): whether the format's end marker or
declared size is there, from a 4 KiB tail read, without decoding the pixels."""
from __future__ import annotations

import struct

_TAIL = 4096
_PNG_IEND = b"IEND\xaeB`\x82"
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8", "JPEG"), (b"RIFF", "WEBP"), (b"BM", "BMP"))


def tail_problem(fp, fmt: str, size: int) -> str | None:
    """Cheap end-of-file check for the format; a message when the file looks cut short."""
    fp.seek(max(0, size - _TAIL))
    tail = fp.read(_TAIL)
    if fmt == "PNG":
        return None if _PNG_IEND in tail else "PNG has no IEND chunk at its end"
    if fmt in ("JPEG", "MPO"):
        return None if b"\xff\xd9" in tail else "JPEG has no end-of-image marker"
    if fmt == "WEBP":
        fp.seek(4)
        (riff_size,) = struct.unpack("<I", fp.read(4))
        return None if riff_size + 8 <= size else f"WebP declares {riff_size + 8} bytes but the file has {size}"
    if fmt == "BMP":
        fp.seek(10)
        (data_offset,) = struct.unpack("<I", fp.read(4))
        fp.seek(14)
        header = fp.read(20)
        if len(header) >= 20 and struct.unpack("<I", header[:4])[0] >= 40:
            w, h, _planes, bpp, compression = struct.unpack("<iiHHI", header[4:20])
            if compression in (0, 3):  # uncompressed rows: the size is fully determined
                need = data_offset + ((bpp * abs(w) + 31) // 32) * 4 * abs(h)
                if need > size:
                    return f"BMP pixel data needs {need} bytes but the file has {size}"
    return None


def cut_short(fp, size: int) -> str | None:
    """The end-of-file check for a file PIL could not even open, its format guessed from magic bytes."""
    try:
        fp.seek(0)
        head = fp.read(16)
        fmt = next((f for magic, f in _MAGIC if head.startswith(magic) and (f != "WEBP" or head[8:12] == b"WEBP")), None)
        return tail_problem(fp, fmt, size) if fmt else None
    except (OSError, struct.error):
        return None
