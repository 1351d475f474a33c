"""The tiny random Qwen-Image pipeline, built offline for tests, the demo and benchmarks.

The real classes, block layout and module names with tiny widths (dit-families.md section 6, made 8x like the real
VAE: 64 px images give 8x8 latents, 16 tokens). Real values in the comments. The VAE's per-channel latents_mean /
latents_std are not 0 / 1, so a trainer that skipped the normalisation would not match the pipeline.
"""
from __future__ import annotations

from ...testing.parts import seeded
from ...testing.qwen import QWEN_VOCAB_SIZE, make_tiny_qwen_tokenizer

# tiny name -> the variant its signature reports: 2512 has Qwen-Image's files, told by the name (the folder's) alone.
VARIANTS = {"qwen-image": None, "qwen-image-2512": "2512"}
DEFAULT = "qwen-image"

QWEN_Z_DIM = 16  # as real
QWEN_TEXT_HIDDEN = 32  # Qwen2.5-VL-7B: 3584 (= joint_attention_dim)
QWEN_NUM_LAYERS, QWEN_NUM_HEADS, QWEN_HEAD_DIM = 3, 2, 16  # real 60 x 24 x 128 (3: the last block's unread text stream is a minority)
QWEN_AXES_DIMS_ROPE = (4, 6, 6)  # real (16, 56, 56); sums to the head dim
# Real: 0.0 mean / 1.0 std nowhere; values of the real model's magnitude (its stds are 1.6 - 3.2).
QWEN_LATENTS_MEAN = [round(0.1 * i - 0.8, 2) for i in range(QWEN_Z_DIM)]
QWEN_LATENTS_STD = [round(1.5 + 0.1 * i, 2) for i in range(QWEN_Z_DIM)]
# The words of QwenImagePipeline's prompt template, one token each as in Qwen's real vocabulary: the pipeline drops
# the template's first 34 tokens (prompt_template_encode_start_idx), which are then exactly its system turn and the
# user turn's opening, as with the real tokenizer (spelt byte by byte, the template would leave ~70 system tokens
# in every embedding and push the caption past max_sequence_length).
# (BPE applies the lowest-ranked merge first, and the extra words' merges rank in this order: "system" before
# "texture" (t+e), "texture" before "relationships" (r+e), "relationships" before "shape" (s+h).)
QWEN_TEMPLATE_WORDS = ("system", "texture", "relationships", "user", "assistant", "Describe", "the", "image", "by",
                       "detailing", "color", "shape", "size", "quantity", "text", "spatial", "of", "objects", "and",
                       "background")
# Qwen-Image's scheduler_config.json.
QWEN_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                      base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                      time_shift_type="exponential", invert_sigmas=False, stochastic_sampling=False)


def _text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # transformers 5.24: rope settings in rope_parameters; mrope_section sums to head_dim / 2 (16 / 2).
    text = dict(hidden_size=QWEN_TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=QWEN_VOCAB_SIZE, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=QWEN_TEXT_HIDDEN,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, vocab_size=QWEN_VOCAB_SIZE,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>")))


def _pipeline():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    tokenizer = make_tiny_qwen_tokenizer(extra_words=QWEN_TEMPLATE_WORDS)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * QWEN_Z_DIM, out_channels=QWEN_Z_DIM, num_layers=QWEN_NUM_LAYERS,
        attention_head_dim=QWEN_HEAD_DIM, num_attention_heads=QWEN_NUM_HEADS, joint_attention_dim=QWEN_TEXT_HIDDEN,
        guidance_embeds=False, axes_dims_rope=QWEN_AXES_DIMS_ROPE)
    # Real: base_dim 96, dim_mult [1, 2, 4, 4], temperal_downsample [False, True, True] (8x spatially).
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=QWEN_Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=QWEN_LATENTS_MEAN,
                                 latents_std=QWEN_LATENTS_STD)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae,
                             text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer, transformer=transformer)


def build(variant: str | None = None, seed: int = 0):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched."""
    if variant not in VARIANTS.values():
        raise ValueError(f"unknown tiny Qwen-Image variant {variant!r}; expected one of {list(VARIANTS.values())}")
    with seeded(seed):
        return _pipeline()
