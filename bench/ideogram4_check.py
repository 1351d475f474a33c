"""Ideogram 4 at full size: parameter counts, the memory plan on header-only files of the published architecture,
and (on a lent GPU, through bench/device_check.py's helpers) the real CLI at 1024 px.

    python3 bench/ideogram4_check.py --count                          # parameter counts, meta device
    python3 bench/ideogram4_check.py --plan                           # memory plan figures (header-only folder)
    python3 bench/device_check.py --device cpu --tiny --no-flux --no-sdxl --families ideogram4 --only ideogram4/tiny  # CPU dry run

Model: Ideogram4Transformer2DModel's defaults (34 layers, 18 x 256, SwiGLU 12288, llm_features_dim 53,248: 9.279 B,
families-2026 section 2), twice (the unconditional one is a sampling_only component: on the host while training);
the FLUX.2 VAE (AutoencoderKLFlux2 defaults); Qwen3-VL-8B's text model (36 layers, 4096 wide) for the counts and the
plan. For the GPU runs the text encoder is a stand-in of the real width and depth (36 layers of 4096, so the
pipeline's taps up to layer 35 exist and the features are 53,248 wide) with one 128-wide attention head and a
64-wide MLP (0.1 B instead of 8 B: the trainer encodes the captions once and releases it), and the unconditional
transformer a 1-layer stand-in of the real width (the check does not sample).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (parameters of the trained transformer, image tokens at 1024 px, text tokens) for the MFU estimate: 16 px per
# token; a typical templated caption of the text cache's planning figure (spec.text_entry.tokens).
FULL_SIZE = (9.279e9, 4096, 512)
# Qwen3-VL-8B's text model (config.json of Qwen/Qwen3-VL-8B-Instruct): 4096 wide, 36 layers, 32 heads of 128, 8 KV.
QWEN3_VL_8B_TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144)
STANDIN_TEXT = {**QWEN3_VL_8B_TEXT, "intermediate_size": 64, "num_attention_heads": 1, "num_key_value_heads": 1}


def _text_encoder(text: dict, vocab: int | None = None):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from lora_trainer.testing.qwen import QWEN_VOCAB_SIZE

    return Qwen3VLModel(Qwen3VLConfig(
        text_config={**text, "vocab_size": vocab or text["vocab_size"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20]}},
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=64, num_heads=1, out_hidden_size=text["hidden_size"],
                           deepstack_visual_indexes=[]),
        image_token_id=QWEN_VOCAB_SIZE - 1))


def meta_components() -> dict:
    import torch
    from diffusers import AutoencoderKLFlux2, Ideogram4Transformer2DModel

    with torch.device("meta"):
        return {"transformer": Ideogram4Transformer2DModel(),
                "unconditional_transformer": Ideogram4Transformer2DModel(),
                "vae": AutoencoderKLFlux2(), "text_encoder": _text_encoder(QWEN3_VL_8B_TEXT)}


def count() -> dict:
    comps = meta_components()
    out = {k: sum(p.numel() for p in m.parameters()) for k, m in comps.items()}
    out["text_encoder (language model)"] = sum(p.numel() for p in comps["text_encoder"].language_model.parameters())
    return out


def make_folder(root: Path) -> Path:
    """A header-only diffusers folder of the published architecture (bf16; the VAE fp32), for the memory plan."""
    from bench.bench_memory_plan import _saved_state, header_only
    from lora_trainer.families.ideogram4.tiny import SCHEDULER
    from lora_trainer.testing.qwen import make_tiny_qwen_tokenizer

    classes = {"transformer": ("diffusers", "Ideogram4Transformer2DModel"),
               "unconditional_transformer": ("diffusers", "Ideogram4Transformer2DModel"),
               "vae": ("diffusers", "AutoencoderKLFlux2"), "text_encoder": ("transformers", "Qwen3VLModel"),
               "tokenizer": ("transformers", "Qwen2Tokenizer"),
               "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Ideogram4Pipeline",
                                                       "_diffusers_version": "0.42.1", **classes}))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    make_tiny_qwen_tokenizer().save_pretrained(root / "tokenizer")
    for comp, model in meta_components().items():
        d = root / comp
        d.mkdir(exist_ok=True)
        lib = classes[comp][0]
        config = dict(model.config) if lib == "diffusers" else model.config.to_dict()
        config["_class_name"] = classes[comp][1]
        (d / "config.json").write_text(json.dumps(config, default=list))
        name = "model.safetensors" if lib == "transformers" else "diffusion_pytorch_model.safetensors"
        header_only(d / name, _saved_state(model), "F32" if comp == "vae" else "BF16")
    return root


def plan(root: Path, data: Path, **settings) -> dict:
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.memory_plan import plan_memory
    from lora_trainer.preflight.probe import probe_model

    cfg, _ = parse_config({"dataset_path": str(data), "base_model": str(root), "output_path": str(root.parent / "o"),
                           "trigger_words": ["ohwx"], "mixed_precision": "bf16", **settings})
    probe = probe_model(str(root), root.parent)
    return plan_memory(cfg, probe, probe.family, settings.get("resolution", 1024), gpu=None)


def make_model(out: Path, *, device: str = "cuda", dtype=None) -> Path:
    """The GPU runs' folder: the full conditional transformer, the stand-ins (module doc), random weights."""
    import torch
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline,
                           Ideogram4Transformer2DModel)

    from bench.models import random_components
    from lora_trainer.families.ideogram4.tiny import SCHEDULER
    from lora_trainer.testing.qwen import QWEN_VOCAB_SIZE, make_tiny_qwen_tokenizer

    torch.manual_seed(0)
    comps = random_components(lambda: {"transformer": Ideogram4Transformer2DModel(),
                                       "unconditional_transformer": Ideogram4Transformer2DModel(num_layers=1),
                                       "text_encoder": _text_encoder(STANDIN_TEXT, vocab=QWEN_VOCAB_SIZE)},
                              device, dtype or torch.bfloat16)
    pipe = Ideogram4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=AutoencoderKLFlux2(),
                             tokenizer=make_tiny_qwen_tokenizer(), **comps)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def main(argv=None) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", action="store_true")
    ap.add_argument("--plan", action="store_true")
    args = ap.parse_args(argv)
    if args.count:
        print(json.dumps({k: f"{v / 1e9:.3f} B" for k, v in count().items()}, indent=1))
        return 0
    if args.plan:
        from lora_trainer.testing.tiny import make_dataset

        tmp = Path(tempfile.mkdtemp(prefix="ideogram4-plan-"))
        root, data = make_folder(tmp / "model"), Path(make_dataset(tmp / "data", n=2, trigger="ohwx"))
        for name, settings in {"default (attention_mlp, no GC)": {}, "GC": {"gradient_checkpointing": True},
                               "GC + samples": {"gradient_checkpointing": True, "validation_steps": 100},
                               "GC, 8-bit Adam, r16": {"gradient_checkpointing": True, "optimizer": "adamw8bit"},
                               "fp8 + GC": {"gradient_checkpointing": True, "base_quantization": "fp8"},
                               "nf4 + GC": {"gradient_checkpointing": True, "base_quantization": "nf4"}}.items():
            p = plan(root, data, **settings)
            print(f"{name}: total {p['total_gib']} GiB {p['parts_gib']}")
        return 0
    ap.error("--count or --plan (the GPU runs: bench/device_check.py --families ideogram4)")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
