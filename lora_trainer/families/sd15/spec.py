"""SD1.x as plain data (torch-free)."""
from __future__ import annotations

from .._unet.spec import UNET_ACTIVATION_KEYS, UNET_CLASSES, UNET_COMPONENTS, UNET_REPEATED_BLOCKS, sd_presets
from ..spec import CLIP_LAYERS, Activations, EncoderReads, FamilySpec, TextEntry, ToolNames

SPEC = FamilySpec(
    name="sd15", label="SD1.x", display_name="Stable Diffusion 1.x", objective="ddpm",
    pipeline_class="StableDiffusionPipeline", denoisers=("unet",), text_encoders=("text_encoder",),
    component_classes=UNET_CLASSES, components=UNET_COMPONENTS, lora_text_encoders=("text_encoder",),
    # the pipeline conditions on last_hidden_state (clip_skip None)
    text_encoder_reads={"text_encoder": EncoderReads(CLIP_LAYERS, -1)},
    default_resolution=512, prediction_resolution={}, bucketing_default=False, pixel_multiple=8, latent_channels=4,
    variant_pixel_multiple={},
    presets=sd_presets(), default_preset="attention", flow=None, sample_guidance=7.0, train_guidance={},
    max_sequence_length={}, single_file_config_repo={None: "stable-diffusion-v1-5/stable-diffusion-v1-5"},
    gated_repos=(),
    blocks=UNET_REPEATED_BLOCKS, text_entry=TextEntry(tokens=77, sequence=False, width=768, pooled=0),
    activations=Activations(kind="unet", **UNET_ACTIVATION_KEYS),
    tool_names={None: ToolNames("sd_v1", "stable-diffusion-v1", "diffusers")},
    tool_file_dora=True, kohya_v2=False, kohya_sgm_unet=False,
    extra_metadata={},
    temporal_compression=0, experts={},
    hub_tags=("stable-diffusion", "stable-diffusion-diffusers"))
