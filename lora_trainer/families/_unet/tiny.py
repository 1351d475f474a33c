"""What the tiny SD1.x / SD2.x / SDXL builders share: the 4-channel VAE, the DDPM schedule, the UNet's common
config and the SD1/SD2 pipeline (one CLIP text encoder). torch and diffusers are imported inside the functions."""
from __future__ import annotations

from ...testing.parts import VOCAB_SIZE, _text_config, make_tiny_tokenizer

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# sample_size 8 latents -> 64 px default images (real: 64 -> 512 px, 128 -> 1024 px).
UNET_COMMON = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32)


def sd_vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    # Four blocks -> three downsamples: the same 8x image-to-latent ratio as the real VAE.
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), layers_per_block=2, latent_channels=4, norm_num_groups=16,
        sample_size=64, scaling_factor=scaling_factor, force_upcast=force_upcast,
    )


def pndm_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="epsilon")


def sd_pipeline(*, hidden: int, act: str, attention_head_dim, linear_projection: bool, scheduler_factory):
    """SD1.x / SD2.x: a four-level UNet cross-attending to one CLIP text encoder of width `hidden`."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    # The random draws go UNet, text encoder, VAE: the order the saved tiny models were first built in.
    unet = UNet2DConditionModel(
        **UNET_COMMON,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        cross_attention_dim=hidden,
        # diffusers' "attention_head_dim" is really the head count (legacy naming).
        attention_head_dim=attention_head_dim,
        use_linear_projection=linear_projection,
    )
    text_encoder = CLIPTextModel(_text_config(hidden, act, VOCAB_SIZE - 1))
    scheduler = scheduler_factory()
    return StableDiffusionPipeline(
        vae=sd_vae(0.18215, False), text_encoder=text_encoder, tokenizer=make_tiny_tokenizer(),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
