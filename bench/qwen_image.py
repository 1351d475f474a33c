"""Qwen-Image at its published size for the benches: the real configs (Qwen/Qwen-Image: transformer 20.43 B, the
Wan-2.1-style VAE, Qwen2.5-VL-7B), built on the meta device for the memory plan (bench_memory_plan.make_folder) or
with random weights on a device for the GPU check (device_check.py ``qwen-image/full``, bench/device_families.py).

The GPU check's text encoder is a stand-in of the real output width (3584, so the text cache and the transformer's
txt_in see real shapes) with 2 layers and the tiny tokenizer's vocabulary: the trainer caches its output once and
releases it, so its size changes set-up time, not training memory or speed (as device_check's FLUX T5 stand-in).

    python3 bench/qwen_image.py --count        # parameter counts of the full-size components (meta device)
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Qwen/Qwen-Image transformer/config.json = QwenImageTransformer2DModel's defaults.
QWEN_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                        axes_dims_rope=(16, 56, 56))
# vae/config.json = AutoencoderKLQwenImage's defaults (base_dim 96, z_dim 16, 8x, Wan 2.1's latents_mean / std).
QWEN_VAE: dict = {}
# text_encoder/config.json (Qwen2.5-VL-7B-Instruct).
QWEN_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31])


def text_encoder(te: str = "full"):
    """Qwen2.5-VL: the real one, or the 2-layer stand-in of the real width over the tiny tokenizer's vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from lora_trainer.testing.qwen import QWEN_VOCAB_SIZE

    text, vision = dict(QWEN_TEXT), dict(QWEN_VISION)
    if te == "standin":
        text.update(num_hidden_layers=2, vocab_size=QWEN_VOCAB_SIZE)
        vision.update(depth=1, hidden_size=64, intermediate_size=64, num_heads=2, fullatt_block_indexes=[0])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                               vocab_size=text["vocab_size"]))


def components(te: str = "full") -> dict:
    """transformer, vae, text_encoder at the published configs, on the current default device."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    return {"transformer": QwenImageTransformer2DModel(**QWEN_TRANSFORMER), "vae": AutoencoderKLQwenImage(**QWEN_VAE),
            "text_encoder": text_encoder(te)}


def meta_components() -> dict:
    import torch

    with torch.device("meta"):
        return components("full")


def make_model(out: Path, *, device: str = "cuda", dtype=None, te: str = "standin") -> Path:
    """Build (random weights, directly on ``device`` in ``dtype``) and save a QwenImagePipeline folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from bench.models import random_components
    from lora_trainer.families.qwen_image.tiny import QWEN_SCHEDULER, QWEN_TEMPLATE_WORDS
    from lora_trainer.testing.qwen import make_tiny_qwen_tokenizer

    comps = random_components(lambda: components(te), device, dtype)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=comps["vae"],
                             text_encoder=comps["text_encoder"], transformer=comps["transformer"],
                             tokenizer=make_tiny_qwen_tokenizer(extra_words=QWEN_TEMPLATE_WORDS))
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    return out


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", action="store_true", help="print parameter counts (meta device)")
    args = ap.parse_args()
    if args.count:
        for name, module in meta_components().items():
            print(f"{name}: {sum(p.numel() for p in module.parameters()) / 1e9:.3f} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
