"""Qwen-Image 2.1 at its published size for the benches: the real transformer (QwenImage21Transformer2DModel's
defaults = Qwen/Qwen-Image-2.1's transformer/config.json, 7.115 B), the RGBA 64-channel VAE (AutoencoderKLQwenImage21's
defaults) and Qwen3-VL-8B, built on the meta device for the memory plan (``plan_folder``: header-only files) or with
random weights on a device for the GPU check (``make_model``, the ``qwen-image-2.1`` row of
bench/device_families.py).

The GPU check's text encoder is a 2-layer stand-in of the real width (4096 = context_in_dim) over the tiny
tokenizer's vocabulary: the trainer caches its output once and releases it, so its depth changes set-up time only.

    python3 bench/qwen_image21_check.py --count                      # parameter counts (meta device)
    python3 bench/qwen_image21_check.py --plan                       # the memory plan at 1024 px (header-only folder)
    python3 bench/device_check.py --device cpu --tiny --no-flux --no-sdxl --families qwen-image-2.1 --only qwen-image-2.1/tiny  # CPU dry run
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (parameters, image tokens at 1024 px: one per 16x16 px, text tokens: max_sequence_length) for the MFU estimate.
FULL_SIZE = (7.115e9, 4096, 512)
TRANSFORMER: dict = {}  # QwenImage21Transformer2DModel's defaults: 32 blocks of 32 x 128, context_in_dim 4096
VAE: dict = {}  # AutoencoderKLQwenImage21's defaults: z_dim 64, 16x, base_dim 96, decoder_base_dim 144
# Qwen3-VL-8B-Instruct's text_encoder config (hidden 4096 = context_in_dim; recalled from the published config, not
# read from the repo here: only the stand-in's width matters to training).
TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True})
VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[8, 16, 24],
              num_position_embeddings=2304)
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192)  # as the tiny model's (families/qwen_image21/tiny.py)


def text_encoder(te: str = "full"):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from lora_trainer.testing.qwen import QWEN_VOCAB_SIZE

    text, vision = dict(TEXT), dict(VISION)
    if te == "standin":
        text.update(num_hidden_layers=2, vocab_size=QWEN_VOCAB_SIZE)
        vision.update(depth=1, hidden_size=64, intermediate_size=64, num_heads=2, deepstack_visual_indexes=[0])
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision))


def components(te: str = "full") -> dict:
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel

    return {"transformer": QwenImage21Transformer2DModel(**TRANSFORMER), "vae": AutoencoderKLQwenImage21(**VAE),
            "text_encoder": text_encoder(te)}


def count() -> dict:
    import torch

    with torch.device("meta"):
        comps = components("full")
    return {name: sum(p.numel() for p in m.parameters()) for name, m in comps.items()}


def plan_folder(root: Path) -> Path:
    """A diffusers folder of the real architecture with header-only weights (what the probe and the plan read)."""
    import torch

    from bench.bench_memory_plan import write_header_only_components
    from lora_trainer.families.qwen_image21.tiny import make_processor

    with torch.device("meta"):
        comps = components("full")
    classes = {"transformer": ["diffusers", "QwenImage21Transformer2DModel"],
               "vae": ["diffusers", "AutoencoderKLQwenImage21"],
               "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
               "processor": ["transformers", "Qwen3VLProcessor"],
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline",
                                                       "_diffusers_version": "0.42.1", **classes}))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    make_processor().save_pretrained(root / "processor")
    write_header_only_components(root, comps, classes)
    return root


def plan(root: Path, **settings) -> dict:
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight import memory_plan
    from lora_trainer.preflight.probe import probe_model
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(root.parent / "data", n=1, trigger="ohwx")
    cfg, _ = parse_config({"dataset_path": str(data), "base_model": str(root), "output_path": str(root.parent / "o"),
                           "trigger_words": ["ohwx"], "resolution": 1024, "mixed_precision": "bf16", **settings})
    return memory_plan.plan_memory(cfg, probe_model(str(root)), "qwen_image21", 1024, gpu=None)


def make_model(out: Path, *, device: str = "cuda", dtype=None) -> Path:
    """Random weights, built on ``device`` in ``dtype``, saved as a QwenImage21Pipeline folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    from bench.models import random_components
    from lora_trainer.families.qwen_image21.tiny import make_processor

    comps = random_components(lambda: components("standin"), device, dtype)
    pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), processor=make_processor(),
                               **comps)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", action="store_true")
    ap.add_argument("--plan", action="store_true")
    args = ap.parse_args(argv)
    if args.count:
        print(json.dumps({k: f"{v / 1e9:.3f} B" for k, v in count().items()}))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="qwen21-"))
    if args.plan:
        root = plan_folder(tmp / "model")
        for settings in ({"gradient_checkpointing": True, "optimizer": "adamw8bit", "lora_rank": 16},
                         {"gradient_checkpointing": True, "optimizer": "adamw8bit", "lora_rank": 16,
                          "base_quantization": "fp8"},
                         {"gradient_checkpointing": False, "optimizer": "adamw8bit", "lora_rank": 16}):
            p = plan(root, **settings)
            print(json.dumps({"settings": settings, "total_gib": p["total_gib"], "parts_gib": p["parts_gib"]}))
        return 0
    ap.print_help()
    return 0

if __name__ == "__main__":
    sys.exit(main())
