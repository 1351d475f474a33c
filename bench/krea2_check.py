"""Krea 2 at its published size for the benches: the real configs (krea/Krea-2-Raw: Krea2Transformer2DModel's
defaults, 12.82 B; the Qwen-Image VAE; Qwen3-VL-4B), built on the meta device for parameter counts and the memory
plan (``meta_components``), or with random weights on the card for the GPU check (``make_model``, the ``krea2`` row of
bench/device_families.py). The GPU check's text encoder is a 2-layer stand-in of Qwen3-VL-4B's real width (2560)
read at 12 taps (text_encoder_select_layers over its 3 hidden states), so the text cache (512 x 12 x 2560 per
caption) and the text-fusion block see real shapes; the trainer caches its output once and releases it, so its depth
changes set-up time only.

    python3 bench/krea2_check.py --count                    # parameter counts (meta device)
    python3 bench/device_check.py --device cpu --tiny --no-flux --no-sdxl --families krea2 --only krea2/tiny  # CPU dry run
    python3 bench/krea2_check.py --plan                     # the memory plan of the full-size model (headers only)
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (parameters, image tokens at 1024 px, text tokens the runs pad to): device_check's MFU estimate.
FULL_SIZE = (12.820e9, 4096, 512)
# krea/Krea-2-Raw transformer/config.json = Krea2Transformer2DModel's defaults (= ai-toolkit's KREA2_MMDIT_CONFIG).
KREA2_TRANSFORMER: dict = {}
# vae/config.json: the Qwen-Image VAE = AutoencoderKLQwenImage's defaults.
KREA2_VAE: dict = {}
# Qwen3-VL-4B-Instruct: text 2560 wide, 36 layers, 32 heads of 128, 8 kv heads; its vision tower.
QWEN3VL_TEXT = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                     "mrope_interleaved": True})
QWEN3VL_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                      deepstack_visual_indexes=[5, 11, 17])
SELECT_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)  # the pipeline's default taps
STANDIN_SELECT = (1, 2) * 6  # 12 taps of the 2-layer stand-in


def text_encoder(te: str = "full"):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from lora_trainer.testing.qwen import QWEN_VOCAB_SIZE

    text, vision = dict(QWEN3VL_TEXT), dict(QWEN3VL_VISION)
    if te == "standin":
        text.update(num_hidden_layers=2, vocab_size=QWEN_VOCAB_SIZE)
        vision.update(depth=1, hidden_size=64, intermediate_size=64, num_heads=2, deepstack_visual_indexes=[0])
    return Qwen3VLModel(Qwen3VLConfig(text_config=text, vision_config=vision))


def components(te: str = "full") -> dict:
    from diffusers import AutoencoderKLQwenImage, Krea2Transformer2DModel

    return {"transformer": Krea2Transformer2DModel(**KREA2_TRANSFORMER), "vae": AutoencoderKLQwenImage(**KREA2_VAE),
            "text_encoder": text_encoder(te)}


def meta_components() -> dict:
    import torch

    with torch.device("meta"):
        return components("full")


def make_model(out: Path, *, device: str = "cuda", dtype=None, te: str = "standin") -> Path:
    """Build (random weights, directly on ``device`` in ``dtype``) and save a Krea2Pipeline folder (Raw)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    from bench.models import random_components
    from lora_trainer.families.krea2.tiny import KREA2_SCHEDULER
    from lora_trainer.families.qwen_image.tiny import QWEN_TEMPLATE_WORDS
    from lora_trainer.testing.qwen import make_tiny_qwen_tokenizer

    comps = random_components(lambda: components(te), device, dtype)
    pipe = Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**KREA2_SCHEDULER), vae=comps["vae"],
                         text_encoder=comps["text_encoder"], transformer=comps["transformer"],
                         tokenizer=make_tiny_qwen_tokenizer(extra_words=QWEN_TEMPLATE_WORDS),
                         text_encoder_select_layers=STANDIN_SELECT if te == "standin" else SELECT_LAYERS)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    return out


def make_meta_folder(root: Path) -> Path:
    """A Krea-2-Raw folder with every component's real header (meta shapes, sparse data): what the probe and the
    memory plan read (bench_memory_plan.make_folder's way, for this family)."""
    from bench.bench_memory_plan import _saved_state, header_only
    from lora_trainer.families.krea2.tiny import KREA2_SCHEDULER
    from lora_trainer.testing.qwen import make_tiny_qwen_tokenizer

    classes = {"transformer": ("diffusers", "Krea2Transformer2DModel"), "vae": ("diffusers", "AutoencoderKLQwenImage"),
               "text_encoder": ("transformers", "Qwen3VLModel"), "tokenizer": ("transformers", "Qwen2Tokenizer"),
               "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Krea2Pipeline", "_diffusers_version": "0.42.1",
                                                       "text_encoder_select_layers": list(SELECT_LAYERS),
                                                       "is_distilled": False, **{k: list(v) for k, v in classes.items()}}))
    models = meta_components()
    for comp, (lib, cls) in classes.items():
        d = root / comp
        d.mkdir(exist_ok=True)
        if comp == "scheduler":
            (d / "scheduler_config.json").write_text(json.dumps(KREA2_SCHEDULER))
        elif comp == "tokenizer":
            make_tiny_qwen_tokenizer().save_pretrained(d)
        else:
            model = models[comp]
            config = dict(model.config) if lib == "diffusers" else model.config.to_dict()
            config["_class_name"] = cls
            (d / "config.json").write_text(json.dumps(config, default=list))
            name = "model.safetensors" if lib == "transformers" else "diffusion_pytorch_model.safetensors"
            header_only(d / name, _saved_state(model), "F32" if comp == "vae" else "BF16")
    return root


# (resolution, settings) of the plan table: the default preset, then what the GPU check runs.
PLAN_CASES = [(1024, {"gradient_checkpointing": True}), (1024, {}), (1024, {"gradient_checkpointing": True,
              "base_quantization": "fp8"}), (1024, {"gradient_checkpointing": True, "target_modules": "all_linear",
              "lora_rank": 32}), (512, {"gradient_checkpointing": True})]


def plan_table() -> list[dict]:
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.memory_plan import plan_memory
    from lora_trainer.preflight.probe import probe_model
    from lora_trainer.testing.tiny import make_dataset

    work = Path(tempfile.mkdtemp(prefix="krea2-plan-"))
    folder = make_meta_folder(work / "krea2")
    data = make_dataset(work / "data", n=2, trigger="ohwx")
    probe = probe_model(str(folder), work)
    rows = []
    for res, settings in PLAN_CASES:
        cfg, _ = parse_config({"dataset_path": str(data), "base_model": str(folder), "trigger_words": ["ohwx"],
                               "output_path": str(work / "out"), "resolution": res, "mixed_precision": "bf16",
                               **settings})
        plan = plan_memory(cfg, probe, probe.family, res, gpu={"name": "H100", "memory_bytes": 80 * 2 ** 30})
        rows.append({"resolution": res, "settings": settings, "total_gib": plan["total_gib"],
                     "parts_gib": plan["parts_gib"]})
    return rows


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", action="store_true", help="print parameter counts (meta device)")
    ap.add_argument("--plan", action="store_true", help="the memory plan of the full-size model (headers only)")
    args = ap.parse_args()
    if args.count:
        for name, module in meta_components().items():
            print(f"{name}: {sum(p.numel() for p in module.parameters()) / 1e9:.3f} B")
        return 0
    if args.plan:
        for row in plan_table():
            print(json.dumps(row))
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
