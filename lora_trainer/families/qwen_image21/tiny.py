"""The tiny random Qwen-Image 2.1 pipeline, built offline for tests, the demo and benchmarks.

Real classes and module names with tiny widths (families-2026.md section 3's tiny transformer; a VAE with the real
five levels, so it downsamples 16x as the pipeline's hard-coded vae_scale_factor assumes: 64 px images give 4x4
latents, 16 tokens, 4 image slots). Real values in the comments. The VAE's per-channel latents_mean / latents_std
are not 0 / 1, so a trainer that skipped the normalisation would not match the pipeline. The text encoder is a
Qwen3VLForConditionalGeneration with the testing/qwen.py tokenizer behind a text-only processor (processor.py).
"""
from __future__ import annotations

from ...testing.parts import seeded
from ...testing.qwen import QWEN_VOCAB_SIZE, make_tiny_qwen_tokenizer

VARIANTS = {"qwen-image-2.1": None}
DEFAULT = "qwen-image-2.1"

Z_DIM = 8  # real 64
TEXT_HIDDEN = 32  # Qwen3-VL-8B: 4096 (= context_in_dim)
NUM_LAYERS, NUM_HEADS, HEAD_DIM = 2, 2, 16  # real 32 x 32 x 128
AXES_DIMS_ROPE = (4, 6, 6)  # real (16, 56, 56); sums to the head dim
LATENTS_MEAN = [round(0.2 * i - 0.7, 2) for i in range(Z_DIM)]  # real: 64 values from -5.0 to 4.0
LATENTS_STD = [round(1.5 + 0.2 * i, 2) for i in range(Z_DIM)]  # real: 3.1 - 3.9
# Qwen-Image 2.1's scheduler config as the pipeline reads it (calculate_shift's constants; the sampling grid is the
# pipeline's sample_sigmas or linspace(1, 1/n, n)).
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                 base_image_seq_len=256, max_image_seq_len=8192, invert_sigmas=False, stochastic_sampling=False)
# The system prompt's words whole, as the real vocabulary has them (the pipeline counts the dropped tokens itself, so
# this only keeps the tiny prompts short).
TEMPLATE_WORDS = ("system", "user", "assistant", "Comprehend", "and", "analyze", "the", "provided", "prompt")


def make_processor():
    from .processor import Qwen3VLTextProcessor

    return Qwen3VLTextProcessor(tokenizer=make_tiny_qwen_tokenizer(extra_words=TEMPLATE_WORDS))


def _text_encoder(tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    # transformers 5.24: head_dim defaults to 128 whatever the width; mrope_section sums to head_dim / 2.
    text = dict(hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=QWEN_VOCAB_SIZE, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True},
                bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
                  num_position_embeddings=16)
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>")))


def _pipeline():
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)

    processor = make_processor()
    transformer = QwenImage21Transformer2DModel(
        patch_size=1, in_channels=Z_DIM, out_channels=Z_DIM, num_layers=NUM_LAYERS, attention_head_dim=HEAD_DIM,
        num_attention_heads=NUM_HEADS, context_in_dim=TEXT_HIDDEN, axes_dims_rope=AXES_DIMS_ROPE)
    # Real: base_dim 96, decoder_base_dim 144, dim_mult [1, 2, 4, 8, 8], num_res_blocks 2 (16x spatially).
    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1, 1],
                                   num_res_blocks=1, temperal_downsample=[False, True, True, True],
                                   latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    return QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                               text_encoder=_text_encoder(processor.tokenizer), processor=processor,
                               transformer=transformer)


def build(variant: str | None = None, seed: int = 0):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched."""
    if variant not in VARIANTS.values():
        raise ValueError(f"unknown tiny Qwen-Image 2.1 variant {variant!r}; expected one of {list(VARIANTS.values())}")
    with seeded(seed):
        return _pipeline()
