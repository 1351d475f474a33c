"""Wan 2.1 T2V 1.3B and Wan 2.2 TI2V-5B at their published sizes for the benches: the real transformer and VAE
(Wan-AI/Wan2.1-T2V-1.3B-Diffusers and Wan2.2-TI2V-5B-Diffusers transformer / vae config.json, as
../shared/reference/dit-families.md section 4d gives them) and umt5-xxl, built on the meta device for the memory
plan (``plan_folder``: header-only files) or with random weights on a device for the GPU check (``make_21`` /
``make_22``: the ``wan21-1.3b`` / ``wan22-5b`` rows of bench/device_families.py, trained on generated clips at
832 x 480, 33 frames).

The GPU check's text encoder is a 2-layer UMT5 stand-in of the real width (4096 = the transformer's text_dim) over
the tiny tokenizer's vocabulary (the FLUX check's T5 does the same): the trainer caches its output once and drops
it, so its depth changes set-up time only.

    python3 bench/wan_check.py --count     # parameter counts (meta device): 1.3B 1.419 B, 5B 5.000 B transformers
    python3 bench/wan_check.py --plan      # the memory plan at 480 px for 1 / 33 / 81 frames (header-only folders)
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_BLOCK = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TRANSFORMER = {"t2v-1.3b": dict(_BLOCK, num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16,
                                out_channels=16),
               "ti2v-5b": dict(_BLOCK, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                               out_channels=48)}
VAE = {"t2v-1.3b": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                        temperal_downsample=[False, True, True]),
       # 48 latent channels, 2x2 pixel patches in, 16x spatially (the tiny model's stand-in latents_mean / std)
       "ti2v-5b": dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                       temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                       patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)}
# umt5-xxl (google/umt5-xxl's encoder as Wan ships it): the stand-in keeps the width, 2 layers, the tiny vocabulary.
UMT5 = dict(vocab_size=256384, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
            feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0)
# Transformer parameters (measured on meta: --count), then image tokens of one latent frame at 832 x 480 (16-px
# tokens for 2.1, 32-px for 2.2's 16x VAE) and the text rows, for the MFU estimate.
FULL_SIZE = {"t2v-1.3b": (1.419e9, 52 * 30, 512), "ti2v-5b": (5.000e9, 26 * 15, 512)}
CLIP = dict(width=832, height=480, frames=33, fps=16)  # the bench's clips: Wan's 480p, 33 frames at 16 fps


def components(variant: str, te: str = "full") -> dict:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from lora_trainer.families.wan import tiny

    vae = dict(VAE[variant])
    if variant == "ti2v-5b":
        vae.update(latents_mean=tiny.WAN22_LATENTS_MEAN, latents_std=tiny.WAN22_LATENTS_STD)
    t5 = dict(UMT5)
    if te == "standin":
        from lora_trainer.testing.t5 import T5_VOCAB_SIZE

        t5.update(num_layers=2, vocab_size=T5_VOCAB_SIZE)
    return {"transformer": WanTransformer3DModel(**TRANSFORMER[variant]), "vae": AutoencoderKLWan(**vae),
            "text_encoder": UMT5EncoderModel(UMT5Config(**t5))}


def count() -> dict:
    import torch

    out = {}
    for variant in TRANSFORMER:
        with torch.device("meta"):
            comps = components(variant)
        out[variant] = {name: sum(p.numel() for p in m.parameters()) for name, m in comps.items()}
    return out


def _scheduler(variant: str) -> dict:
    from lora_trainer.families.wan.tiny import WAN_SCHEDULER

    return {**WAN_SCHEDULER, "flow_shift": 5.0} if variant == "ti2v-5b" else dict(WAN_SCHEDULER)


def plan_folder(root: Path, variant: str = "t2v-1.3b") -> Path:
    """A WanPipeline folder of the real architecture with header-only weights (what the probe and the plan read)."""
    import torch

    from bench.bench_memory_plan import write_header_only_components
    from lora_trainer.testing.t5 import make_tiny_t5_tokenizer

    with torch.device("meta"):
        comps = components(variant)
    classes = {"transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
               "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
               "scheduler": ["diffusers", "UniPCMultistepScheduler"]}
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1", **classes,
             **({"expand_timesteps": True} if variant == "ti2v-5b" else {})}
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "UniPCMultistepScheduler", **_scheduler(variant)}))
    make_tiny_t5_tokenizer().save_pretrained(root / "tokenizer")
    write_header_only_components(root, comps, classes)
    return root


def _make(out: Path, variant: str, device: str, dtype) -> Path:
    """Random weights, built on ``device`` in ``dtype`` (the VAE in fp32), saved as a WanPipeline folder."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from bench.models import random_components
    from lora_trainer.testing.t5 import make_tiny_t5_tokenizer

    comps = random_components(lambda: components(variant, "standin"), device, dtype)
    pipe = WanPipeline(tokenizer=make_tiny_t5_tokenizer(), scheduler=UniPCMultistepScheduler(**_scheduler(variant)),
                       **comps, **({"expand_timesteps": True} if variant == "ti2v-5b" else {}))
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    return out


def make_21(out: Path, *, device: str = "cuda", dtype=None) -> Path:
    return _make(out, "t2v-1.3b", device, dtype)


def make_22(out: Path, *, device: str = "cuda", dtype=None) -> Path:
    return _make(out, "ti2v-5b", device, dtype)


def plan(root: Path, frames: int, **settings) -> dict:
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight import memory_plan
    from lora_trainer.preflight.probe import probe_model
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(root.parent / "data", n=1, trigger="ohwx")
    cfg, _ = parse_config({"dataset_path": str(data), "base_model": str(root), "output_path": str(root.parent / "o"),
                           "trigger_words": ["ohwx"], "resolution": 480, "mixed_precision": "bf16", **settings})
    probe = probe_model(str(root))
    return memory_plan.plan_memory(cfg, probe, probe.family, 480, gpu=None, frames=frames)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", action="store_true")
    ap.add_argument("--plan", action="store_true")
    args = ap.parse_args(argv)
    if args.count:
        print(json.dumps({v: {k: f"{n / 1e9:.3f} B" for k, n in c.items()} for v, c in count().items()}))
    if args.plan:
        tmp = Path(tempfile.mkdtemp(prefix="wan-plan-"))
        for variant in TRANSFORMER:
            root = plan_folder(tmp / variant / "model", variant)
            for frames in (1, 33, 81):
                for settings in ({"gradient_checkpointing": True}, {"gradient_checkpointing": False}):
                    p = plan(root, frames, **settings)
                    print(json.dumps({"variant": variant, "frames": frames, "settings": settings,
                                      "total_gib": p["total_gib"], "parts_gib": p["parts_gib"]}))
    if not (args.count or args.plan):
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
