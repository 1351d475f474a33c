"""The tiny random FLUX.1 pipelines (dev and schnell), built offline for tests, the demo and benchmarks.

The real model's classes, block layout and module names (what LoRA target matching and ComfyUI key mapping depend
on) with tiny widths, saved as safetensors-only diffusers folders that `DiffusionPipeline.from_pretrained` loads with
no hub access and that generate a 64x64 image in about a second on CPU. Real values in the comments (see
reference/dit-families.md).
"""
from __future__ import annotations

from ...testing.parts import LATENT_CHANNELS, VOCAB_SIZE, _text_config, flow_vae, make_tiny_tokenizer, seeded
from ...testing.t5 import T5_D_MODEL, make_tiny_t5_tokenizer, t5_encoder

# tiny name -> the variant its signature reports (the CLI's --family choices come from every family's VARIANTS).
VARIANTS = {"flux1-dev": "dev", "flux1-schnell": "schnell"}
DEFAULT = "flux1-dev"

FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159

# Transformer (real: 19 double + 38 single blocks, 24 heads x 128, axes (16, 56, 56)).
FLUX_CLIP_HIDDEN = 32  # CLIP-L width (real 768) = pooled_projection_dim
FLUX_NUM_LAYERS, FLUX_NUM_SINGLE_LAYERS = 2, 2
FLUX_NUM_HEADS, FLUX_HEAD_DIM = 4, 16  # inner dim 64 = the packed latent width, as real FLUX (3072 > 64): no bottleneck
FLUX_AXES_DIMS_ROPE = (4, 6, 6)  # sums to FLUX_HEAD_DIM
FLUX_IN_CHANNELS = LATENT_CHANNELS * 4  # 2x2 packing -> 64, as the real model

# FLUX.1-dev's scheduler config; schnell is static shift 1.0.
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                          base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def _pipeline(dev: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=FLUX_IN_CHANNELS, num_layers=FLUX_NUM_LAYERS,
        num_single_layers=FLUX_NUM_SINGLE_LAYERS, attention_head_dim=FLUX_HEAD_DIM,
        num_attention_heads=FLUX_NUM_HEADS, joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=FLUX_CLIP_HIDDEN, guidance_embeds=dev, axes_dims_rope=FLUX_AXES_DIMS_ROPE,
    )
    # FLUX uses CLIP-L's pooled output only (no projection) and T5's hidden states.
    text_encoder = CLIPTextModel(_text_config(FLUX_CLIP_HIDDEN, "quick_gelu", VOCAB_SIZE - 1))
    scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if dev else FLUX_SCHNELL_SCHEDULER))
    return FluxPipeline(
        scheduler=scheduler, vae=flow_vae(FLUX_VAE_SCALING, FLUX_VAE_SHIFT), text_encoder=text_encoder,
        tokenizer=make_tiny_tokenizer(), text_encoder_2=t5_encoder(), tokenizer_2=make_tiny_t5_tokenizer(),
        transformer=transformer,
    )


def build(variant: str = "dev", seed: int = 0):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched."""
    if variant not in VARIANTS.values():
        raise ValueError(f"unknown tiny FLUX.1 variant {variant!r}; expected one of {', '.join(VARIANTS.values())}")
    with seeded(seed):
        return _pipeline(dev=variant == "dev")
