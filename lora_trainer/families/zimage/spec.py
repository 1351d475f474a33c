"""Z-Image (base and Turbo) as plain data (torch-free)."""
from __future__ import annotations

from ..spec import Activations, FamilySpec, FlowDefaults, TextEntry, ToolNames

_IMPL = "https://github.com/Tongyi-MAI/Z-Image"
# ZImageTransformer2DModel: the main layers and both refiners have attention.to_q/k/v/to_out.0 (what diffusers'
# and SimpleTuner's scripts target by default); feed_forward.w1/w2/w3 are the SwiGLU MLP; adaLN_modulation.0 the
# per-block timestep modulation (main layers and noise_refiner; context_refiner has none).
ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
MLP = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# VAE 8x, patch 2 -> 16 px. Uniform sigmas warped by the static shift of its scheduler, no loss weighting: what
# diffusers' train_dreambooth_lora_z_image.py does (its sigmas come from the scheduler's shifted table). 3.0 is
# Turbo's scheduler shift, the one every trainer before the base release used; flow_shift_value overrides it.
SPEC = FamilySpec(
    name="zimage", label="Z-Image", display_name="Z-Image", objective="flow", pipeline_class="ZImagePipeline",
    denoisers=("transformer",), text_encoders=("text_encoder",),
    component_classes={"vae": "AutoencoderKL", "transformer": "ZImageTransformer2DModel",
                       "text_encoder": "Qwen3Model", "tokenizer": "Qwen2Tokenizer"},
    components=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    # Qwen3-4B stays frozen: no peer trains it, and the pipeline's LoRA loader drops text_encoder keys.
    lora_text_encoders=(), text_encoder_reads={}, default_resolution=1024, prediction_resolution={},
    bucketing_default=True, pixel_multiple=16, latent_channels=16,
    variant_pixel_multiple={},
    presets={"attention": ATTENTION, "attention_mlp": ATTENTION + MLP,
             # ai-toolkit's default: every Linear of the main layers (attention, MLP, adaLN modulation).
             "all_linear": ("layers.*",)},
    default_preset="attention",
    flow={None: FlowDefaults(sigma_sampling="uniform", shift="static", shift_value=3.0)},
    # Base: CFG 4.0 over 28-50 steps (the model card); Turbo samples with 0.0 (adapter.sample_kwargs).
    sample_guidance=4.0, train_guidance={}, max_sequence_length={None: 512},
    single_file_config_repo={None: "Tongyi-MAI/Z-Image"}, gated_repos=(),
    blocks=("noise_refiner", "context_refiner", "layers"),
    # Qwen3-4B's hidden_states[-2] (2560 wide) padded to max_sequence_length, and its mask (one byte a token,
    # rounded into the width here: 512 x 2560 elements).
    text_entry=TextEntry(tokens=0, sequence=True, width=2560, pooled=0),
    # Single stream: every main layer attends over image + text tokens; the noise refiner over the image tokens.
    # t_embedder feeds every block's adaLN_modulation and the final layer's: conditioning only.
    activations=Activations(kind="transformer", conditioning_inputs=("adaLN_modulation.0", "adaLN_modulation.1"),
                            checkpoint_units=("noise_refiner", "context_refiner", "layers"),
                            width_keys={"dim": 3840}, depth_keys={"n_layers": 30, "n_refiner_layers": 2}),
    # musubi-tuner (sai_model_spec.py ARCH_Z_IMAGE / IMPL_Z_IMAGE; dataset ARCHITECTURE_Z_IMAGE_FULL "z_image").
    tool_names={None: ToolNames("z_image", "Z-Image", _IMPL)},
    tool_file_dora=True,
    kohya_v2=False, kohya_sgm_unet=False, extra_metadata={}, temporal_compression=0, experts={},
    hub_tags=("z-image", "z-image-diffusers"))
