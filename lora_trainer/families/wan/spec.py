"""Wan 2.1 text-to-video (1.3B, 14B), Wan 2.2 TI2V-5B (text-to-video use) and Wan 2.2 T2V-A14B (two 14B experts,
``experts``: experts.py) as plain data (torch-free).

TI2V-5B: a 48-channel VAE compressing 16x spatially, so its sides are multiples of 32, not Wan 2.1's 16 (480 x 832
are): variant_pixel_multiple says so, and the resolution check and the memory plan (a token is 32 px) read it."""
from __future__ import annotations

from ..spec import Activations, FamilySpec, FlowDefaults, TextEntry, ToolNames
from .experts import A14B, EXPERTS

_IMPL = "https://github.com/Wan-Video/Wan2.1"
_IMPL22 = "https://github.com/Wan-Video/Wan2.2"
# WanTransformer3DModel blocks: attn1 = self-attention over the video tokens, attn2 = cross-attention to the UMT5
# states (to_q reads the video, to_k / to_v only the text), ffn = GELU MLP (net.0.proj, net.2). SimpleTuner's
# default targets are to_q/to_k/to_v/to_out.0 of both; ai-toolkit and musubi-tuner every Linear of the blocks.
ATTENTION = tuple(f"{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0"))
MLP = ("ffn.net.0.proj", "ffn.net.2")
# Static shift 3.0 over sigmoid(N(0, 1)) sigmas: musubi-tuner's documented Wan recipe (--timestep_sampling shift
# --discrete_flow_shift 3.0), ai-toolkit's FlowMatch shift 3.0, and the pipeline's own 480p sampling flow_shift.
_FLOW = FlowDefaults(sigma_sampling="sigmoid", shift="static", shift_value=3.0)

SPEC = FamilySpec(
    name="wan", label="Wan", display_name="Wan 2.1 (text-to-video)", objective="flow", pipeline_class="WanPipeline",
    denoisers=("transformer",), text_encoders=("text_encoder",),
    component_classes={"vae": "AutoencoderKLWan", "transformer": "WanTransformer3DModel",
                       "text_encoder": "UMT5EncoderModel", "tokenizer": "T5Tokenizer"},
    components=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    # umt5-xxl (5.7 B) stays frozen: no peer trains it, and WanPipeline's LoRA loader takes transformer keys only.
    lora_text_encoders=(), text_encoder_reads={},
    # 480p is the 1.3B model's size (832 x 480); 14B also does 720p. Frames are planned separately (data/video.py).
    default_resolution=480, prediction_resolution={}, bucketing_default=True,
    pixel_multiple=16,  # VAE 8x, patch (1, 2, 2)
    variant_pixel_multiple={"ti2v-5b": 32},  # its VAE 16x, patch (1, 2, 2)
    latent_channels=16,
    presets={"attention": ATTENTION, "attention_mlp": ATTENTION + MLP, "all_linear": ("blocks.*",)},
    default_preset="attention",
    flow={None: _FLOW},
    # WanPipeline's __call__ default guidance_scale (CFG against the negative prompt).
    sample_guidance=5.0, train_guidance={},
    # WanPipeline.__call__'s default (encode_prompt's own default is 226: the adapter always passes it).
    max_sequence_length={None: 512},
    single_file_config_repo={None: "Wan-AI/Wan2.1-T2V-14B-Diffusers", "t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                             "t2v-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
                             "ti2v-5b": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                             A14B: "Wan-AI/Wan2.2-T2V-A14B-Diffusers"},
    gated_repos=(),
    blocks=("blocks",),
    # umt5-xxl's last hidden state, 4096 wide, max_sequence_length rows zero-padded past the caption (no mask).
    text_entry=TextEntry(tokens=0, sequence=True, width=4096, pooled=0),
    # 14B: 40 blocks of 40 x 128 (1.3B: 30 of 12 x 128). Cross-attention keys / values read only the text states.
    activations=Activations(kind="transformer", conditioning_inputs=("attn2.to_k", "attn2.to_v"),
                            checkpoint_units=("blocks",),
                            width_keys={"num_attention_heads": 40, "attention_head_dim": 128},
                            depth_keys={"num_layers": 40},
                            # measured on its own block (fp32 modulation): memory_plan.py, tests/test_video_plan.py
                            block_factors={"attention": 20.5, "more": 21.5}, ffn_keys={"ffn_dim": 13824}),
    # Wan 2.1: musubi-tuner's names (utils/sai_model_spec.py ARCH_WAN "wan2.1", IMPL_WAN; ss_base_model_version its
    # ARCHITECTURE_WAN_FULL "wan"). musubi-tuner writes those for Wan 2.2 too (no 2.2 names); ai-toolkit's
    # get_base_model_version tells the 2.2 releases apart, "wan_2.2_5b" (TI2V-5B) and "wan_2.2_14b" (A14B, both
    # expert files): those, with the Wan2.2 repo as implementation. Which expert a file is for: each expert's file
    # says its timestep range (Wan.group_metadata, musubi-tuner's modelspec.timestep_range).
    tool_names={None: ToolNames("wan", "wan2.1", _IMPL, hub_tags=("wan2.1",)),
                "ti2v-5b": ToolNames("wan_2.2_5b", "wan2.2-ti2v-5b", _IMPL22, display_name="Wan 2.2 TI2V-5B "
                                     "(text-to-video)", hub_tags=("wan2.2",)),
                A14B: ToolNames("wan_2.2_14b", "wan2.2-t2v-a14b", _IMPL22, display_name="Wan 2.2 T2V-A14B "
                                "(text-to-video, two experts)", hub_tags=("wan2.2",))},
    tool_file_dora=True,
    kohya_v2=False, kohya_sgm_unet=False, extra_metadata={}, hub_tags=("wan", "text-to-video"),
    temporal_compression=4,
    experts={A14B: EXPERTS})
