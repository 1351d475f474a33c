"""Dataset scanning on real files: sizes, captions, repeats, and every kind of bad image."""
import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from lora_trainer.preflight import dataset_scan as ds
from lora_trainer.config.config import TrainConfig, parse_config
from lora_trainer.preflight.dataset_scan import IMAGE_EXTENSIONS, scan_dataset


def cfg_for(tmp_path: Path, data: Path, **kw) -> TrainConfig:
    raw = {"dataset_path": str(data), "base_model": "org/model", "output_path": str(tmp_path / "out"),
           "trigger_words": ["ohwx"], **kw}
    return parse_config(raw, base_dir=tmp_path)[0]


def noisy(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)


def encoded(fmt: str, w: int = 96, h: int = 64, **save) -> bytes:
    buf = io.BytesIO()
    noisy(w, h).save(buf, fmt, **save)
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.fixture()
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


def by_name(scan):
    return {r.rel_path: r for r in scan.records}


def test_ordinary_dataset(tmp_path):
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "data", n=6, sizes=[(96, 64), (64, 96)])
    (data / "img_0001.txt").unlink()
    scan = scan_dataset(cfg_for(tmp_path, data))
    recs = by_name(scan)
    assert list(recs) == sorted(recs) and len(recs) == 6
    assert (recs["img_0000.png"].width, recs["img_0000.png"].height, recs["img_0000.png"].mode) == (96, 64, "RGB")
    assert recs["img_0003.jpg"].format == "JPEG" and (recs["img_0003.jpg"].width, recs["img_0003.jpg"].height) == (64, 96)
    assert recs["img_0000.png"].caption.startswith("ohwx, ") and recs["img_0001.png"].caption is None
    assert [r.rel_path for r in scan.without_caption] == ["img_0001.png"]
    assert scan.bad == () and len(scan.usable) == 6 and scan.samples_per_epoch == 6
    assert scan.missing_trigger == ()
    assert scan.folders == {"": {"images": 6, "usable": 6, "repeats": 1}}


