"""FLUX.1 (dev, schnell) as plain data (torch-free)."""
from __future__ import annotations

from .._mmdit.spec import MMDIT_ACTIVATION_KEYS, MMDIT_ATTENTION, MMDIT_MLP
from ..spec import CLIP_LAYERS, Activations, EncoderReads, FamilySpec, FlowDefaults, TextEntry, ToolNames

_BFL = "https://github.com/black-forest-labs/flux"
# VAE 8x, then 2x2 latent packing -> 16 px. Training draws sigmas from a sigmoid(N(0,1)) (ai-toolkit, SimpleTuner,
# kohya's recommendation) and shifts them as the variant's sampler does, so training spends its steps where sampling
# does: dev by FLUX's resolution-dependent mu (its scheduler's use_dynamic_shifting), schnell not at all (its
# scheduler has shift 1.0; resolution-shifted, its median training sigma at 1024 px would be 0.76, not 0.5).
# Guidance: FLUX.1-dev's guidance embedder is fed 1.0 in training (BFL's advice, black-forest-labs/flux #79;
# ai-toolkit and SimpleTuner default): LoRAs trained at 3.5 come out weaker when sampled at 3.5.
_DEV_FLOW = FlowDefaults(sigma_sampling="sigmoid", shift="resolution")
SPEC = FamilySpec(
    name="flux1", label="FLUX.1", display_name="FLUX.1", objective="flow", pipeline_class="FluxPipeline",
    denoisers=("transformer",), text_encoders=("text_encoder", "text_encoder_2"),
    component_classes={
        "vae": "AutoencoderKL", "transformer": "FluxTransformer2DModel", "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel", "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "T5TokenizerFast"},
    components=("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
    lora_text_encoders=("text_encoder",), default_resolution=1024,
    text_encoder_reads={"text_encoder": EncoderReads(CLIP_LAYERS, -1)},  # CLIP-L's pooler_output: its last layer
    prediction_resolution={}, bucketing_default=True, pixel_multiple=16,
    variant_pixel_multiple={},
    latent_channels=16,
    presets={"attention": MMDIT_ATTENTION,
             "attention_mlp": MMDIT_ATTENTION + MMDIT_MLP + ("proj_mlp", "single_transformer_blocks.*.proj_out"),
             "all_linear": ("transformer_blocks.*", "single_transformer_blocks.*")},
    default_preset="attention_mlp",
    flow={"dev": _DEV_FLOW, "schnell": FlowDefaults(sigma_sampling="sigmoid", shift="none"), None: _DEV_FLOW},
    sample_guidance=3.5, train_guidance={"dev": 1.0, "schnell": None},
    max_sequence_length={"dev": 512, "schnell": 256, None: 512},
    single_file_config_repo={"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell",
                             None: "black-forest-labs/FLUX.1-dev"},
    gated_repos=("black-forest-labs/FLUX.1-dev",),  # schnell (Apache-2.0) is not gated
    blocks=("transformer_blocks", "single_transformer_blocks"),
    # T5-XXL's sequence (4096 wide) and CLIP-L's pooled vector.
    text_entry=TextEntry(tokens=0, sequence=True, width=4096, pooled=768),
    activations=Activations(kind="transformer", **MMDIT_ACTIVATION_KEYS),
    # sd-scripts flux_train_network.py; Forge calls a LoRA FLUX by BFL's URL or flux-1-dev/lora.
    tool_names={"dev": ToolNames("flux1", "flux-1-dev", _BFL), "schnell": ToolNames("flux1", "flux-1-schnell", _BFL),
                None: ToolNames("flux1", "flux-1-dev", _BFL)},
    tool_file_dora=True, kohya_v2=False, kohya_sgm_unet=False, extra_metadata={"ss_model_type": "flux"},
    temporal_compression=0, experts={},
    hub_tags=("flux", "flux-diffusers"))
