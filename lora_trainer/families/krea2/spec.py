"""Krea 2 (Raw, the base to train on, and Turbo, its 8-step distillation) as plain data (torch-free).

Raw and Turbo share one transformer config: Turbo is told by model_index.json ``is_distilled`` (or its name), which
signature.distilled turns into the probe's model_distilled warning naming Krea-2-Raw; there are no variants."""
from __future__ import annotations

from ..spec import Activations, FamilySpec, FlowDefaults, TextEntry, ToolNames

# Krea2Transformer2DModel's attention (main blocks and the text-fusion blocks: suffix patterns, as diffusers'
# train_dreambooth_lora_krea2.py matches them) with its sigmoid output gate, and the SwiGLU MLP.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "to_gate")
MLP = ("ff.gate", "ff.up", "ff.down")
# Every Linear (musubi-tuner's lora_krea2.py: 264 on the real model, the authors' recommended set): both block
# lists, the text projector and projection, the image input, the timestep MLP and modulation, the output layer. The
# modulation tables (scale_shift_table) are Parameters, never wrapped.
ALL_LINEAR = ("transformer_blocks.*", "text_fusion.*", "img_in", "txt_in.linear_1", "txt_in.linear_2",
              "time_embed.linear_1", "time_embed.linear_2", "time_mod_proj", "final_layer.linear")
RAW_REPO, TURBO_REPO = "krea/Krea-2-Raw", "krea/Krea-2-Turbo"
_IMPL = "https://github.com/krea-ai/krea-2"

# Training sigmas: sigmoid(N(0, 1)) shifted by resolution with Krea 2's own scheduler constants (0.5 at 256 tokens
# to 1.15 at 6400: resolution_shift_constants reads them from scheduler_config), where the Raw pipeline samples (mu
# 0.91, shift ~2.5 at 1024 px). diffusers' train_dreambooth_lora_krea2.py draws its sigmas from the checkpoint's
# dynamic-shift scheduler table, i.e. unshifted: flow_sigma_sampling "uniform" + flow_shift "none" reproduce it.
_FLOW = FlowDefaults(sigma_sampling="sigmoid", shift="resolution")

SPEC = FamilySpec(
    name="krea2", label="Krea 2", display_name="Krea 2", objective="flow", pipeline_class="Krea2Pipeline",
    denoisers=("transformer",), text_encoders=("text_encoder",),
    component_classes={"vae": "AutoencoderKLQwenImage", "transformer": "Krea2Transformer2DModel",
                       "text_encoder": "Qwen3VLModel", "tokenizer": "Qwen2Tokenizer"},
    components=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    # Qwen3-VL-4B stays frozen (no peer trains it; Krea2LoraLoaderMixin loads transformer keys only).
    lora_text_encoders=(), text_encoder_reads={},
    default_resolution=1024, prediction_resolution={}, bucketing_default=True,
    pixel_multiple=16,  # the Qwen-Image VAE's 8x, then 2x2 packing
    variant_pixel_multiple={},
    latent_channels=16,
    presets={"attention": ATTENTION, "attention_mlp": ATTENTION + MLP, "all_linear": ALL_LINEAR},
    # The authors' suggestion for long runs (attention only, higher rank; families-2026 section 1) and every other
    # family's default; all_linear is musubi-tuner's set.
    default_preset="attention",
    flow={None: _FLOW},
    # The pipeline's guidance_scale in Krea's form (v = cond + g (cond - uncond), on when g > 0: CFG 1 + g): 4.5 for
    # Raw over 28 steps; Turbo samples with 0 over 8 (adapter).
    sample_guidance=4.5, train_guidance={},
    max_sequence_length={None: 512},  # the pipeline's default: every caption is padded to it
    single_file_config_repo={None: RAW_REPO}, gated_repos=(),
    blocks=("transformer_blocks",),
    # 12 taps of Qwen3-VL-4B (2560 wide) per token, max_sequence_length tokens (the pipeline pads to it); the bool
    # mask beside it is 1/30720 of the entry.
    text_entry=TextEntry(tokens=0, sequence=True, width=12 * 2560, pooled=0),
    # 28 single-stream blocks of 48 x 128 over image + text tokens. GQA (12 kv heads) keeps smaller k / v than the
    # FLUX.1 block the figures were measured on; the text fusion (4 blocks of 2560 over 512 x 12 layer tokens, not
    # checkpointed by diffusers) adds about as much back (~4 % of the blocks' at 1024 px): block_scale 1.
    activations=Activations(kind="transformer", width_keys={"num_attention_heads": 48, "attention_head_dim": 128},
                            depth_keys={"num_layers": 28},
                            conditioning_inputs=("time_embed.linear_1", "time_embed.linear_2", "time_mod_proj"),
                            checkpoint_units=("transformer_blocks",)),
    # musubi-tuner's Krea 2 names (utils/sai_model_spec.py ARCH_KREA2 "Krea-2", IMPL_KREA2; its architecture
    # ARCHITECTURE_KREA2 "krea2").
    tool_names={None: ToolNames("krea2", "Krea-2", _IMPL)},
    tool_file_dora=True,
    kohya_v2=False, kohya_sgm_unet=False, extra_metadata={}, temporal_compression=0, experts={},
    hub_tags=("krea2", "krea-2", "krea2-diffusers"))
