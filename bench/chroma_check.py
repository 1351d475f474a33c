"""Chroma at its published size for the benches: Chroma1-HD's transformer config (ChromaTransformer2DModel's
defaults: FLUX.1's 19 + 38 blocks of 3072 without per-block modulation, a 5-layer 5120-wide approximator; 8.900 B),
FLUX.1's VAE and T5-XXL, built on the meta device for counts and the memory plan, or with random weights on a device
for the GPU check (``make_model``, the ``chroma`` row of bench/device_families.py).

The GPU check's T5 is a 2-layer stand-in of T5-XXL's width (4096, so the text cache and the transformer's txt_in
see real shapes) with the tiny tokenizer's vocabulary: the trainer caches its output once and releases it, so its
depth changes set-up time only (as device_check's FLUX T5 stand-in).

    python3 bench/chroma_check.py --count                  # parameter counts (meta device)
    python3 bench/chroma_check.py --plan                   # the memory plan at 1024 px for the published sizes
    python3 bench/device_check.py --device cpu --tiny --no-flux --no-sdxl --families chroma --only chroma/tiny  # CPU dry run
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# lodestones/Chroma1-HD transformer/config.json = ChromaTransformer2DModel's defaults.
CHROMA_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
                          approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)
# (transformer parameters, image tokens at 1024 px, text tokens): device_check's FULL_SIZE entry for the MFU estimate.
FULL_SIZE = (8.900e9, 4096, 512)


def components(t5_layers: int | None = None, *, t5_vocab: int | None = None) -> dict:
    """Random-weight transformer, vae and text_encoder on the current default device (meta for counts)."""
    from diffusers import AutoencoderKL, ChromaTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from bench.models import FLUX_T5, FLUX_VAE, REAL_T5_VOCAB

    t5 = {**FLUX_T5, **({"num_layers": t5_layers} if t5_layers else {})}
    return {"transformer": ChromaTransformer2DModel(**CHROMA_TRANSFORMER), "vae": AutoencoderKL(**FLUX_VAE),
            "text_encoder": T5EncoderModel(T5Config(vocab_size=t5_vocab or REAL_T5_VOCAB, pad_token_id=0,
                                                    eos_token_id=1, decoder_start_token_id=0, **t5))}


def count() -> dict:
    import torch

    with torch.device("meta"):
        comps = components()
    return {name: sum(p.numel() for p in m.parameters()) for name, m in comps.items()}


def make_model(out: Path, *, device: str = "cuda", dtype=None) -> Path:
    """Build (random weights, directly on ``device``) and save a ChromaPipeline folder with the T5 stand-in."""
    import torch
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    from bench.models import T5_STANDIN_LAYERS, random_components
    from lora_trainer.families.chroma.tiny import CHROMA_SCHEDULER
    from lora_trainer.testing.t5 import T5_VOCAB_SIZE, make_tiny_t5_tokenizer

    torch.manual_seed(0)
    comps = random_components(lambda: components(T5_STANDIN_LAYERS, t5_vocab=T5_VOCAB_SIZE), device, dtype)
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**CHROMA_SCHEDULER), vae=comps["vae"],
                          text_encoder=comps["text_encoder"], tokenizer=make_tiny_t5_tokenizer(),
                          transformer=comps["transformer"])
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    return out


def make_plan_folder(root: Path) -> Path:
    """A ChromaPipeline folder the probe accepts with every component's real header (no weights; sparse files):
    what the memory plan reads, as bench_memory_plan.make_folder writes FLUX.1's."""
    import torch

    from bench.bench_memory_plan import _saved_state, header_only
    from lora_trainer.families.chroma.tiny import CHROMA_SCHEDULER
    from lora_trainer.testing.t5 import make_tiny_t5_tokenizer

    with torch.device("meta"):
        comps = components()
    classes = {"transformer": ["diffusers", "ChromaTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ChromaPipeline", **classes}))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(CHROMA_SCHEDULER))
    make_tiny_t5_tokenizer().save_pretrained(root / "tokenizer")  # the plan never reads it
    for name, model in comps.items():
        d = root / name
        d.mkdir(exist_ok=True)
        config = model.config.to_dict() if name == "text_encoder" else dict(model.config)
        (d / "config.json").write_text(json.dumps({**config, "_class_name": classes[name][1]}, default=list))
        file = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
        header_only(d / file, _saved_state(model), "F32" if name == "vae" else "BF16")
    return root


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", action="store_true", help="print parameter counts (meta device)")
    args = ap.parse_args()
    if args.count:
        for name, n in count().items():
            print(f"{name}: {n / 1e9:.3f} B")
        return 0
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