def test_fingerprint_tracks_content(tmp_path, data):
    write(data / "a.png", encoded("PNG"))
    write(data / "a.txt", "ohwx, one")
    cfg = cfg_for(tmp_path, data)
    fp = scan_dataset(cfg).fingerprint
    assert scan_dataset(cfg).fingerprint == fp  # deterministic
    write(data / "a.txt", "ohwx, two")
    fp2 = scan_dataset(cfg).fingerprint
    assert fp2 != fp
    os.utime(data / "a.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    fp3 = scan_dataset(cfg).fingerprint
    assert fp3 != fp2
    write(data / "b.png", encoded("PNG"))
    assert scan_dataset(cfg).fingerprint != fp3
    write(data / "notes.md", "not part of the dataset")
    assert scan_dataset(cfg).fingerprint == scan_dataset(cfg).fingerprint


def test_zero_byte_and_text_named_png(tmp_path, data):
    write(data / "empty.png", b"")
    write(data / "text.png", "this is not an image\n" * 10)
    write(data / "good.jpg", encoded("JPEG"))
    recs = by_name(scan_dataset(cfg_for(tmp_path, data)))
    assert recs["empty.png"].problem["code"] == "zero_byte"
    assert recs["text.png"].problem["code"] == "not_an_image"
    assert recs["good.jpg"].usable


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp")])
def test_truncated_files(tmp_path, data, fmt, ext):
    full = encoded(fmt, 128, 128)
    write(data / f"cut.{ext}", full[: int(len(full) * 0.6)])
    write(data / f"cut_end.{ext}", full[:-40])  # the last pixels are missing
    write(data / f"whole.{ext}", full)
    recs = by_name(scan_dataset(cfg_for(tmp_path, data)))
    assert recs[f"cut.{ext}"].problem["code"] == "truncated", recs[f"cut.{ext}"].problem
    assert recs[f"cut_end.{ext}"].problem["code"] == "truncated", recs[f"cut_end.{ext}"].problem
    assert recs[f"whole.{ext}"].usable


def test_data_after_jpeg_end_is_not_truncation(tmp_path, data):
    # Phones append a video after the JPEG's EOI (motion photos): the image itself is complete.
    write(data / "motion.jpg", encoded("JPEG") + b"\x00" * 20000)
    write(data / "trailer.png", encoded("PNG") + b"\x00" * 20000)
    recs = by_name(scan_dataset(cfg_for(tmp_path, data)))
    assert recs["motion.jpg"].usable and recs["trailer.png"].usable


def test_corrupt_middle_found_only_by_deep_scan(tmp_path, data):
    full = bytearray(encoded("PNG", 128, 128))
    mid = len(full) // 2
    full[mid:mid + 64] = b"\xff" * 64  # breaks zlib data and a CRC, keeps IEND
    write(data / "flipped.png", bytes(full))
    cfg = cfg_for(tmp_path, data)
    assert scan_dataset(cfg).records[0].usable  # cheap scan: by design
    assert scan_dataset(cfg, deep=True).records[0].problem["code"] in ("corrupt", "truncated")


def png_claiming(width: int, height: int) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_header(tmp_path, data):
    write(data / "bomb.png", png_claiming(100_000, 100_000))  # 10 gigapixels in 70 bytes
    rec = scan_dataset(cfg_for(tmp_path, data)).records[0]
    assert rec.problem["code"] == "decompression_bomb"


def test_decompression_bomb_warning_level_is_an_error(tmp_path, data, monkeypatch):
    # Between MAX_IMAGE_PIXELS and twice that PIL only warns; the scan must still refuse it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 64 - 100)
    write(data / "big.png", encoded("PNG", 96, 64))
    write(data / "small.png", encoded("PNG", 32, 32))
    recs = by_name(scan_dataset(cfg_for(tmp_path, data)))
    assert recs["big.png"].problem["code"] == "decompression_bomb"
    assert recs["small.png"].usable


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files despite chmod 000")
def test_unreadable_permissions(tmp_path, data):
    p = write(data / "locked.png", encoded("PNG"))
    p.chmod(0)
    try:
        rec = scan_dataset(cfg_for(tmp_path, data)).records[0]
        assert rec.problem["code"] == "permission_denied"
    finally:
        p.chmod(0o644)


def test_permission_error_is_classified(tmp_path, data, monkeypatch):
    # Same classification as above, testable as root: the scan's open() raises EACCES for one file.
    write(data / "locked.png", encoded("PNG"))
    write(data / "ok.png", encoded("PNG"))
    real_open = open

    def fake_open(path, *a, **k):
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(ds, "open", fake_open, raising=False)
    recs = by_name(scan_dataset(cfg_for(tmp_path, data)))
    assert recs["locked.png"].problem["code"] == "permission_denied" and recs["ok.png"].usable


def test_unsupported_mode(tmp_path, data, monkeypatch):
    noisy(32, 32).convert("I;16").save(data / "deep.png")
    noisy(32, 32).save(data / "rgb.png")
    assert by_name(scan_dataset(cfg_for(tmp_path, data)))["deep.png"].usable  # the loader rescales 16-bit
    monkeypatch.setattr(ds, "SUPPORTED_MODES", ds.SUPPORTED_MODES - {"I;16", "I"})
    recs = by_name(scan_dataset(cfg_for(tmp_path, data)))
    assert recs["deep.png"].problem["code"] == "unsupported_mode" and recs["deep.png"].mode in ("I;16", "I")
    assert recs["rgb.png"].usable


def test_repeats_folders_and_recursion(tmp_path, data):
    write(data / "root.png", encoded("PNG"))
    write(data / "10_ohwx" / "a.png", encoded("PNG"))
    write(data / "10_ohwx" / "b.jpg", encoded("JPEG"))
    write(data / "5_style" / "10_inner" / "c.png", encoded("PNG"))
    write(data / "5_style" / "plain" / "d.png", encoded("PNG"))
    write(data / "0_zero" / "e.png", encoded("PNG"))
    write(data / "2024_trip" / "f.png", encoded("PNG"))
    scan = scan_dataset(cfg_for(tmp_path, data, repeats=3))
    reps = {r.rel_path: r.repeats for r in scan.records}
    assert reps == {"root.png": 3, "10_ohwx/a.png": 10, "10_ohwx/b.jpg": 10, "5_style/10_inner/c.png": 10,
                    "5_style/plain/d.png": 5, "0_zero/e.png": 3, "2024_trip/f.png": 2024}
    assert list(reps) == ["root.png", "0_zero/e.png", "10_ohwx/a.png", "10_ohwx/b.jpg", "2024_trip/f.png",
                          "5_style/10_inner/c.png", "5_style/plain/d.png"]  # sorted, files before sub-folders
    assert scan.samples_per_epoch == sum(reps.values())
    assert scan.folders["10_ohwx"] == {"images": 2, "usable": 2, "repeats": 10}
    flat = scan_dataset(cfg_for(tmp_path, data, recursive=False))
    assert [r.rel_path for r in flat.records] == ["root.png"]


def test_hidden_output_and_extensions(tmp_path, data):
    write(data / "A.JPG", encoded("JPEG"))
    write(data / "b.Png", encoded("PNG"))
    write(data / "c.gif", encoded("GIF"))
    write(data / ".hidden.png", encoded("PNG"))
    write(data / "._A.JPG", b"\x00\x05\x16\x07AppleDouble")
    write(data / ".cache" / "x.png", encoded("PNG"))
    write(data / "out" / "sample.png", encoded("PNG"))
    write(data / "readme.md", "x")
    cfg = TrainConfig(dataset_path=data, base_model="org/model", output_path=data / "out", trigger_words=("ohwx",))
    scan = scan_dataset(cfg)
    assert [r.rel_path for r in scan.records] == ["A.JPG", "b.Png"]
    assert scan.ignored_files == 2  # c.gif, readme.md
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp"} == set(IMAGE_EXTENSIONS)


def test_caption_matching_and_triggers(tmp_path, data):
    write(data / "a.png", encoded("PNG"))
    write(data / "a.caption", "ohwx, a")
    write(data / "b.png", encoded("PNG"))
    write(data / "b.txt", "no trigger here")  # wrong extension for this config
    write(data / "C.png", encoded("PNG"))
    write(data / "C.CAPTION", "a dog")  # case differs
    write(data / "d.png", encoded("PNG"))
    write(data / "d.caption", "   \n")
    write(data / "e.png", encoded("PNG"))
    write(data / "e.caption", b"caf\xe9, ohwx")
    scan = scan_dataset(cfg_for(tmp_path, data, caption_extension=".caption"))
    recs = by_name(scan)
    assert recs["a.png"].caption == "ohwx, a" and recs["b.png"].caption is None
    assert recs["C.png"].caption == "a dog" and recs["C.png"].missing_triggers == ("ohwx",)
    assert sorted(r.rel_path for r in scan.without_caption) == ["b.png", "d.png"]
    assert [r.rel_path for r in scan.missing_trigger] == ["C.png"]
    assert recs["e.png"].caption == "café, ohwx" and "cp1252" in recs["e.png"].caption_warnings[0]
    assert scan.caption_warnings == (("e.caption", recs["e.png"].caption_warnings[0]),)
    assert scan.ignored_files == 1  # b.txt


def test_exif_orientation_swaps_size(tmp_path, data):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 96x64, shown 64x96
    noisy(96, 64).save(data / "rot.jpg", exif=exif.tobytes())
    rec = scan_dataset(cfg_for(tmp_path, data)).records[0]
    assert (rec.width, rec.height, rec.exif_rotated) == (64, 96, True)


def test_too_small_rules(tmp_path, data):
    for name, (w, h) in {"wide.png": (1024, 500), "tall.png": (600, 1000), "big.png": (1200, 1200)}.items():
        noisy(w, h).save(data / name)
    square = scan_dataset(cfg_for(tmp_path, data, resolution=512, enable_bucketing=False))
    assert sorted(r.rel_path for r in square.too_small) == ["wide.png"]  # shorter side 500 < 512
    buckets = scan_dataset(cfg_for(tmp_path, data, resolution=768, enable_bucketing=True))
    # 1024x500 lands in a 1088x512 bucket (needs upscaling); 600x1000 covers its 576x960 bucket
    assert [r.rel_path for r in buckets.too_small] == ["wide.png"]
    assert buckets.resolution == 768 and buckets.bucketing
    big_res = scan_dataset(cfg_for(tmp_path, data), resolution=1024, bucketing=False)
    assert sorted(r.rel_path for r in big_res.too_small) == ["tall.png", "wide.png"]


def test_normal_scan_never_decodes_pixels(tmp_path, data, monkeypatch):
    # The cost model of --validate-only: headers and file tails only.
    for i in range(4):
        write(data / f"{i}.jpg", encoded("JPEG"))
        write(data / f"{i}.png", encoded("PNG"))

    def boom(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    scan = scan_dataset(cfg_for(tmp_path, data))
    assert len(scan.usable) == 8


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_dataset(cfg_for(tmp_path, tmp_path / "nope"))
    f = write(tmp_path / "file.png", encoded("PNG"))
    with pytest.raises(NotADirectoryError):
        scan_dataset(cfg_for(tmp_path, f))


def test_threaded_reads_give_the_serial_result_in_order(tmp_path, data, monkeypatch):
    """The scan reads IO_THREADS files at a time (a cold page cache is latency-bound): the records, their order,
    every problem and the fingerprint are what one file at a time gives."""
    good = encoded("PNG")
    for i in range(70):
        kind = i % 7
        name = data / f"{i // 10}_set" / f"img_{i:03d}.{'jpg' if kind == 1 else 'png'}"
        payload = {0: good, 1: encoded("JPEG")[:-300], 2: b"", 3: b"not an image at all"}.get(kind, good)
        write(name, payload)
        if kind != 4:
            write(name.with_suffix(".txt"), f"ohwx, picture {i}" if kind != 5 else "no trigger here")
    cfg = cfg_for(tmp_path, data, recursive=True)

    monkeypatch.setattr(ds, "IO_THREADS", 10**6)  # fewer jobs than 2 x threads: one at a time
    serial = scan_dataset(cfg, workers=1)
    monkeypatch.setattr(ds, "IO_THREADS", 4)
    threaded = scan_dataset(cfg, workers=1)
    assert len(serial.records) == 70 and {r.problem["code"] for r in serial.bad if r.problem} >= {"truncated", "zero_byte", "not_an_image"}
    assert threaded.records == serial.records and threaded.fingerprint == serial.fingerprint
