"""The tiny random Ideogram 4 pipeline, built offline for tests, the demo and benchmarks: Ideogram4Pipeline with the
real classes and module names at tiny widths (families-2026.md section 2, after diffusers' own LoRA test): two
Ideogram4Transformer2DModel (the conditional one trained, the unconditional one for samples), the tiny FLUX.2 VAE
(AutoencoderKLFlux2, 8x down, non-trivial BatchNorm statistics) and a Qwen3VLModel with 36 text layers 8 wide, so
the pipeline's fixed taps (QWEN3_VL_ACTIVATION_LAYERS, up to layer 35) read real intermediate layers.

The tokenizer is the tiny byte-level Qwen one with whole-word tokens for the chat template's role names, so a
caption's templated length stays near a real tokenizer's (the pipeline refuses prompts over max_sequence_length).
"""
from __future__ import annotations

from ...testing.parts import seeded
from ...testing.qwen import QWEN_VOCAB_SIZE, make_tiny_qwen_tokenizer
from .._flux2 import tiny as flux2_parts

VARIANTS = {"ideogram4": None}
DEFAULT = "ideogram4"

TEXT_HIDDEN, TEXT_LAYERS = 8, 36  # real Qwen3-VL-8B: 4096 wide, 36 layers
TAPS = 13  # len(QWEN3_VL_ACTIVATION_LAYERS): the features are 13 x the encoder's width (real 53,248)
HEADS, HEAD_DIM = 2, 8  # real 18 x 256
MROPE_SECTION = (2, 1, 1)  # sums to HEAD_DIM / 2 (real (24, 20, 20))
TEMPLATE_WORDS = ("user", "assistant", "ohwx")
# The pipeline passes its own logit-normal sigmas; a plain scheduler config (no shift) keeps them as they are.
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
# What a test calls the tiny pipeline with beside the prompt: Ideogram4Pipeline's default guidance_schedule has 48
# entries, so a run with another step count needs a constant guidance_scale instead (tests/test_family_contract.py).
CALL_KWARGS = {"guidance_scale": 3.0, "guidance_schedule": None}


def _text_encoder(tok):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return Qwen3VLModel(Qwen3VLConfig(
        text_config=dict(hidden_size=TEXT_HIDDEN, intermediate_size=16, num_hidden_layers=TEXT_LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=QWEN_VOCAB_SIZE,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [1, 1, 0]}),
        vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[]),
        **ids))


def transformer():
    from diffusers import Ideogram4Transformer2DModel

    return Ideogram4Transformer2DModel(
        in_channels=4 * flux2_parts.VAE_LATENT_CHANNELS, num_layers=2, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, intermediate_size=32, adaln_dim=16, llm_features_dim=TAPS * TEXT_HIDDEN,
        mrope_section=MROPE_SECTION)


def build(variant=None, seed: int = 0):
    """The in-memory pipeline (fp32, CPU); the caller's RNG is left untouched."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline

    if variant is not None:
        raise ValueError(f"unknown tiny Ideogram 4 variant {variant!r}; it has none")
    with seeded(seed):
        tok = make_tiny_qwen_tokenizer(extra_words=TEMPLATE_WORDS)
        return Ideogram4Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=flux2_parts.vae(),
            text_encoder=_text_encoder(tok), tokenizer=tok, transformer=transformer(),
            unconditional_transformer=transformer())
