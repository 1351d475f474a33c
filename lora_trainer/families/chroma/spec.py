"""Chroma (Chroma1-HD, Chroma1-Base) as plain data (torch-free): FLUX.1-schnell's architecture with the per-block
modulation Linears pruned (one approximator, ``distilled_guidance_layer``, makes every block's modulations from the
timestep), T5-XXL only, FLUX.1's VAE and 2x2 latent packing."""
from __future__ import annotations

from .._mmdit.spec import MMDIT_ATTENTION, MMDIT_MLP
from ..spec import Activations, FamilySpec, FlowDefaults, TextEntry, ToolNames

# sd-scripts library/sai_model_spec.py: ARCH_FLUX_1_CHROMA "chroma", IMPL_CHROMA; flux_utils MODEL_VERSION_CHROMA
# "chroma" (its ss_base_model_version).
_IMPL = "https://huggingface.co/lodestones/Chroma"
# Training sigmas: sigmoid(N(0, 1)), unshifted: kohya's recommendation for Chroma (sd-scripts #2163 / PR #2165,
# --timestep_sampling sigmoid with raw model prediction). ai-toolkit shifts by resolution with FLUX.1-dev's
# scheduler constants, as the pipeline samples: flow_shift "resolution" gives that.
_FLOW = FlowDefaults(sigma_sampling="sigmoid", shift="none")
# Linears of the approximator: fed by the timestep (and its fixed guidance 0 and modulation indices) alone.
_APPROXIMATOR = ("distilled_guidance_layer.in_proj", "distilled_guidance_layer.out_proj",
                 "distilled_guidance_layer.layers.*")

SPEC = FamilySpec(
    name="chroma", label="Chroma", display_name="Chroma", objective="flow", pipeline_class="ChromaPipeline",
    denoisers=("transformer",), text_encoders=("text_encoder",),
    component_classes={"vae": "AutoencoderKL", "transformer": "ChromaTransformer2DModel",
                       "text_encoder": "T5EncoderModel", "tokenizer": "T5TokenizerFast"},
    components=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    # T5-XXL (4.7 B): cached and released; the pipeline's LoRA loader knows CLIP names only (no T5 LoRA).
    lora_text_encoders=(), text_encoder_reads={},
    default_resolution=1024, prediction_resolution={}, bucketing_default=True, pixel_multiple=16,
    variant_pixel_multiple={},
    latent_channels=16,
    # FLUX.1's module names minus the pruned modulation Linears (norm1.linear, norm1_context.linear, norm.linear):
    # all_linear reaches every Linear the blocks still have.
    presets={"attention": MMDIT_ATTENTION,
             "attention_mlp": MMDIT_ATTENTION + MMDIT_MLP + ("proj_mlp", "single_transformer_blocks.*.proj_out"),
             "all_linear": ("transformer_blocks.*", "single_transformer_blocks.*")},
    default_preset="attention_mlp",
    flow={None: _FLOW},
    # ChromaPipeline's guidance_scale default: real CFG against the negative prompt (no guidance embedder).
    sample_guidance=5.0, train_guidance={},
    max_sequence_length={None: 512},  # the pipeline's default and maximum
    single_file_config_repo={None: "lodestones/Chroma1-HD"}, gated_repos=(),
    blocks=("transformer_blocks", "single_transformer_blocks"),
    # T5-XXL's sequence, 4096 wide (its mask beside it is 1/4096 of the entry); no pooled vector.
    text_entry=TextEntry(tokens=0, sequence=True, width=4096, pooled=0),
    # FLUX.1's blocks (the activation figures were measured on them), 19 + 38 of 24 x 128.
    activations=Activations(kind="transformer", width_keys={"num_attention_heads": 24, "attention_head_dim": 128},
                            depth_keys={"num_layers": 19, "num_single_layers": 38},
                            conditioning_inputs=_APPROXIMATOR,
                            checkpoint_units=("transformer_blocks", "single_transformer_blocks")),
    tool_names={None: ToolNames("chroma", "chroma", _IMPL)},
    tool_file_dora=True,
    kohya_v2=False, kohya_sgm_unet=False, extra_metadata={}, temporal_compression=0, experts={},
    hub_tags=("chroma", "chroma-diffusers"))
