"""Z-Image at its published size for device_check.py's ``zimage`` check (bench/device_families.py: 1024 px, bf16,
an fp8 base, bf16 with gradient checkpointing), random weights.

    python3 bench/zimage_check.py --count                                # parameter counts on the meta device

Model: ZImageTransformer2DModel's defaults (= Tongyi-MAI/Z-Image's transformer/config.json: dim 3840, 30 layers +
2 + 2 refiners, 6.15 B), the FLUX VAE (bench/models.py FLUX_VAE), and a 2-layer Qwen3 stand-in of Qwen3-4B's width
2560 (the trainer caches its hidden states once and releases it, so its depth changes set-up time only; the real
36-layer encoder is 4.0 B). The transformer is built on the card in bf16 (12.3 GB) and saved once.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen3-4B (text_encoder/config.json of Tongyi-MAI/Z-Image): 2560 wide, 36 layers, 32 heads of 128, 8 KV heads.
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=40960)
STANDIN_LAYERS = 2


def build(out: Path, device: str, *, layers: int = STANDIN_LAYERS) -> Path:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from bench.models import FLUX_VAE
    from lora_trainer.testing.qwen import QWEN_VOCAB_SIZE, make_tiny_qwen_tokenizer

    old = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            transformer = ZImageTransformer2DModel()
            te = Qwen3Model(Qwen3Config(vocab_size=QWEN_VOCAB_SIZE, **{**QWEN3_4B, "num_hidden_layers": layers},
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
    finally:
        torch.set_default_dtype(old)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0), vae=AutoencoderKL(**FLUX_VAE),
                          text_encoder=te, tokenizer=make_tiny_qwen_tokenizer(), transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def count() -> dict:
    import torch
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("meta"):
        t = ZImageTransformer2DModel()
        te = Qwen3Model(Qwen3Config(vocab_size=151936, **QWEN3_4B,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
    return {"transformer": sum(p.numel() for p in t.parameters()), "qwen3_4b": sum(p.numel() for p in te.parameters())}


def build_bf16(out: Path, device: str, dtype=None) -> Path:
    """device_families' build: the full-size transformer in bf16 (always) on ``device``, a 2-layer Qwen3 stand-in."""
    return build(out, device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", action="store_true", help="parameter counts (meta device)")
    args = ap.parse_args(argv)
    if args.count:
        print(json.dumps(count()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
