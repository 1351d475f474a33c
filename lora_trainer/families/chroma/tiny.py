"""The tiny random Chroma pipeline, built offline for tests, the demo and benchmarks.

ChromaTransformer2DModel with diffusers' own test widths (tests/pipelines/chroma, dit-families.md section 6: one
double and one single block, 2 heads x 16, a one-layer approximator), FLUX.1's tiny VAE and T5 (testing/t5.py),
saved as a safetensors-only diffusers folder. Real values in the comments (Chroma1-HD's config)."""
from __future__ import annotations

from ...testing.parts import LATENT_CHANNELS, flow_vae, seeded
from ...testing.t5 import T5_D_MODEL, make_tiny_t5_tokenizer, t5_encoder

# tiny name -> the variant its signature reports (Chroma1-HD and Chroma1-Base have the same files).
VARIANTS = {"chroma": None}
DEFAULT = "chroma"

CHROMA_VAE_SCALING, CHROMA_VAE_SHIFT = 0.3611, 0.1159  # the FLUX.1 VAE's
CHROMA_NUM_LAYERS, CHROMA_NUM_SINGLE_LAYERS = 1, 1  # real 19 + 38
CHROMA_NUM_HEADS, CHROMA_HEAD_DIM = 2, 16  # real 24 x 128
CHROMA_AXES_DIMS_ROPE = (4, 6, 6)  # real (16, 56, 56); sums to the head dim
# The approximator (distilled_guidance_layer) that replaces FLUX.1's per-block modulation Linears: real in 64,
# 5 layers of 5120.
CHROMA_APPROX_CHANNELS, CHROMA_APPROX_HIDDEN, CHROMA_APPROX_LAYERS = 16, 32, 1
# Chroma1-HD's scheduler_config.json: FLUX.1-dev's (the pipeline computes mu from it at every resolution).
CHROMA_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def _pipeline():
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=CHROMA_NUM_LAYERS,
        num_single_layers=CHROMA_NUM_SINGLE_LAYERS, attention_head_dim=CHROMA_HEAD_DIM,
        num_attention_heads=CHROMA_NUM_HEADS, joint_attention_dim=T5_D_MODEL, axes_dims_rope=CHROMA_AXES_DIMS_ROPE,
        approximator_num_channels=CHROMA_APPROX_CHANNELS, approximator_hidden_dim=CHROMA_APPROX_HIDDEN,
        approximator_layers=CHROMA_APPROX_LAYERS)
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**CHROMA_SCHEDULER),
                          vae=flow_vae(CHROMA_VAE_SCALING, CHROMA_VAE_SHIFT), text_encoder=t5_encoder(),
                          tokenizer=make_tiny_t5_tokenizer(), transformer=transformer)


def build(variant: str | None = None, seed: int = 0):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched."""
    if variant is not None:
        raise ValueError(f"unknown tiny Chroma variant {variant!r}; Chroma has one")
    with seeded(seed):
        return _pipeline()
