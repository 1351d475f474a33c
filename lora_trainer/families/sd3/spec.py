"""SD3 / SD3.5 as plain data (torch-free)."""
from __future__ import annotations

from .._mmdit.spec import MMDIT_ACTIVATION_KEYS, MMDIT_ATTENTION, MMDIT_MLP
from ..spec import CLIP_LAYERS, Activations, EncoderReads, FamilySpec, FlowDefaults, TextEntry, ToolNames

# VAE 8x, patch 2 -> 16 px. Logit-normal sigmas with the static shift 3.0 of its scheduler and x0 preconditioning:
# what diffusers' and kohya's SD3 scripts do by default. The same for every variant (None only): SD3-medium's,
# SD3.5-medium's and SD3.5-large's schedulers all have shift 3.0 (diffusers' SD3.5 release: Large keeps SD3
# Medium's scheduler).
SPEC = FamilySpec(
    name="sd3", label="SD3/3.5", display_name="Stable Diffusion 3 / 3.5", objective="flow",
    pipeline_class="StableDiffusion3Pipeline", denoisers=("transformer",),
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    component_classes={
        "vae": "AutoencoderKL", "transformer": "SD3Transformer2DModel", "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection", "text_encoder_3": "T5EncoderModel",
        "tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer", "tokenizer_3": "T5TokenizerFast"},
    components=("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                "text_encoder_3", "tokenizer_3", "scheduler"),
    lora_text_encoders=("text_encoder", "text_encoder_2"), default_resolution=1024,
    # hidden_states[-2] of both CLIP encoders, and both pooled text_embeds: from their last layers
    text_encoder_reads={"text_encoder": EncoderReads(CLIP_LAYERS, -1), "text_encoder_2": EncoderReads(CLIP_LAYERS, -1)},
    prediction_resolution={}, bucketing_default=True,
    pixel_multiple=16, latent_channels=16,
    variant_pixel_multiple={},
    presets={"attention": MMDIT_ATTENTION, "attention_mlp": MMDIT_ATTENTION + MMDIT_MLP,
             "all_linear": ("transformer_blocks.*",)},
    default_preset="attention", flow={None: FlowDefaults(sigma_sampling="logit_normal", shift="static",
                                                         shift_value=3.0, precondition_outputs=True)},
    sample_guidance=7.0, train_guidance={}, max_sequence_length={None: 256},
    single_file_config_repo={"sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
                             "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
                             "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
                             None: "stabilityai/stable-diffusion-3.5-large"},
    gated_repos=("stabilityai/stable-diffusion-3-medium-diffusers", "stabilityai/stable-diffusion-3.5-medium",
                 "stabilityai/stable-diffusion-3.5-large"),
    blocks=("transformer_blocks",),
    # CLIP-L + CLIP-G states zero-padded to T5's 4096 and joined with T5's sequence; both pooled vectors.
    text_entry=TextEntry(tokens=77, sequence=True, width=4096, pooled=2048),
    activations=Activations(kind="transformer", **MMDIT_ACTIVATION_KEYS),
    # sd-scripts sd3_train_network.py / sai_model_spec.py
    tool_names={"sd3-medium": ToolNames("medium", "stable-diffusion-3-medium", "diffusers"),
                "sd3.5-medium": ToolNames("5-medium", "stable-diffusion-3-5-medium", "diffusers"),
                "sd3.5-large": ToolNames("5-large", "stable-diffusion-3-5-large", "diffusers"),
                None: ToolNames("5-large", "stable-diffusion-3-5-large", "diffusers")},
    tool_file_dora=True, kohya_v2=False, kohya_sgm_unet=False, extra_metadata={}, temporal_compression=0, experts={},
    hub_tags=("sd3", "sd3-diffusers"))
