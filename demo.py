#!/usr/bin/env python3
"""End-to-end demo on tiny generated assets: builds a tiny random SDXL-architecture (or FLUX.1-dev / SD3)
pipeline and a small dataset under demo_output/, then runs the real CLI for a few dozen CPU steps, streaming its
JSON events.

    python3 demo.py [--family sdxl|flux1-dev|flux1-schnell|sd3]     (or: make demo [FAMILY=flux1-dev])

The LoRA lands in demo_output/out/demo_lora.safetensors. The model is random, so the LoRA is meaningless
as art; the point is to see the whole pipeline (validation, caching, steps, checkpoints, export) work.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "demo_output"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="sdxl", choices=["sdxl", "flux1-dev", "flux1-schnell", "sd3"])
    family = parser.parse_args(argv).family
    sys.path.insert(0, str(ROOT))
    from lora_trainer.tiny import make_dataset, make_tiny_pipeline

    OUT.mkdir(exist_ok=True)
    model = OUT / f"tiny-{family}"
    if not (model / "model_index.json").exists():
        make_tiny_pipeline(model, family)
    if family == "sdxl":
        # convolutions too: a random tiny model learns visibly faster than with attention alone
        targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2"]
    else:  # the blocks' every Linear; T5 prompts short, as the tiny model's captions are
        targets = "all_linear"
    data = make_dataset(OUT / "dataset", n=12, trigger="ohwx",
                        sizes=[(128, 128), (192, 128), (128, 192), (160, 160)])
    config = {
        "$schema": "../config_schema.json",
        "dataset_path": "dataset", "base_model": f"tiny-{family}", "output_path": "out", "trigger_words": ["ohwx"],
        "training_params": {"resolution": 128, "min_bucket_resolution": 64, "max_bucket_resolution": 256,
                            "batch_size": 2, "max_train_steps": 40, "learning_rate": 3e-3, "lora_rank": 8,
                            "target_modules": targets,
                            **({} if family == "sdxl" else {"max_sequence_length": 64}),
                            "checkpointing_steps": 20, "log_every_n_steps": 5, "output_name": "demo_lora",
                            "overwrite_output": True, "seed": 7, "validation_steps": 20,
                            "validation_inference_steps": 8, "num_validation_images": 2,
                            "validation_prompts": ["ohwx, a red circle, blue background"]},
    }
    (OUT / "config.json").write_text(json.dumps(config, indent=2))
    print(f"demo assets in {OUT} (dataset: {data})", file=sys.stderr)
    for args in (["--validate-only"], []):
        t0 = time.monotonic()
        cmd = [sys.executable, str(ROOT / "train_lora.py"), "--config", str(OUT / "config.json"), *args]
        print(f"\n$ {' '.join(cmd[1:])}", file=sys.stderr)
        rc = subprocess.call(cmd)
        print(f"exit code {rc} after {time.monotonic() - t0:.1f} s", file=sys.stderr)
        if rc:
            return rc
    if family != "sdxl":
        print(f"\nLoRA: {OUT / 'out' / 'demo_lora.safetensors'}", file=sys.stderr)
        return 0
    # The README shows these two pictures (SDXL run): copied from this run, never drawn by hand.
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    shutil.copyfile(OUT / "out" / "loss_curve.png", docs / "demo_loss_curve.png")
    shutil.copyfile(OUT / "out" / "samples" / "step-000040" / "grid.png", docs / "demo_samples_step40.png")
    print(f"\nLoRA: {OUT / 'out' / 'demo_lora.safetensors'}\nreport: {OUT / 'out' / 'report.html'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
