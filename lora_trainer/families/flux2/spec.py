"""FLUX.2 dev as plain data (torch-free)."""
from __future__ import annotations

from .._flux2.spec import FLUX2_ACTIVATIONS, FLUX2_BLOCKS, FLUX2_DEV_NAMES, FLUX2_FLOW, FLUX2_PRESETS
from ..spec import FamilySpec, TextEntry

_DEV = "black-forest-labs/FLUX.2-dev"
SPEC = FamilySpec(
    name="flux2", label="FLUX.2", display_name="FLUX.2 [dev]", objective="flow", pipeline_class="Flux2Pipeline",
    denoisers=("transformer",), text_encoders=("text_encoder",),
    # The folder's tokenizer is a PixtralProcessor; its image half needs torchvision, which the trainer does not
    # install, and prompts have no images: AutoTokenizer reads its tokenizer files (same ids; flux2/tiny.py says why).
    component_classes={"vae": "AutoencoderKLFlux2", "transformer": "Flux2Transformer2DModel",
                       "text_encoder": "Mistral3ForConditionalGeneration", "tokenizer": "AutoTokenizer"},
    components=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    lora_text_encoders=(), text_encoder_reads={}, default_resolution=1024, prediction_resolution={},
    bucketing_default=True, pixel_multiple=16,
    variant_pixel_multiple={},
    latent_channels=32,  # the VAE's; patchified 2x2 to 128 per token
    presets=FLUX2_PRESETS, default_preset="attention",
    flow={"dev": FLUX2_FLOW, None: FLUX2_FLOW},
    # Sampling: Flux2Pipeline's default guidance_scale (its guidance embedder, not CFG). Training feeds the embedder
    # 1.0, as ai-toolkit and SimpleTuner do and BFL advised for FLUX.1-dev (diffusers' script defaults to 3.5, its
    # README examples pass 1): train_guidance_scale overrides.
    sample_guidance=4.0, train_guidance={"dev": 1.0, None: 1.0},
    max_sequence_length={None: 512},  # the pipeline's default, padded to it
    single_file_config_repo={"dev": _DEV, None: _DEV}, gated_repos=(_DEV,),
    blocks=FLUX2_BLOCKS,
    # Mistral Small 3.1 hidden states at 3 layers stacked on channels: 3 x 5120.
    text_entry=TextEntry(tokens=0, sequence=True, width=15360, pooled=0),
    activations=FLUX2_ACTIVATIONS,
    tool_names={"dev": FLUX2_DEV_NAMES, None: FLUX2_DEV_NAMES},
    tool_file_dora=False,
    kohya_v2=False, kohya_sgm_unet=False, extra_metadata={}, temporal_compression=0, experts={},
    hub_tags=("flux2", "flux2-dev", "flux-diffusers"))
