"""The tiny random FLUX.2 klein pipelines (4B- and 9B-shaped, base), built offline for tests, the demo and
benchmarks: the real classes (Flux2KleinPipeline, Qwen3ForCausalLM, Qwen2 tokenizer with a Qwen3 chat template)
at tiny widths. The Qwen3 encoder has 28 layers, so the pipeline's own text_encoder_out_layers default (9, 18, 27)
reads intermediate layers as on the real 36-layer encoders, and joint_attention_dim = 3 x its width."""
from __future__ import annotations

from ...testing.parts import seeded
from ...testing.qwen import QWEN_VOCAB_SIZE, make_tiny_qwen_tokenizer
from .._flux2 import tiny as parts

VARIANTS = {"flux2-klein-4b": "klein-4b", "flux2-klein-9b": "klein-9b"}
DEFAULT = "flux2-klein-4b"

QWEN_HIDDEN, QWEN_LAYERS = 16, 28  # real 2560 / 4096 wide, 36 layers
# klein's depth ratio decides its size (single = 4 x double: 4B, 3 x: 9B; real 5 + 20 and 8 + 24).
DEPTHS = {"klein-4b": (1, 4), "klein-9b": (1, 3)}


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=QWEN_VOCAB_SIZE, hidden_size=QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=QWEN_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        tie_word_embeddings=True))


def build(variant: str = "klein-4b", seed: int = 0, *, distilled: bool = False):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched. ``distilled``: is_distilled as the
    step-distilled releases' model_index.json says (CFG off)."""
    from diffusers import Flux2KleinPipeline

    if variant not in DEPTHS:
        raise ValueError(f"unknown tiny FLUX.2 klein variant {variant!r}; expected one of {', '.join(DEPTHS)}")
    double, single = DEPTHS[variant]
    with seeded(seed):
        return Flux2KleinPipeline(
            scheduler=parts.scheduler(), vae=parts.vae(), text_encoder=_qwen3(), tokenizer=make_tiny_qwen_tokenizer(),
            transformer=parts.transformer(double=double, single=single, text_width=QWEN_HIDDEN, guidance=False),
            is_distilled=distilled)
