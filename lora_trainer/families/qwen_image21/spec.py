"""Qwen-Image 2.1 as plain data (torch-free): families-2026.md section 3."""
from __future__ import annotations

from ..spec import Activations, FamilySpec, FlowDefaults, TextEntry, ToolNames

# One single-stream block: attention (bias-free to_q/k/v, to_out.0) and a SwiGLU MLP (proj, gate_layer, out). The
# shared top-level `modulation` (one Linear for all blocks, fed by the timestep alone) is outside every preset.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
MLP = ("img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out")
_IMPL = "https://github.com/QwenLM/Qwen-Image"
REPO = "Qwen/Qwen-Image-2.1"

# No training script or peer trainer exists for 2.1 (families-2026 section 3). Its sampler shifts its grid by image
# tokens with the scheduler config's base/max shift (calculate_shift in QwenImage21Pipeline, as Qwen-Image's), so
# training takes Qwen-Image's defaults: sigmoid(N(0, 1)) sigmas shifted by resolution with the constants read from
# the model's own scheduler config (resolution_shift_constants); latent_patch 1 counts one token per latent pixel,
# as the pipeline's image_seq_len does. flow_sigma_sampling / flow_shift override.
_FLOW = FlowDefaults(sigma_sampling="sigmoid", shift="resolution")

SPEC = FamilySpec(
    name="qwen_image21", label="Qwen-Image 2.1", display_name="Qwen-Image 2.1", objective="flow",
    pipeline_class="QwenImage21Pipeline", denoisers=("transformer",), text_encoders=("text_encoder",),
    # The tokenizer is the folder's processor/ (Qwen3VLProcessor; FamilySpec.tokenizer_of): read text-only
    # (processor.py).
    component_classes={"vae": "AutoencoderKLQwenImage21", "transformer": "QwenImage21Transformer2DModel",
                       "text_encoder": "Qwen3VLForConditionalGeneration", "processor": "Qwen3VLProcessor"},
    components=("transformer", "vae", "text_encoder", "processor", "scheduler"),
    # Qwen3-VL 8B: cached and released; no text-encoder LoRA.
    lora_text_encoders=(), text_encoder_reads={},
    default_resolution=1024, prediction_resolution={}, bucketing_default=True,
    pixel_multiple=32,  # the pipeline rounds sides to vae_scale_factor (16) x 2: one image slot is 2x2 tokens
    variant_pixel_multiple={},
    latent_channels=64,
    presets={"attention": ATTENTION, "attention_mlp": ATTENTION + MLP, "all_linear": ("transformer_blocks.*",)},
    default_preset="attention",
    flow={None: _FLOW},
    # The pipeline's true_cfg_scale default: 2.1 is sampled without guidance (no guidance embedder either).
    sample_guidance=1.0, train_guidance={},
    # The pipeline does not truncate prompts; the text cache stores rows of this many tokens (a longer caption is cut
    # here) and predict trims them back to the batch's longest caption, as the pipeline pads a batch.
    max_sequence_length={None: 512},
    # diffusers' single-file loader maps 2.1 files (convert_qwen_image21_transformer_checkpoint_to_diffusers) and
    # takes configs from this repo (CHECKPOINT_KEY_NAMES "qwen-image-2.1").
    single_file_config_repo={None: REPO}, gated_repos=(),
    blocks=("transformer_blocks",),
    # Qwen3-VL-8B's last decoder layer before its final norm, 4096 wide, one row per prompt token after the system
    # turn; no pooled vector.
    text_entry=TextEntry(tokens=0, sequence=True, width=4096, pooled=0),
    # 32 single-stream blocks of 32 x 128 over the joint text + image sequence; the shared modulation reads only the
    # timestep embedding.
    activations=Activations(kind="transformer", width_keys={"num_attention_heads": 32, "attention_head_dim": 128},
                            depth_keys={"num_layers": 32}, conditioning_inputs=("modulation.1",),
                            checkpoint_units=("transformer_blocks",), token_pixels=16),
    # No sd-scripts / musubi-tuner name exists for 2.1 (no peer trains it): musubi-tuner's Qwen-Image naming
    # (ss_base_model_version "qwen_image", architecture "Qwen-Image") with the version appended.
    tool_names={None: ToolNames("qwen_image_2_1", "Qwen-Image-2.1", _IMPL)},
    tool_file_dora=True,
    kohya_v2=False, kohya_sgm_unet=False, extra_metadata={}, temporal_compression=0, experts={},
    hub_tags=("qwen-image", "qwen-image-2.1"))
