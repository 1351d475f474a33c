"""What the tiny FLUX.2 pipelines (flux2/tiny.py, flux2_klein/tiny.py) share: the transformer, the VAE and the
scheduler, with the real classes and module names at tiny widths (real values in the comments; see
reference/dit-families.md §3 and §6)."""
from __future__ import annotations

# VAE (real: block_out_channels (128, 256, 512, 512), 32 latent channels, 32 groups): 8x down like the real one, so a
# 64 px image is an 8x8 latent, 4x4 = 16 tokens once patchified.
VAE_BLOCKS = (8, 16, 32, 32)
VAE_LATENT_CHANNELS = 8
HEADS, HEAD_DIM = 2, 16  # real 48 x 128 (dev), 32 (klein 9B), 24 (klein 4B)
AXES_DIMS_ROPE = (4, 4, 4, 4)  # sums to HEAD_DIM (real (32, 32, 32, 32))
# The real scheduler config (dynamic shifting; the pipelines pass mu from compute_empirical_mu).
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def vae():
    """AutoencoderKLFlux2 with non-trivial BatchNorm running statistics: at their initial 0 / 1 a trainer that skipped
    the normalisation would still match the pipeline (reference families-2026.md, trap 12)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    n = len(VAE_BLOCKS)
    model = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                               block_out_channels=VAE_BLOCKS, layers_per_block=1, latent_channels=VAE_LATENT_CHANNELS,
                               norm_num_groups=8, sample_size=64)
    channels = model.bn.running_mean.shape[0]
    model.bn.running_mean.copy_(0.5 * torch.randn(channels))
    model.bn.running_var.copy_(0.5 + torch.rand(channels))
    return model


def transformer(*, double: int, single: int, text_width: int, guidance: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * VAE_LATENT_CHANNELS, num_layers=double, num_single_layers=single,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=3 * text_width,
        axes_dims_rope=AXES_DIMS_ROPE, guidance_embeds=guidance)


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER)
