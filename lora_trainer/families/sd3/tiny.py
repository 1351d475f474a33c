"""The tiny random SD3 pipeline (3.5-medium-like), built offline for tests, the demo and benchmarks.

The real model's classes, block layout and module names with tiny widths (as families/flux1/tiny.py). Real values
in the comments: 24 layers, 24 heads x 64, caption 1536, pos_embed_max_size 384, dual attention in blocks 0-12,
CLIP-L 768 + bigG 1280 -> pooled 2048, zero-padded to 4096.
"""
from __future__ import annotations

from ...testing.parts import LATENT_CHANNELS, VOCAB_SIZE, _text_config, flow_vae, make_tiny_tokenizer, seeded
from ...testing.t5 import T5_D_MODEL, make_tiny_t5_tokenizer, t5_encoder

# tiny name -> the variant its signature reports (the CLI's --family choices come from every family's VARIANTS).
VARIANTS = {"sd3": "sd3.5-medium"}
DEFAULT = "sd3"

SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609

SD3_CLIP_L_HIDDEN, SD3_CLIP_G_HIDDEN = 16, 32  # sum 48 < T5_D_MODEL: the pipeline's zero-padding is exercised
SD3_CLIP_L_PROJ, SD3_CLIP_G_PROJ = 24, 48  # != hidden sizes on purpose
SD3_POOLED_DIM = SD3_CLIP_L_PROJ + SD3_CLIP_G_PROJ  # 72
SD3_NUM_LAYERS = 2  # block 0 dual attention (attn2), block 1 (last) context_pre_only
SD3_NUM_HEADS, SD3_HEAD_DIM = 2, 16
SD3_CAPTION_PROJECTION_DIM = SD3_NUM_HEADS * SD3_HEAD_DIM  # must equal the inner dim (32)
SD3_PATCH_SIZE = 2
SD3_SAMPLE_SIZE = 8  # latent size -> 64 px default images
SD3_POS_EMBED_MAX_SIZE = 32  # in patches: images up to 32 * 2 * 8 = 512 px per side
SD3_DUAL_ATTENTION_LAYERS = (0,)

SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # static shift


def _pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(
        sample_size=SD3_SAMPLE_SIZE, patch_size=SD3_PATCH_SIZE, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, num_layers=SD3_NUM_LAYERS, attention_head_dim=SD3_HEAD_DIM,
        num_attention_heads=SD3_NUM_HEADS, joint_attention_dim=T5_D_MODEL,
        caption_projection_dim=SD3_CAPTION_PROJECTION_DIM, pooled_projection_dim=SD3_POOLED_DIM,
        pos_embed_max_size=SD3_POS_EMBED_MAX_SIZE, qk_norm="rms_norm",
        dual_attention_layers=SD3_DUAL_ATTENTION_LAYERS,
    )
    # CLIP-L (quick_gelu, pads with EOS) and OpenCLIP bigG (gelu, pads with "!" = id 0), as SDXL.
    text_encoder = CLIPTextModelWithProjection(
        _text_config(SD3_CLIP_L_HIDDEN, "quick_gelu", VOCAB_SIZE - 1, projection_dim=SD3_CLIP_L_PROJ))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(SD3_CLIP_G_HIDDEN, "gelu", 0, projection_dim=SD3_CLIP_G_PROJ))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=flow_vae(SD3_VAE_SCALING, SD3_VAE_SHIFT),
        text_encoder=text_encoder, tokenizer=make_tiny_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=make_tiny_tokenizer(pad_token="!"),
        text_encoder_3=t5_encoder(), tokenizer_3=make_tiny_t5_tokenizer(),
    )


def build(variant: str = "sd3.5-medium", seed: int = 0):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched."""
    if variant not in VARIANTS.values():
        raise ValueError(f"unknown tiny SD3 variant {variant!r}; expected one of {', '.join(VARIANTS.values())}")
    with seeded(seed):
        return _pipeline()
