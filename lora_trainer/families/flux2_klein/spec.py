"""FLUX.2 klein (4B, 9B; base and step-distilled) as plain data (torch-free)."""
from __future__ import annotations

from .._flux2.spec import (FLUX2_ACTIVATIONS, FLUX2_BLOCKS, FLUX2_FLOW, FLUX2_KLEIN_4B_NAMES, FLUX2_KLEIN_9B_NAMES,
                           FLUX2_PRESETS)
from ..spec import FamilySpec, TextEntry

_BASE_4B, _BASE_9B = "black-forest-labs/FLUX.2-klein-base-4B", "black-forest-labs/FLUX.2-klein-base-9B"
SPEC = FamilySpec(
    name="flux2_klein", label="FLUX.2 klein", display_name="FLUX.2 [klein]", objective="flow",
    pipeline_class="Flux2KleinPipeline", denoisers=("transformer",), text_encoders=("text_encoder",),
    component_classes={"vae": "AutoencoderKLFlux2", "transformer": "Flux2Transformer2DModel",
                       "text_encoder": "Qwen3ForCausalLM", "tokenizer": "Qwen2TokenizerFast"},
    components=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    lora_text_encoders=(), text_encoder_reads={}, default_resolution=1024, prediction_resolution={},
    bucketing_default=True, pixel_multiple=16,
    variant_pixel_multiple={},
    latent_channels=32,  # the VAE's; patchified 2x2 to 128 per token
    presets=FLUX2_PRESETS, default_preset="attention",
    flow={"klein-4b": FLUX2_FLOW, "klein-9b": FLUX2_FLOW, None: FLUX2_FLOW},
    # Flux2KleinPipeline's default guidance_scale (real CFG on the base models; the distilled ones ignore it and the
    # adapter samples them at 1.0). No guidance embedder: nothing is fed in training.
    sample_guidance=4.0, train_guidance={"klein-4b": None, "klein-9b": None, None: None},
    max_sequence_length={None: 512},  # the pipeline's default, padded to it
    single_file_config_repo={"klein-4b": _BASE_4B, "klein-9b": _BASE_9B, None: _BASE_4B},
    gated_repos=(_BASE_9B,),  # 9B: FLUX non-commercial licence, gated; 4B: Apache-2.0
    blocks=FLUX2_BLOCKS,
    # Qwen3 hidden states at 3 layers stacked on channels: 3 x 4096 (9B; the 4B's 3 x 2560 is smaller).
    text_entry=TextEntry(tokens=0, sequence=True, width=12288, pooled=0),
    activations=FLUX2_ACTIVATIONS,
    tool_names={"klein-4b": FLUX2_KLEIN_4B_NAMES, "klein-9b": FLUX2_KLEIN_9B_NAMES, None: FLUX2_KLEIN_4B_NAMES},
    tool_file_dora=False,
    kohya_v2=False, kohya_sgm_unet=False, extra_metadata={}, temporal_compression=0, experts={},
    hub_tags=("flux2", "flux2-klein", "flux-diffusers"))
