"""Anima at its published size for the benches: CosmosTransformer3DModel as Cosmos-Predict2-2B (28 blocks, 16 heads
of 128, text 1024; families-2026.md §5: 1.956 B measured), the AnimaTextConditioner's defaults (6 blocks, 1024 wide,
T5's 32128 ids: 0.135 B), Qwen3-0.6B and the Qwen-Image VAE, as an AnimaModularPipeline folder
(modular_model_index.json). Built on the meta device for counts and the memory plan, or with random weights on a
device for the GPU check (``make_model``, the ``anima`` row of bench/device_families.py).

The GPU check's Qwen3 is a 2-layer stand-in of the real width (1024) over the tiny tokenizer's vocabulary: the
trainer caches the conditioner's output once and releases Qwen3 and the conditioner, so their size changes set-up
time only (as the FLUX T5 and Qwen2.5-VL stand-ins).

    python3 bench/anima_check.py --count                                   # parameter counts (meta device)
    python3 bench/anima_check.py --plan                                    # the memory plan at 1024 px (meta)
    python3 bench/device_check.py --device cpu --tiny --no-flux --no-sdxl --families anima --only anima/tiny  # CPU dry run
    python3 bench/anima_check.py --out $OUT/anima.json                     # on a GPU: full size, 1024 px
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (parameters trained through: transformer + conditioner, image tokens at 1024 px (64 x 64 after 8x VAE and 2x2
# patches), text tokens (the conditioner's 512)) for device_check's MFU estimate.
FULL_SIZE = (2.091e9, 4096, 512)
# Cosmos-Predict2-2B as ComfyUI detects it (2048 wide, 28 blocks, 16 heads, text 1024); no learnable positional
# embedding (diffusers' Cosmos 2.0 single-file table has no name for one).
ANIMA_TRANSFORMER = dict(in_channels=16, out_channels=16, num_attention_heads=16, attention_head_dim=128, num_layers=28,
                         mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240),
                         patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True,
                         extra_pos_embed_type=None)
ANIMA_CONDITIONER: dict = {}  # AnimaTextConditioner's defaults
# Qwen3-0.6B (Qwen/Qwen3-0.6B config.json): 1024 wide, 28 layers, 16 heads of 128, 8 KV heads, tied embeddings.
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, vocab_size=151936,
                 tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
STANDIN_LAYERS = 2


def components(te: str = "full") -> dict:
    """transformer, text_conditioner, vae, text_encoder at the published configs, on the current default device."""
    from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
    from transformers import Qwen3Config, Qwen3Model

    from lora_trainer.testing.qwen import QWEN_VOCAB_SIZE

    text = dict(QWEN3_06B)
    if te == "standin":
        text.update(num_hidden_layers=STANDIN_LAYERS, vocab_size=QWEN_VOCAB_SIZE)
    return {"transformer": CosmosTransformer3DModel(**ANIMA_TRANSFORMER),
            "text_conditioner": AnimaTextConditioner(**ANIMA_CONDITIONER), "vae": AutoencoderKLQwenImage(),
            "text_encoder": Qwen3Model(Qwen3Config(**text))}


def count() -> dict:
    import torch

    with torch.device("meta"):
        comps = components("full")
    return {name: sum(p.numel() for p in m.parameters()) for name, m in comps.items()}


def make_model(out: Path, *, device: str = "cuda", dtype=None, te: str = "standin") -> Path:
    """Build (random weights on ``device`` in ``dtype``; the VAE fp32) and save an AnimaModularPipeline folder."""
    import torch
    from diffusers import AnimaAutoBlocks, FlowMatchEulerDiscreteScheduler

    from bench.models import random_components
    from lora_trainer.families.anima.tiny import ANIMA_SCHEDULER
    from lora_trainer.testing.parts import save_pipeline
    from lora_trainer.testing.qwen import make_tiny_qwen_tokenizer
    from lora_trainer.testing.t5 import make_tiny_t5_tokenizer

    torch.manual_seed(0)
    comps = random_components(lambda: components(te), device, dtype)
    pipe = AnimaAutoBlocks().init_pipeline()
    # The tiny T5 tokenizer's ids stay below its 512 rows: the real conditioner's 32128-row table takes them.
    pipe.update_components(**comps, tokenizer=make_tiny_qwen_tokenizer(), t5_tokenizer=make_tiny_t5_tokenizer(),
                           scheduler=FlowMatchEulerDiscreteScheduler(**ANIMA_SCHEDULER))
    return save_pipeline(pipe, out)


def make_meta_folder(root: Path) -> Path:
    """Header-only (sparse) weight files of the full-size components in a modular folder: what the plan reads."""
    import torch

    from bench.bench_memory_plan import _saved_state, header_only
    from lora_trainer.families.anima.tiny import build

    tiny = build()  # configs, tokenizers, scheduler and index from the tiny pipeline, then full-size headers
    from lora_trainer.testing.parts import save_pipeline

    save_pipeline(tiny, root)
    with torch.device("meta"):
        comps = components("full")
    for name, model in comps.items():
        d = root / name
        for f in d.glob("*.safetensors"):
            f.unlink()
        config = dict(model.config) if name != "text_encoder" else model.config.to_dict()
        config["_class_name"] = type(model).__name__
        (d / "config.json").write_text(json.dumps(config, default=list))
        file = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
        header_only(d / file, _saved_state(model), "F32" if name == "vae" else "BF16")
    return root


def plan(resolution: int = 1024, **settings) -> dict:
    """The memory plan for the full-size folder (bf16, cached latents and text, LoRA r16 on the default preset)."""
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.memory_plan import plan_memory
    from lora_trainer.preflight.probe import probe_model
    from lora_trainer.testing.tiny import make_dataset

    tmp = Path(tempfile.mkdtemp(prefix="anima-plan-"))
    folder = make_meta_folder(tmp / "anima")
    data = make_dataset(tmp / "data", n=2, trigger="ohwx")
    cfg, _ = parse_config({"dataset_path": str(data), "base_model": str(folder), "output_path": str(tmp / "out"),
                           "trigger_words": ["ohwx"], "resolution": resolution, "lora_rank": 16,
                           "mixed_precision": "bf16", **settings})
    probe = probe_model(str(folder))
    return plan_memory(cfg, probe, probe.family, resolution, gpu=None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", action="store_true", help="parameter counts of the full-size components (meta)")
    ap.add_argument("--plan", action="store_true", help="the memory plan of the full-size model at 1024 px")
    args = ap.parse_args(argv)
    if args.count:
        print(json.dumps({k: f"{v / 1e9:.3f} B" for k, v in count().items()}))
        return 0
    if args.plan:
        for name, settings in (("bf16 gc", {"gradient_checkpointing": True}), ("bf16", {}),
                               ("fp8 gc", {"gradient_checkpointing": True, "base_quantization": "fp8"})):
            p = plan(**settings)
            print(name, json.dumps(p, default=str)[:700])
        return 0
    ap.print_help()
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
