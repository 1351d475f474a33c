"""Ideogram 4 as plain data (torch-free). Facts: reference/families-2026.md section 2 (diffusers 0.42.1's
Ideogram4Pipeline, diffusers' train_dreambooth_lora_ideogram4.py, ai-toolkit, SimpleTuner, musubi-tuner)."""
from __future__ import annotations

from ..spec import Activations, FamilySpec, FlowDefaults, TextEntry, ToolNames

REPO = "ideogram-ai/ideogram-v4"
# Attention and the SwiGLU MLP of the 34 blocks. The text features enter through llm_cond_proj (outside the blocks)
# and the timestep through adaln_proj / each block's adaln_modulation.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
MLP = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")

# Training sigmas as diffusers' Ideogram 4 script draws them and the pipeline samples: logit-normal with std 1.5
# and the resolution-aware mean 0.5 * ln(H * W / 512^2) (the "area" shift of a logit-normal draw is exactly that
# mean). Sigma is the noise level here; the model's own time is 1 - sigma (adapter.py).
FLOW = FlowDefaults(sigma_sampling="logit_normal", shift="area", logit_std=1.5)

SPEC = FamilySpec(
    name="ideogram4", label="Ideogram 4", display_name="Ideogram 4", objective="flow",
    pipeline_class="Ideogram4Pipeline", denoisers=("transformer",), text_encoders=("text_encoder",),
    component_classes={"vae": "AutoencoderKLFlux2", "transformer": "Ideogram4Transformer2DModel",
                       "unconditional_transformer": "Ideogram4Transformer2DModel",
                       "text_encoder": "Qwen3VLModel", "tokenizer": "Qwen2Tokenizer"},
    # The unconditional transformer (a second 9.3 B model) serves only the samples' asymmetric guidance: a
    # sampling_only component (FamilySpec.sampling_only), frozen and on the host while training, out of the LoRA as
    # diffusers' script keeps it.
    components=("transformer", "unconditional_transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    # Qwen3-VL-8B is cached and released; no peer trains it.
    lora_text_encoders=(), text_encoder_reads={},
    # The pipeline samples at 2048 px by default; the peers train at 1024 (and the memory figures are for it).
    default_resolution=1024, prediction_resolution={}, bucketing_default=True,
    pixel_multiple=16,  # VAE 8x, then the pipeline's 2x2 patchify
    variant_pixel_multiple={},
    latent_channels=32,  # AutoencoderKLFlux2's; 128 per token once patchified
    # attention_mlp = diffusers' script default (to_q, to_k, to_v, to_out.0, w1, w2, w3) and musubi-tuner's (every
    # block Linear but adaln_modulation); all_linear adds adaln_modulation (ai-toolkit: every Linear under layers).
    presets={"attention": ATTENTION, "attention_mlp": ATTENTION + MLP, "all_linear": ("layers.*",)},
    default_preset="attention_mlp",
    flow={None: FLOW},
    # The pipeline's main guidance weight (its schedule: 7.0 for 45 steps, 3.0 for the last 3): asymmetric, against
    # the separate unconditional transformer (v = g v_cond + (1 - g) v_uncond).
    sample_guidance=7.0, train_guidance={},
    max_sequence_length={None: 2048},  # the pipeline's: prompts are left-padded to it, longer ones refused
    single_file_config_repo={None: REPO}, gated_repos=(REPO,),
    blocks=("layers",),
    # 13 Qwen3-VL-8B layers x 4096 = 53,248 features per token. The cache keeps only a caption's real tokens (not
    # the pipeline's 2048-token left padding: 436 MB per caption in fp32), in the encoder's dtype (lossless: the
    # pipeline computes them there and widens to fp32). Sized for a 512-token templated caption (Ideogram's
    # structured JSON captions run to several hundred tokens): 54.5 MB in bf16.
    text_entry=TextEntry(tokens=512, sequence=False, width=53248, pooled=0),
    activations=Activations(kind="transformer", width_keys={"num_attention_heads": 18, "attention_head_dim": 256},
                            depth_keys={"num_layers": 34},
                            conditioning_inputs=("t_embedding.mlp_in", "t_embedding.mlp_out", "adaln_proj",
                                                 "adaln_modulation", "llm_cond_proj"),
                            checkpoint_units=("layers",)),
    # musubi-tuner's sai_model_spec has no Ideogram 4 entry in the code we read: named in its pattern (inferred).
    tool_names={None: ToolNames("ideogram_4", "Ideogram-4", f"https://huggingface.co/{REPO}")},
    tool_file_dora=False, kohya_v2=False, kohya_sgm_unet=False,
    # SimpleTuner's licence name (the release's LICENSE.md): the LoRA's modelspec and its model card say it.
    extra_metadata={"modelspec.license": "ideogram-4-non-commercial"},
    temporal_compression=0, experts={},
    hub_tags=("ideogram4", "ideogram-4", "ideogram4-diffusers"))
