"""Benchmark ``train_lora.py --validate-only`` on a 1,000-image dataset; it promises about a second.

    python3 bench/bench_validate_only.py [--images 1000] [--runs 5] [--family sdxl] [--keep DIR]

Builds, in a temp folder: a dataset of ordinary photos' sizes (512x768, 768x512, 640x640, 832x1216,
1024x1024; JPEG/PNG mix, noisy pixels so files have realistic sizes, some kohya '10_name' folders,
a few images without captions) and a stand-in diffusers model folder (model_index.json, component
configs, weight files with valid empty safetensors headers): the preflight reads only headers, so
real weights would not change its cost. Then it times the CLI as a subprocess (what a parent program
sees, interpreter start-up included), checks with ``-X importtime`` that no heavy library was imported,
and prints the table last. Page cache is warm after the first run; the first run is shown separately. Last, a
first scan with a cold page cache: every dataset file is evicted with posix_fadvise(DONTNEED) (no root needed,
unlike drop_caches), as after copying a fresh dataset or after other work pushed it out of memory.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "safetensors", "accelerate", "peft")
SIZES = [(512, 768), (768, 512), (640, 640), (832, 1216), (1024, 1024)]


def _template(w: int, h: int, fmt: str, seed: int, noise: float) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), np.full_like(xx, 128)], axis=-1)
    pixels = np.clip(base + rng.normal(0, noise, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else
                                                            {"compress_level": 1 if noise else 9}))
    return buf.getvalue()


def make_dataset(root: Path, n: int) -> dict:
    """n images; copies of a few encoded templates (encoding 1,000 noisy PNGs would take a minute). Past 10,000
    images the pixels are smooth gradients: the same sizes and formats in ~50 KB files instead of ~750 KB (100,000
    noisy files are 74 GB); the scan reads headers and the last 4 KiB, so only the page cache sees the difference."""
    noise = 12 if n <= 10000 else 0
    templates = [(w, h, fmt, _template(w, h, fmt, i, noise)) for i, ((w, h), fmt) in
                 enumerate((s, f) for s in SIZES for f in ("JPEG", "PNG"))]
    folders = [root, root / "10_ohwx", root / "3_style"]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    total_bytes = 0
    for i in range(n):
        w, h, fmt, data = templates[i % len(templates)]
        folder = folders[i % len(folders)]
        stem = f"img_{i:05d}"
        (folder / f"{stem}.{'jpg' if fmt == 'JPEG' else 'png'}").write_bytes(data)
        total_bytes += len(data)
        if i % 50 != 7:  # 2% without caption: exercises the warning path
            (folder / f"{stem}.txt").write_text(f"ohwx, a photo, {w}x{h}, tag{i % 13}, tag{i % 7}\n", encoding="utf-8")
    return {"images": n, "bytes": total_bytes}


def _empty_safetensors(path: Path) -> None:
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def make_model(root: Path, family: str) -> Path:
    sdxl = family == "sdxl"
    comps = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    if sdxl:
        comps.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"])
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
             "_diffusers_version": "0.42.1", **comps}
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(index))
    unet_cfg = {"cross_attention_dim": 2048 if sdxl else 768, "addition_embed_type": "text_time" if sdxl else None}
    for name in comps:
        d = root / name
        d.mkdir()
        if name == "scheduler":
            (d / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
        elif name.startswith("tokenizer"):
            (d / "vocab.json").write_text("{}")
            (d / "merges.txt").write_text("#version: 0.2\n")
        else:
            (d / "config.json").write_text(json.dumps(unet_cfg if name == "unet" else {"hidden_act": "quick_gelu"}))
            _empty_safetensors(d / ("model.safetensors" if name.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"))
    return root


def evict(root: Path) -> int:
    """Drop every file under ``root`` from the page cache (clean pages only: sync first); returns the count."""
    os.sync()
    n = 0
    for d, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def _run(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return time.perf_counter() - t, proc


def _imported_heavy(importtime_stderr: str) -> list[str]:
    """Top-level names of heavy packages in a ``-X importtime`` log."""
    found = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip().split(".")[0]
            if name in HEAVY:
                found.add(name)
    return sorted(found)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sdxl",
                    help="sdxl (default) also computes the bucket plan: the more expensive path")
    ap.add_argument("--keep", metavar="DIR", help="build in DIR and keep it (default: a temp folder, removed)")
    args = ap.parse_args(argv)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_validate_"))
    try:
        t = time.perf_counter()
        if work.exists() and any(work.iterdir()):
            shutil.rmtree(work)
        info = make_dataset(work / "data", args.images)
        model = make_model(work / "model", args.family)
        build_s = time.perf_counter() - t
        cfg = {"dataset_path": str(work / "data"), "base_model": str(model), "output_path": str(work / "out"),
               "trigger_words": ["ohwx"], "batch_size": 4, "num_epochs": 10}
        (work / "c.json").write_text(json.dumps(cfg))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        cli = [sys.executable, str(ROOT / "train_lora.py"), "--config", str(work / "c.json"), "--validate-only"]
        if not (ROOT / "train_lora.py").exists():  # fallback while the CLI did not exist yet
            cli = [sys.executable, "-c", "import sys; from lora_trainer.config.config import load_config; "
                   "from lora_trainer.preflight.run import run_preflight; c, w = load_config(sys.argv[1]); "
                   "sys.exit(0 if run_preflight(c, w).ok else 2)", str(work / "c.json")]

        times, rcs, inner = [], set(), []
        first_s = cold_index_s = None
        index = work / "out" / "cache" / "dataset_index.json"
        for i in range(args.runs + 2):
            # run 0 warms the page cache and .pyc files; run 1 scans every file again (its index removed), with a
            # warm page cache: a first validation; the rest reuse the index, as every later run does.
            if i == 1:
                index.unlink(missing_ok=True)
            wall, proc = _run(cli, env)
            rcs.add(proc.returncode)
            if i == 0:
                first_s = wall
                continue
            if i == 1:
                cold_index_s = wall
                continue
            times.append(wall)
            for line in proc.stdout.splitlines():
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if ev.get("type") == "validation":
                    inner.append(ev["summary"].get("duration_s"))
                    last_event = ev
        index.unlink(missing_ok=True)
        evict(work / "data")
        cold_s, _ = _run(cli, env)
        _, proc = _run([sys.executable, "-X", "importtime", *cli[1:]], env)
        heavy = _imported_heavy(proc.stderr)

        ds = last_event["summary"]["dataset"] if inner else {}
        rows = [
            ("images", f"{info['images']} ({info['bytes'] / 1e6:.0f} MB; {ds.get('usable', '?')} usable, "
                       f"{ds.get('without_caption', '?')} without caption)"),
            ("model stand-in", f"{args.family} diffusers folder (empty safetensors headers)"),
            ("dataset build", f"{build_s:.2f} s"),
            ("runs", f"{len(times)} (+1 warm-up: {first_s:.3f} s)"),
            ("first scan (no index; warm page cache)", f"{cold_index_s:.3f} s"),
            ("first scan (no index; cold page cache)", f"{cold_s:.3f} s"),
            ("wall median (index reused)", f"{statistics.median(times):.3f} s"),
            ("wall min / max", f"{min(times):.3f} s / {max(times):.3f} s"),
            ("preflight only (median)", f"{statistics.median(inner):.3f} s" if inner else "n/a"),
            ("exit codes", ", ".join(map(str, sorted(rcs)))),
            ("validation ok", str(last_event.get("ok")) if inner else "n/a"),
            ("heavy imports", ", ".join(heavy) if heavy else "none (torch not imported)"),
        ]
        width = max(len(k) for k, _ in rows)
        print(f"\n{'validate-only benchmark':<{width}} | {sys.executable} on {os.cpu_count()} CPUs")
        print("-" * (width + 50))
        for k, v in rows:
            print(f"{k:<{width}} | {v}")
        return 0 if not heavy and inner else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
