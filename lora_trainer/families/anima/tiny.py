"""The tiny random Anima pipeline (an ``AnimaModularPipeline``), built offline for tests, the demo and benchmarks.

The real classes and module names (families-2026.md §5): CosmosTransformer3DModel (transformer_blocks.N.attn1 /
attn2 / ff / norm1-3), AnimaTextConditioner (the "LLM adapter"), Qwen3Model, a Qwen2 and a T5 tokenizer (ids only),
the Qwen-Image VAE with per-channel latents_mean / latents_std that are not 0 / 1. Real values in the comments.
``build`` returns the modular pipeline with its components attached; ``families.anima`` saves it as a folder.
"""
from __future__ import annotations

from ...testing.parts import seeded
from ...testing.qwen import QWEN_VOCAB_SIZE, make_tiny_qwen_tokenizer
from ...testing.t5 import T5_VOCAB_SIZE, make_tiny_t5_tokenizer
from ..qwen_image.tiny import QWEN_LATENTS_MEAN, QWEN_LATENTS_STD, QWEN_Z_DIM

VARIANTS = {"anima": None}
DEFAULT = "anima"

ANIMA_TEXT_HIDDEN = 16  # Qwen3-0.6B: 1024 (= the conditioner's source_dim)
ANIMA_TEXT_EMBED = 16  # the conditioner's target_dim = the transformer's text_embed_dim: 1024
ANIMA_HEADS, ANIMA_HEAD_DIM = 2, 12  # real 16 x 128 (hidden 2048)
# Real: 512 (the conditioner pads its output to at least this many tokens). Below the tests' max_sequence_length
# (32), so captions of different lengths give conditioner outputs of different lengths, as a real caption longer
# than 512 T5 tokens would.
ANIMA_MIN_SEQUENCE = 16
# FlowMatch Euler with a static shift 3.0 (ai-toolkit trains Anima with shift 3.0; the hub repo's scheduler config
# was not in the code we read).
ANIMA_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def text_encoder():
    from transformers import Qwen3Config, Qwen3Model

    # head_dim explicit: Qwen3Config defaults it to 128 whatever the width.
    return Qwen3Model(Qwen3Config(
        vocab_size=QWEN_VOCAB_SIZE, hidden_size=ANIMA_TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))


def text_conditioner():
    from diffusers import AnimaTextConditioner

    # Real: 6 blocks, 16 heads, model_dim 1024, vocab 32128 (T5's embedding rows).
    return AnimaTextConditioner(source_dim=ANIMA_TEXT_HIDDEN, target_dim=ANIMA_TEXT_EMBED, model_dim=16,
                                num_layers=2, num_attention_heads=4, target_vocab_size=T5_VOCAB_SIZE,
                                min_sequence_length=ANIMA_MIN_SEQUENCE)


def transformer():
    from diffusers import CosmosTransformer3DModel

    # Real (Cosmos-Predict2-2B): 28 layers, mlp_ratio 4, adaln_lora_dim 256, max_size (128, 240, 240); no learnable
    # positional embedding (diffusers' Cosmos 2.0 single-file converter has no name for one).
    return CosmosTransformer3DModel(
        in_channels=QWEN_Z_DIM, out_channels=QWEN_Z_DIM, num_attention_heads=ANIMA_HEADS,
        attention_head_dim=ANIMA_HEAD_DIM, num_layers=2, mlp_ratio=2.0, text_embed_dim=ANIMA_TEXT_EMBED,
        adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=True, extra_pos_embed_type=None)


def vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=16, z_dim=QWEN_Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True, True], latents_mean=QWEN_LATENTS_MEAN,
                                  latents_std=QWEN_LATENTS_STD)


def build(variant=None, seed: int = 0):
    """The in-memory modular pipeline (fp32, CPU) with every component set; the caller's RNG is left untouched."""
    from diffusers import AnimaAutoBlocks, FlowMatchEulerDiscreteScheduler

    from .cosmos_compat import install

    install()
    if variant not in VARIANTS.values():
        raise ValueError(f"unknown tiny Anima variant {variant!r}; expected one of {list(VARIANTS.values())}")
    with seeded(seed):
        pipe = AnimaAutoBlocks().init_pipeline()
        pipe.update_components(
            transformer=transformer(), text_conditioner=text_conditioner(), text_encoder=text_encoder(),
            tokenizer=make_tiny_qwen_tokenizer(), t5_tokenizer=make_tiny_t5_tokenizer(), vae=vae(),
            scheduler=FlowMatchEulerDiscreteScheduler(**ANIMA_SCHEDULER))
    return pipe
