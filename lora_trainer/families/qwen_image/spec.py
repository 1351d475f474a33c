"""Qwen-Image (and its 2512 release) as plain data (torch-free).

Qwen-Image-2512 ships the same pipeline, transformer, VAE, text encoder and scheduler config as Qwen-Image
(families-2026 section 3: no code path in diffusers, ai-toolkit, SimpleTuner or musubi-tuner tells them apart): it is
the variant "2512" by its name alone (signature.py ``named_variant``), with the same defaults and tool names, and its
own repo for a single file's configs."""
from __future__ import annotations

from ..spec import Activations, FamilySpec, FlowDefaults, TextEntry, ToolNames

# The double-stream blocks' attention: image stream (to_q/k/v, to_out.0) and text stream (add_*_proj, to_add_out).
# diffusers' and SimpleTuner's Qwen-Image scripts train to_k/to_q/to_v/to_out.0 only; ai-toolkit every Linear of the
# blocks (modulation img_mod.1 / txt_mod.1 included): the all_linear preset.
QWEN_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
QWEN_MLP = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
_IMPL = "https://github.com/QwenLM/Qwen-Image"

# Training sigmas: sigmoid(N(0, 1)) shifted by resolution with the constants of Qwen-Image's own scheduler config
# (base_shift 0.5 at 256 tokens, max_shift 0.9 at 8192: FlowMatchingObjective reads them from scheduler_config), so
# training spends its steps where the pipeline samples (mu 0.69, shift ~2.0 at 1024 px; musubi-tuner's qwen_shift,
# and close to its documented discrete_flow_shift 2.2). diffusers' train_dreambooth_lora_qwen_image.py draws
# uniform sigmas unshifted (its dynamic-shift scheduler table is unshifted): flow_sigma_sampling "uniform" +
# flow_shift "none" reproduce it.
_FLOW = FlowDefaults(sigma_sampling="sigmoid", shift="resolution")

SPEC = FamilySpec(
    name="qwen_image", label="Qwen-Image", display_name="Qwen-Image", objective="flow",
    pipeline_class="QwenImagePipeline", denoisers=("transformer",), text_encoders=("text_encoder",),
    component_classes={"vae": "AutoencoderKLQwenImage", "transformer": "QwenImageTransformer2DModel",
                       "text_encoder": "Qwen2_5_VLForConditionalGeneration", "tokenizer": "Qwen2Tokenizer"},
    components=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    # A 7 B VLM: its embeddings are cached and it is released; no text-encoder LoRA (no peer trains one either).
    lora_text_encoders=(), text_encoder_reads={},
    # The model card's 1:1 size is 1328 px; 1024 px is what the peers train at by default (and the memory figures
    # below are for it).
    default_resolution=1024, prediction_resolution={}, bucketing_default=True,
    pixel_multiple=16,  # VAE 8x, then 2x2 packing
    variant_pixel_multiple={},
    latent_channels=16,
    presets={"attention": QWEN_ATTENTION, "attention_mlp": QWEN_ATTENTION + QWEN_MLP,
             "all_linear": ("transformer_blocks.*",)},
    default_preset="attention",
    flow={None: _FLOW},
    # The pipeline's true_cfg_scale (real CFG with a negative prompt: the model has no guidance embedder).
    sample_guidance=4.0, train_guidance={},
    # The pipeline's __call__ default and diffusers' training script's (the encoder takes up to 1024).
    max_sequence_length={None: 512},
    single_file_config_repo={None: "Qwen/Qwen-Image", "2512": "Qwen/Qwen-Image-2512"}, gated_repos=(),
    blocks=("transformer_blocks",),
    # Qwen2.5-VL-7B's last hidden state, 3584 wide, one row per token after the 34 template tokens; no pooled
    # vector (the valid-token mask beside it is 1/3584 of the entry).
    text_entry=TextEntry(tokens=0, sequence=True, width=3584, pooled=0),
    # 60 blocks of 24 x 128; the modulation Linears (img_mod.1, txt_mod.1) read only the timestep embedding.
    activations=Activations(kind="transformer", width_keys={"num_attention_heads": 24, "attention_head_dim": 128},
                            depth_keys={"num_layers": 60}, conditioning_inputs=("img_mod.1", "txt_mod.1"),
                            checkpoint_units=("transformer_blocks",)),
    # musubi-tuner: utils/sai_model_spec.py ARCH_QWEN_IMAGE "Qwen-Image", IMPL_QWEN_IMAGE; its architecture name
    # ARCHITECTURE_QWEN_IMAGE_FULL "qwen_image" (dataset/image_video_dataset.py).
    tool_names={None: ToolNames("qwen_image", "Qwen-Image", _IMPL)},
    tool_file_dora=True,
    kohya_v2=False, kohya_sgm_unet=False, extra_metadata={}, temporal_compression=0, experts={},
    hub_tags=("qwen-image", "qwen-image-diffusers"))
