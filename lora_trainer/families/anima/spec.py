"""Anima (CircleStone Labs' Cosmos-Predict2-2B derivative) as plain data (torch-free).

diffusers ships it only as a modular pipeline (``AnimaModularPipeline``): a folder with ``modular_model_index.json``
(or, for repos converted before the modular format, ``model_index.json``) and one subfolder per component. Besides
the usual components it holds ``text_conditioner`` (``AnimaTextConditioner``, the "LLM adapter": cross-attends from
learned embeddings of T5 token ids to Qwen3's hidden states) and ``t5_tokenizer`` (ids only, no T5 model): both are
part of text encoding here; the conditioner's output is what the text cache stores (families-2026.md §5).
"""
from __future__ import annotations

from ..spec import Activations, FamilySpec, FlowDefaults, TextEntry, ToolNames

# CosmosTransformer3DModel's blocks: attn1 (self), attn2 (cross, keys/values over the conditioner's output), ff
# (GELU MLP), norm1-3.linear_1/2 (the adaLN-LoRA modulation of each sub-block). ai-toolkit targets every Linear of
# the blocks (arch "anima"); SimpleTuner defaults to to_k/to_q/to_v/to_out.0.
ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
MLP = ("ff.net.0.proj", "ff.net.2")
REPO = "circlestone-labs/Anima-Base-v1.0-Diffusers"

SPEC = FamilySpec(
    name="anima", label="Anima", display_name="Anima (Cosmos-Predict2 2B)", objective="flow",
    pipeline_class="AnimaModularPipeline", denoisers=("transformer",), text_encoders=("text_encoder",),
    component_classes={"vae": "AutoencoderKLQwenImage", "transformer": "CosmosTransformer3DModel",
                       "text_encoder": "Qwen3Model", "tokenizer": "Qwen2Tokenizer",
                       "text_conditioner": "AnimaTextConditioner", "t5_tokenizer": "T5TokenizerFast"},
    components=("transformer", "text_conditioner", "vae", "text_encoder", "tokenizer", "t5_tokenizer", "scheduler"),
    # Qwen3-0.6B stays frozen (no peer trains it). ai-toolkit's train_text_conditioner (LoRA on the LLM adapter) is
    # not supported: the conditioner's output is cached and the conditioner released.
    lora_text_encoders=(), text_encoder_reads={}, default_resolution=1024, prediction_resolution={},
    # VAE 8x, patch 2 -> 16 px (ai-toolkit buckets by 32).
    bucketing_default=True, pixel_multiple=16, latent_channels=16,
    variant_pixel_multiple={},
    presets={"attention": ATTENTION, "attention_mlp": ATTENTION + MLP,
             # ai-toolkit's default: every Linear of the blocks (attention, MLP, adaLN modulation).
             "all_linear": ("transformer_blocks.*",)},
    default_preset="attention",
    # ai-toolkit: uniform sigmas with a static shift 3.0, no loss weighting (flow_* keys override).
    flow={None: FlowDefaults(sigma_sampling="uniform", shift="static", shift_value=3.0)},
    sample_guidance=4.0,  # the modular pipeline's ClassifierFreeGuidance default
    train_guidance={}, max_sequence_length={None: 512},
    single_file_config_repo={None: REPO}, gated_repos=(),
    blocks=("transformer_blocks",),
    # The conditioner's output: max(T5 tokens, 512) x 1024 (text_embed_dim), zero-padded, with a one-byte mask.
    text_entry=TextEntry(tokens=0, sequence=True, width=1024, pooled=0),
    # Image tokens self-attend; attn2 cross-attends to the text (keys / values from the cached text: conditioning);
    # the timestep embedding feeds every block's adaLN-LoRA modulation.
    activations=Activations(kind="transformer",
                            conditioning_inputs=("attn2.to_k", "attn2.to_v", "norm1.linear_1", "norm2.linear_1",
                                                 "norm3.linear_1"),
                            checkpoint_units=("transformer_blocks",),
                            width_keys={"num_attention_heads": 16, "attention_head_dim": 128},
                            depth_keys={"num_layers": 28}),
    # sd-scripts' and musubi-tuner's model specs (read 2026-12) have no Anima architecture id; ai-toolkit writes
    # none: the family's own name, as Civitai files it, and the model's repo.
    tool_names={None: ToolNames("anima", "anima", "https://huggingface.co/circlestone-labs/Anima")},
    tool_file_dora=True,
    kohya_v2=False, kohya_sgm_unet=False, extra_metadata={}, temporal_compression=0, experts={},
    hub_tags=("anima", "cosmos", "modular-diffusers"))
