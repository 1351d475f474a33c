"""The full-size FLUX.2 pipelines device_check.py's ``flux2-klein-9b`` check trains (bench/device_families.py):
random weights from the published configs (reference/dit-families.md §3).

    python3 bench/device_flux2.py --variant klein-9b --count       # parameter counts, meta device
    python3 bench/device_flux2.py --variant klein-9b --out DIR      # build and save (on a card: --device cuda)

Full size: the published transformer (klein 9B: 8 + 24 blocks, 32 x 128, joint 12288, 9.08 B; klein 4B: 5 + 20,
24 heads, 7680, 3.88 B; dev: 8 + 48, 48 heads, 15360, 32.2 B) and the real AutoencoderKLFlux2 config; the text
encoder is a stand-in of the real output width (a Qwen3 / Mistral text model of the real hidden size with enough
layers for the pipeline's text_encoder_out_layers, 2 heads and a 64-wide MLP: ~0.1-0.2 B), because the trainer caches
its output once and releases it: its size changes set-up time, not training memory or speed. The tokenizer is the
tiny offline one. Built on the card in bf16 (seconds), saved in 10 GB shards.

"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRANSFORMERS = {  # published Flux2Transformer2DModel configs (the rest: the class defaults, which are dev's)
    "dev": {"num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48, "joint_attention_dim": 15360,
            "guidance_embeds": True},
    "klein-9b": {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32, "joint_attention_dim": 12288,
                 "guidance_embeds": False},
    "klein-4b": {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680,
                 "guidance_embeds": False},
}
TINY = {"dev": "flux2-dev", "klein-9b": "flux2-klein-9b", "klein-4b": "flux2-klein-4b"}


def build_components(variant: str, dtype=None) -> dict:
    """The full-size transformer and VAE, and the text-encoder stand-in, on the current default device."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from lora_trainer.testing.qwen import QWEN_VOCAB_SIZE

    cfg = TRANSFORMERS[variant]
    width = cfg["joint_attention_dim"] // 3
    layers = 31 if variant == "dev" else 28  # the deepest of text_encoder_out_layers + 1
    te_kwargs = dict(hidden_size=width, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=128, vocab_size=QWEN_VOCAB_SIZE, max_position_embeddings=1024)
    if variant == "dev":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        from lora_trainer.families.flux2.tiny import make_tiny_mistral_tokenizer

        tok = make_tiny_mistral_tokenizer()
        te = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=dict(model_type="mistral", sliding_window=None, **te_kwargs),
            vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, head_dim=8, patch_size=14, image_size=28),
            image_token_index=tok.convert_tokens_to_ids("[IMG]")))
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from lora_trainer.testing.qwen import make_tiny_qwen_tokenizer

        tok = make_tiny_qwen_tokenizer()
        te = Qwen3ForCausalLM(Qwen3Config(tie_word_embeddings=True, **te_kwargs))
    comps = {"transformer": Flux2Transformer2DModel(**cfg), "vae": AutoencoderKLFlux2(), "text_encoder": te,
             "tokenizer": tok}
    if dtype is not None:
        for name in ("transformer", "text_encoder"):
            comps[name].to(dtype)
    comps["vae"].to(torch.float32)
    return comps


def save_pipeline(variant: str, comps: dict, out: Path) -> Path:
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    from lora_trainer.families._flux2.tiny import scheduler

    extra = {} if variant == "dev" else {"is_distilled": False}
    cls = Flux2Pipeline if variant == "dev" else Flux2KleinPipeline
    pipe = cls(scheduler=scheduler(), **comps, **extra)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    return Path(out)


def make_model(out: Path, variant: str, size: str, *, device=None, dtype=None) -> Path:
    import torch

    if size == "tiny":
        from lora_trainer.testing.tiny import make_tiny_pipeline

        return make_tiny_pipeline(out, TINY[variant])
    with torch.device(device or "cpu"):
        comps = build_components(variant, dtype=dtype)
    return save_pipeline(variant, comps, out)


def count(variant: str) -> dict:
    import torch

    with torch.device("meta"):
        comps = build_components(variant)
    return {k: sum(p.numel() for p in m.parameters()) for k, m in comps.items() if k != "tokenizer"}


def build_klein_9b(out: Path, device: str, dtype=None) -> Path:
    """device_families' build: klein 9B at full size on ``device`` (bf16 unless ``dtype`` says otherwise)."""
    import torch

    return make_model(out, "klein-9b", "full", device=device, dtype=dtype or torch.bfloat16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=tuple(TRANSFORMERS), default="klein-9b")
    ap.add_argument("--count", action="store_true", help="parameter counts (meta device)")
    ap.add_argument("--out", help="build and save the full-size pipeline here")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.count:
        print(json.dumps(count(args.variant)))
    if args.out:
        import torch

        make_model(Path(args.out), args.variant, "full", device=args.device, dtype=torch.bfloat16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
