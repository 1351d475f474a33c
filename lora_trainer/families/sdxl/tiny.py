"""The tiny random SDXL pipeline (tests, demo, benchmarks): SDXL's layout with tiny widths."""
from __future__ import annotations

from ...testing.parts import VOCAB_SIZE, _text_config, make_tiny_tokenizer, seeded
from .._unet.tiny import SD_SCHEDULE, UNET_COMMON, sd_vae

# tiny name -> what build() takes (the CLI's --family choices come from every family's VARIANTS).
VARIANTS = {"sdxl": None}
DEFAULT = "sdxl"


def _pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    h1, h2, proj, time_dim = 32, 64, 32, 8
    # projection_dim != hidden_size on purpose: code that confuses the two
    # for the pooled embedding breaks here instead of silently on real SDXL.
    text_encoder = CLIPTextModel(_text_config(h1, "quick_gelu", VOCAB_SIZE - 1))
    # 10 layers (still tiny) so the single-file export carries resblocks.9,
    # the key diffusers' infer_diffusers_model_type uses to recognise SDXL.
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(h2, "gelu", 0, projection_dim=proj, layers=10))
    unet = UNet2DConditionModel(
        **UNET_COMMON,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=h1 + h2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # pooled text embeds + 6 micro-conditioning values (orig size, crop, target size).
        projection_class_embeddings_input_dim=proj + 6 * time_dim,
    )
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading",
                                       interpolation_type="linear", use_karras_sigmas=False,
                                       prediction_type="epsilon")
    return StableDiffusionXLPipeline(
        vae=sd_vae(0.13025, True), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=make_tiny_tokenizer(), tokenizer_2=make_tiny_tokenizer(pad_token="!"),
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def build(variant=None, seed: int = 0):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched."""
    if variant not in VARIANTS.values():
        raise ValueError(f"unknown tiny SDXL variant {variant!r}")
    with seeded(seed):
        return _pipeline()
