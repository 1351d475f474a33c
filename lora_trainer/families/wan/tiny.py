"""The tiny random Wan 2.1 text-to-video pipeline, built offline for tests, the demo and benchmarks.

The real classes and module names (WanTransformer3DModel's blocks.N.attn1 / attn2 / ffn, UMT5EncoderModel,
AutoencoderKLWan: 8x spatial and 4x causal temporal compression, 16 latent channels with per-channel mean / std)
with tiny widths, as diffusers' tests/pipelines/wan (reference/dit-families.md section 6) but with a self-made
tokenizer (testing/t5.py: the real umt5-xxl tokenizer is a 256k sentencepiece model on the hub). Real values in the
comments (1.3B; 14B in brackets).
"""
from __future__ import annotations

from ...testing.parts import seeded
from ...testing.t5 import T5_VOCAB_SIZE, make_tiny_t5_tokenizer

# The tiny widths match no real size: the signature reports no variant (real: "t2v-1.3b", "t2v-14b").
VARIANTS = {"wan21": None, "wan22-5b": "ti2v-5b", "wan22-a14b": "t2v-a14b"}
DEFAULT = "wan21"

WAN_TEXT_DIM = 32  # umt5-xxl d_model 4096 (= the transformer's text_dim)
WAN_HEADS, WAN_HEAD_DIM = 2, 12  # 12 x 128 [40 x 128]; the head dim splits into RoPE's t/h/w parts (4/4/4)
WAN_LAYERS = 2  # 30 [40]
WAN_FFN = 32  # 8960 [13824]
WAN_Z_DIM = 16  # as real
# Wan 2.1's scheduler_config.json (Wan-AI/Wan2.1-T2V-1.3B-Diffusers): UniPC with flow sigmas, shift 3.0.
WAN_SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                     flow_shift=3.0)


def text_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    # Real: vocab 256384, d_model 4096, d_ff 10240, 64 heads x 64, 24 layers, gated-gelu.
    return UMT5EncoderModel(UMT5Config(
        vocab_size=T5_VOCAB_SIZE, d_model=WAN_TEXT_DIM, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))


def transformer(z_dim: int = WAN_Z_DIM):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=WAN_HEADS, attention_head_dim=WAN_HEAD_DIM, in_channels=z_dim,
        out_channels=z_dim, text_dim=WAN_TEXT_DIM, freq_dim=256, ffn_dim=WAN_FFN, num_layers=WAN_LAYERS,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def vae():
    from diffusers import AutoencoderKLWan

    # Real: base_dim 96, dim_mult [1, 2, 4, 4]; the same compression (8x, 4x) and the real latents_mean / std
    # (the class defaults: Wan 2.1's, not 0 / 1, so a trainer skipping the normalisation would not match).
    return AutoencoderKLWan(base_dim=4, z_dim=WAN_Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


WAN22_Z_DIM = 48  # as real
# Wan 2.2's VAE: 2x2 pixel patches in (12 channels), 16x spatially; real base_dim 160, decoder_base_dim 256,
# dim_mult [1, 2, 4, 4], num_res_blocks 2. Per-channel stats of the real magnitude, not 0 / 1.
WAN22_LATENTS_MEAN = [round(0.05 * i - 1.2, 3) for i in range(WAN22_Z_DIM)]
WAN22_LATENTS_STD = [round(0.6 + 0.02 * i, 3) for i in range(WAN22_Z_DIM)]


def vae22():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=WAN22_Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                            latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)


def build(variant: str | None = None, seed: int = 0):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    if variant not in VARIANTS.values():
        raise ValueError(f"unknown tiny Wan variant {variant!r}; expected one of {list(VARIANTS.values())}")
    with seeded(seed):
        if variant == "ti2v-5b":  # Wan2.2-TI2V-5B-Diffusers: per-token timesteps (expand_timesteps), flow_shift 5.0
            return WanPipeline(tokenizer=make_tiny_t5_tokenizer(), text_encoder=text_encoder(), vae=vae22(),
                               scheduler=UniPCMultistepScheduler(**{**WAN_SCHEDULER, "flow_shift": 5.0}),
                               transformer=transformer(WAN22_Z_DIM), expand_timesteps=True)
        if variant == "t2v-a14b":  # Wan2.2-T2V-A14B-Diffusers: two experts, switched at boundary_ratio 0.875
            from .experts import T2V_BOUNDARY

            return WanPipeline(tokenizer=make_tiny_t5_tokenizer(), text_encoder=text_encoder(), vae=vae(),
                               scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER), transformer=transformer(),
                               transformer_2=transformer(), boundary_ratio=T2V_BOUNDARY)
        return WanPipeline(tokenizer=make_tiny_t5_tokenizer(), text_encoder=text_encoder(), vae=vae(),
                           scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER), transformer=transformer())


class FirstFrame:
    """WanPipeline called as the tests call image pipelines (``pipe(prompt=...).images[0]``): a one-frame clip
    unless ``num_frames`` is given, its first frames as ``images``; everything else is the pipeline's."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, **kwargs):
        from types import SimpleNamespace

        kwargs.setdefault("num_frames", 1)
        frames = self.pipe(**kwargs).frames
        return SimpleNamespace(images=[clip[0] for clip in frames], frames=frames)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def wrap_pipeline(pipe):
    """How testing/tiny.load_pipeline hands a saved Wan folder to tests written for image pipelines."""
    return FirstFrame(pipe)
