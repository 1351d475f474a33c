"""SDXL as plain data (torch-free)."""
from __future__ import annotations

from .._unet.spec import UNET_ACTIVATION_KEYS, UNET_CLASSES, UNET_REPEATED_BLOCKS, sd_presets
from ..spec import CLIP_LAYERS, Activations, EncoderReads, FamilySpec, TextEntry, ToolNames

SPEC = FamilySpec(
    name="sdxl", label="SDXL", display_name="SDXL", objective="ddpm", pipeline_class="StableDiffusionXLPipeline",
    denoisers=("unet",), text_encoders=("text_encoder", "text_encoder_2"),
    component_classes={**UNET_CLASSES, "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer"},
    components=("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2"),
    lora_text_encoders=("text_encoder", "text_encoder_2"), default_resolution=1024,
    # hidden_states[-2] of both (the pipeline's clip_skip None); CLIP-G's pooled text_embeds comes from its last layer,
    # CLIP-L's last layer feeds nothing
    text_encoder_reads={"text_encoder": EncoderReads(CLIP_LAYERS, -2), "text_encoder_2": EncoderReads(CLIP_LAYERS, -1)},
    prediction_resolution={}, bucketing_default=True,
    pixel_multiple=64, latent_channels=4, presets=sd_presets(), default_preset="attention", flow=None,
    variant_pixel_multiple={},
    sample_guidance=7.0, train_guidance={}, max_sequence_length={},
    single_file_config_repo={None: "stabilityai/stable-diffusion-xl-base-1.0"}, gated_repos=(),
    blocks=UNET_REPEATED_BLOCKS,
    # CLIP-L and OpenCLIP-G penultimate states concatenated (768 + 1280), and G's pooled projection.
    text_entry=TextEntry(tokens=77, sequence=False, width=2048, pooled=1280),
    activations=Activations(kind="unet", **UNET_ACTIVATION_KEYS),
    # sai_model_spec: a LoRA of SDXL -> Stability AI's implementation
    tool_names={None: ToolNames("sdxl_base_v1-0", "stable-diffusion-xl-v1-base",
                                "https://github.com/Stability-AI/generative-models")},
    tool_file_dora=True, kohya_v2=False, kohya_sgm_unet=True, extra_metadata={},
    temporal_compression=0, experts={},
    hub_tags=("stable-diffusion-xl", "stable-diffusion-xl-diffusers"))
