"""The tiny random Krea 2 pipeline, built offline for tests, the demo and benchmarks.

The real classes and module names (Krea2Transformer2DModel: single stream, GQA, the text-fusion block; a Qwen3-VL
text encoder read at several hidden-state taps; the Qwen-Image VAE) at the widths of diffusers' own tiny test
(families-2026.md section 1, tests/pipelines/krea2/test_krea2.py), with our byte-level Qwen tokenizer. Real values in
the comments. The tokenizer has the template's words as whole tokens, so the pipeline's 34 dropped prefix tokens
and 5-token suffix are exactly the template's, as with the real vocabulary (tests/test_family_krea2.py checks).
"""
from __future__ import annotations

from ...testing.parts import seeded
from ...testing.qwen import QWEN_VOCAB_SIZE, make_tiny_qwen_tokenizer
from ..qwen_image.tiny import QWEN_LATENTS_MEAN, QWEN_LATENTS_STD, QWEN_TEMPLATE_WORDS, QWEN_Z_DIM

# Raw and Turbo have one transformer config: Turbo is told by model_index.json is_distilled (signature.distilled),
# not a variant. build(turbo=True) makes the Turbo-flagged pipeline for the family's own tests.
VARIANTS = {"krea2": None}
DEFAULT = "krea2"

KREA2_TEXT_HIDDEN = 16  # Qwen3-VL-4B: 2560 (= text_hidden_dim)
KREA2_TEXT_LAYERS = 2  # real 36; hidden_states then has 3 entries (0: the embeddings)
KREA2_SELECT_LAYERS = (0, 1, 2)  # real (2, 5, 8, ..., 35): 12 taps
# Krea 2's scheduler (families-2026 section 1: exponential dynamic shift, 0.5 at 256 tokens to 1.15 at 6400).
KREA2_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=6400, time_shift_type="exponential")


def text_encoder(tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    # head_dim explicit (Qwen3VLTextConfig defaults it to 128); mrope_section sums to head_dim / 2.
    text = dict(vocab_size=QWEN_VOCAB_SIZE, hidden_size=KREA2_TEXT_HIDDEN, intermediate_size=32,
                num_hidden_layers=KREA2_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=KREA2_TEXT_HIDDEN,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    return Qwen3VLModel(Qwen3VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>")))


def transformer():
    from diffusers import Krea2Transformer2DModel

    # Real: 28 layers of 48 heads x 128 (12 kv heads), SwiGLU 16384, timestep embedding 256; text fusion 20 heads
    # (20 kv) of 2560 / 20, SwiGLU 6912, 2 layerwise + 2 refiner blocks; rope (32, 48, 48).
    return Krea2Transformer2DModel(
        in_channels=4 * QWEN_Z_DIM, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=KREA2_TEXT_HIDDEN,
        num_text_layers=len(KREA2_SELECT_LAYERS), text_num_attention_heads=2, text_num_key_value_heads=1,
        text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2))


def _fill_zero_init(model) -> None:
    """The RMSNorm weights (a 1 + w form) and modulation tables start at zero; random values of the trained
    model's kind make a test see them (a converter that dropped one would still match at zero)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale_shift_table") or "norm" in name.rsplit(".", 2)[-2]:
                p.normal_(std=0.1)


def vae():
    from diffusers import AutoencoderKLQwenImage

    # Real: base_dim 96 (Qwen-Image's VAE, the same files); 8x spatially.
    return AutoencoderKLQwenImage(base_dim=16, z_dim=QWEN_Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True, True], latents_mean=QWEN_LATENTS_MEAN,
                                  latents_std=QWEN_LATENTS_STD)


def build(variant=None, seed: int = 0, *, turbo: bool = False):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched. ``turbo``: is_distilled as
    Krea-2-Turbo's model_index.json says (fixed mu 1.15)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    if variant not in VARIANTS.values():
        raise ValueError(f"unknown tiny Krea 2 variant {variant!r}; expected one of {list(VARIANTS.values())}")
    with seeded(seed):
        tokenizer = make_tiny_qwen_tokenizer(extra_words=QWEN_TEMPLATE_WORDS)
        model = transformer()
        _fill_zero_init(model)
        return Krea2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**KREA2_SCHEDULER), vae=vae(),
                             text_encoder=text_encoder(tokenizer), tokenizer=tokenizer, transformer=model,
                             text_encoder_select_layers=KREA2_SELECT_LAYERS, is_distilled=turbo)
