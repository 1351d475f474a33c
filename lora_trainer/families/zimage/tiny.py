"""The tiny random Z-Image pipeline, built offline for tests, the demo and benchmarks.

The real model's classes and module names (ZImageTransformer2DModel's noise_refiner / context_refiner / layers,
attention.to_q/k/v/to_out.0, feed_forward.w1/w2/w3, adaLN_modulation.0; Qwen3Model; the Flux VAE) with tiny widths.
Real values in the comments (reference/dit-families.md §4b, §6).
"""
from __future__ import annotations

from ...testing.parts import LATENT_CHANNELS, flow_vae, seeded
from ...testing.qwen import QWEN_VOCAB_SIZE, make_tiny_qwen_tokenizer

# tiny name -> the variant its signature reports: Z-Image and Z-Image-Turbo share one transformer config, so the
# signature has no variants (Turbo is told by its scheduler and name: signature.distilled).
VARIANTS = {"zimage": None}
DEFAULT = "zimage"

ZIMAGE_VAE_SCALING, ZIMAGE_VAE_SHIFT = 0.3611, 0.1159  # the Flux VAE's
ZIMAGE_TEXT_HIDDEN = 16  # Qwen3-4B: 2560 = cap_feat_dim
ZIMAGE_DIM, ZIMAGE_HEADS = 32, 2  # real 3840, 30 heads of 128
ZIMAGE_AXES_DIMS = (8, 4, 4)  # real (32, 48, 48); sums to the head dim
# Z-Image (base)'s scheduler: static shift 6.0; Turbo's is 3.0 (InvokeAI #8799 tells them apart by it).
ZIMAGE_BASE_SCHEDULER = dict(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False)
ZIMAGE_TURBO_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def text_encoder():
    from transformers import Qwen3Config, Qwen3Model

    # Two layers: the pipeline reads hidden_states[-2], the first layer's output. head_dim is explicit: Qwen3Config
    # defaults it to 128 whatever the width.
    return Qwen3Model(Qwen3Config(
        vocab_size=QWEN_VOCAB_SIZE, hidden_size=ZIMAGE_TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))


def transformer():
    import torch
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=ZIMAGE_DIM, n_layers=2,
        n_refiner_layers=1, n_heads=ZIMAGE_HEADS, n_kv_heads=ZIMAGE_HEADS, cap_feat_dim=ZIMAGE_TEXT_HIDDEN,
        axes_dims=list(ZIMAGE_AXES_DIMS), axes_lens=[1024, 64, 64], rope_theta=256.0, t_scale=1000.0, qk_norm=True)
    # The pad tokens are not initialised by every diffusers version (torch.empty): random values, so padding
    # positions are exercised and never NaN.
    with torch.no_grad():
        model.x_pad_token.normal_(std=0.02)
        model.cap_pad_token.normal_(std=0.02)
    return model


def build(variant=None, seed: int = 0, turbo: bool = False):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched. ``turbo``: Turbo's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    with seeded(seed):
        return ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**(ZIMAGE_TURBO_SCHEDULER if turbo else ZIMAGE_BASE_SCHEDULER)),
            vae=flow_vae(ZIMAGE_VAE_SCALING, ZIMAGE_VAE_SHIFT), text_encoder=text_encoder(),
            tokenizer=make_tiny_qwen_tokenizer(), transformer=transformer())
