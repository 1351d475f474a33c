"""Tiny, randomly initialised FLUX.1 (dev / schnell) and SD3 pipelines, built offline.

The flow-matching DiT counterparts of lora_trainer/testing/tiny.py: the real models'
classes, block layout and module names (what LoRA target matching and
ComfyUI key mapping depend on) with tiny widths, saved as safetensors-only
diffusers folders that `DiffusionPipeline.from_pretrained` loads with no hub
access and that generate a 64x64 image in about a second on CPU.

    python -m lora_trainer.testing.tiny pipeline --family flux1-dev --out DIR

The T5 tokenizer is self-made (a Unigram model over a small fixed vocabulary,
no sentencepiece needed); the CLIP tokenizers are tiny.py's byte-level one.
"""

from __future__ import annotations

from pathlib import Path

from . import tiny

FAMILIES = ("flux1-dev", "flux1-schnell", "sd3")

# --------------------------------------------------------------------------- tiny widths
# Real values in the comments (FLUX.1 / SD3.5-medium, see reference/dit-families.md).

# VAE: 16 latent channels like both real VAEs; four blocks -> three downsamples = 8x.
LATENT_CHANNELS = 16
VAE_BLOCK_OUT_CHANNELS = (16, 32, 64, 64)  # real (128, 256, 512, 512)
VAE_NORM_GROUPS = 16  # real 32
VAE_SCALE_FACTOR = 8  # 64 px image -> 8x8 latent
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609

# T5 (real: t5-v1_1-xxl, d_model 4096, d_ff 10240, 64 heads x 64, 24 layers, gated-gelu, vocab 32128).
T5_VOCAB_SIZE = 512  # tokenizer size == embedding rows (real: 32100 tokens, 32128 rows)
T5_D_MODEL = 64  # = joint_attention_dim of both transformers
T5_D_FF = 128
T5_NUM_HEADS, T5_D_KV = 4, 16
T5_LAYERS = 2
T5_MAX_LENGTH = 512  # tokenizer model_max_length, as the real one (FluxPipeline rejects > 512)
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as in real T5

# FLUX.1 transformer (real: 19 double + 38 single blocks, 24 heads x 128, axes (16, 56, 56)).
FLUX_CLIP_HIDDEN = 32  # CLIP-L width (real 768) = pooled_projection_dim
FLUX_NUM_LAYERS, FLUX_NUM_SINGLE_LAYERS = 2, 2
FLUX_NUM_HEADS, FLUX_HEAD_DIM = 4, 16  # inner dim 64 = the packed latent width, as real FLUX (3072 > 64): no bottleneck
FLUX_AXES_DIMS_ROPE = (4, 6, 6)  # sums to FLUX_HEAD_DIM
FLUX_IN_CHANNELS = LATENT_CHANNELS * 4  # 2x2 packing -> 64, as the real model

# SD3 transformer, 3.5-medium-like (real: 24 layers, 24 heads x 64, caption 1536, pos_embed_max_size 384,
# dual attention in blocks 0-12, CLIP-L 768 + bigG 1280 -> pooled 2048, zero-padded to 4096).
SD3_CLIP_L_HIDDEN, SD3_CLIP_G_HIDDEN = 16, 32  # sum 48 < T5_D_MODEL: the pipeline's zero-padding is exercised
SD3_CLIP_L_PROJ, SD3_CLIP_G_PROJ = 24, 48  # != hidden sizes on purpose
SD3_POOLED_DIM = SD3_CLIP_L_PROJ + SD3_CLIP_G_PROJ  # 72
SD3_NUM_LAYERS = 2  # block 0 dual attention (attn2), block 1 (last) context_pre_only
SD3_NUM_HEADS, SD3_HEAD_DIM = 2, 16
SD3_CAPTION_PROJECTION_DIM = SD3_NUM_HEADS * SD3_HEAD_DIM  # must equal the inner dim (32)
SD3_PATCH_SIZE = 2
SD3_SAMPLE_SIZE = 8  # latent size -> 64 px default images
SD3_POS_EMBED_MAX_SIZE = 32  # in patches: images up to 32 * 2 * 8 = 512 px per side
SD3_DUAL_ATTENTION_LAYERS = (0,)

_FLOW_TIMESTEPS = 1000
# FLUX.1-dev's scheduler config; schnell is static shift 1.0, SD3 static shift 3.0.
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=_FLOW_TIMESTEPS, shift=3.0, use_dynamic_shifting=True,
                          base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=_FLOW_TIMESTEPS, shift=1.0, use_dynamic_shifting=False)
SD3_SCHEDULER = dict(num_train_timesteps=_FLOW_TIMESTEPS, shift=3.0)

# --------------------------------------------------------------------------- T5 tokenizer

_ASCII = [chr(c) for c in range(ord("!"), ord("~") + 1)]  # printable, no space
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Unigram log-probabilities: whole words beat any split into pieces, so captions
# tokenize to realistic lengths; lone characters keep every ASCII text encodable.
_WORD_SCORE, _SPACE_WORD_SCORE, _BIGRAM_SCORE, _CHAR_SCORE, _SPACE_SCORE = -6.0, -4.0, -8.0, -10.0, -5.0


def t5_vocab(vocab_size: int = T5_VOCAB_SIZE) -> list[tuple[str, float]]:
    """The tiny T5 vocabulary as (piece, score) pairs, sentencepiece-style ("▁" marks a word start).

    Layout like real T5: <pad>=0, </s>=1, <unk>=2, then pieces. Words from
    tiny._WORDS (with and without "▁"), every printable ASCII character (with
    and without "▁"), then letter bigrams up to exactly `vocab_size`. Characters
    outside ASCII map to <unk>, as characters unseen by real T5's sentencepiece do.
    """
    pieces: dict[str, float] = {T5_PAD: 0.0, T5_EOS: 0.0, T5_UNK: 0.0, "▁": _SPACE_SCORE}

    def add(piece: str, score: float) -> None:
        if piece not in pieces and len(pieces) < vocab_size:
            pieces[piece] = score

    for w in tiny._WORDS:
        add("▁" + w, _SPACE_WORD_SCORE)
    for w in tiny._WORDS:
        add(w, _WORD_SCORE)
    for c in _ASCII:
        add(c, _CHAR_SCORE)
    for c in _ASCII:
        add("▁" + c, _CHAR_SCORE + 1.0)
    for a in _LETTERS:
        for b in _LETTERS:
            add(a + b, _BIGRAM_SCORE)
    if len(pieces) != vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is not reachable with the built-in pieces")
    return list(pieces.items())


def make_tiny_t5_tokenizer(vocab_size: int = T5_VOCAB_SIZE):
    """A T5 tokenizer (Unigram + Metaspace, eos appended) over `t5_vocab`; no sentencepiece, no hub.

    transformers 5's T5Tokenizer (T5TokenizerFast is the same class) rebuilds its
    normalizer/pre-tokenizer/decoder from the vocab on every load, so building it
    from `vocab=` makes the saved folder reload to exactly this tokenizer.
    """
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=t5_vocab(vocab_size), eos_token=T5_EOS, unk_token=T5_UNK, pad_token=T5_PAD,
                           extra_ids=0, model_max_length=T5_MAX_LENGTH)


# --------------------------------------------------------------------------- components


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=T5_VOCAB_SIZE, d_model=T5_D_MODEL, d_ff=T5_D_FF, d_kv=T5_D_KV, num_heads=T5_NUM_HEADS,
        num_layers=T5_LAYERS, feed_forward_proj="gated-gelu",  # T5 v1.1: wi_0/wi_1/wo
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def _vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    n = len(VAE_BLOCK_OUT_CHANNELS)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=VAE_BLOCK_OUT_CHANNELS, layers_per_block=2, latent_channels=LATENT_CHANNELS,
        norm_num_groups=VAE_NORM_GROUPS, sample_size=64, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
    )


def _build_flux(dev: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=FLUX_IN_CHANNELS, num_layers=FLUX_NUM_LAYERS,
        num_single_layers=FLUX_NUM_SINGLE_LAYERS, attention_head_dim=FLUX_HEAD_DIM,
        num_attention_heads=FLUX_NUM_HEADS, joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=FLUX_CLIP_HIDDEN, guidance_embeds=dev, axes_dims_rope=FLUX_AXES_DIMS_ROPE,
    )
    # FLUX uses CLIP-L's pooled output only (no projection) and T5's hidden states.
    text_encoder = CLIPTextModel(tiny._text_config(FLUX_CLIP_HIDDEN, "quick_gelu", tiny.VOCAB_SIZE - 1))
    scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if dev else FLUX_SCHNELL_SCHEDULER))
    return FluxPipeline(
        scheduler=scheduler, vae=_vae(FLUX_VAE_SCALING, FLUX_VAE_SHIFT), text_encoder=text_encoder,
        tokenizer=tiny.make_tiny_tokenizer(), text_encoder_2=_t5_encoder(), tokenizer_2=make_tiny_t5_tokenizer(),
        transformer=transformer,
    )


def _build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(
        sample_size=SD3_SAMPLE_SIZE, patch_size=SD3_PATCH_SIZE, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, num_layers=SD3_NUM_LAYERS, attention_head_dim=SD3_HEAD_DIM,
        num_attention_heads=SD3_NUM_HEADS, joint_attention_dim=T5_D_MODEL,
        caption_projection_dim=SD3_CAPTION_PROJECTION_DIM, pooled_projection_dim=SD3_POOLED_DIM,
        pos_embed_max_size=SD3_POS_EMBED_MAX_SIZE, qk_norm="rms_norm",
        dual_attention_layers=SD3_DUAL_ATTENTION_LAYERS,
    )
    # CLIP-L (quick_gelu, pads with EOS) and OpenCLIP bigG (gelu, pads with "!" = id 0), as SDXL.
    text_encoder = CLIPTextModelWithProjection(
        tiny._text_config(SD3_CLIP_L_HIDDEN, "quick_gelu", tiny.VOCAB_SIZE - 1, projection_dim=SD3_CLIP_L_PROJ))
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny._text_config(SD3_CLIP_G_HIDDEN, "gelu", 0, projection_dim=SD3_CLIP_G_PROJ))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=_vae(SD3_VAE_SCALING, SD3_VAE_SHIFT),
        text_encoder=text_encoder, tokenizer=tiny.make_tiny_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=tiny.make_tiny_tokenizer(pad_token="!"),
        text_encoder_3=_t5_encoder(), tokenizer_3=make_tiny_t5_tokenizer(),
    )


def build_tiny_pipeline(family: str, seed: int = 0):
    """The in-memory pipeline (fp32, CPU) that `make_tiny_pipeline` saves; the caller's RNG is left untouched."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    # Only the CPU generator is seeded, inside fork_rng (as tiny.make_tiny_pipeline).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return _build_sd3() if family == "sd3" else _build_flux(dev=family == "flux1-dev")


def make_tiny_pipeline(out_dir, family: str, seed: int = 0) -> Path:
    """Save a complete, randomly initialised FLUX.1-dev/-schnell or SD3 pipeline folder (safetensors only)."""
    out = Path(out_dir)
    build_tiny_pipeline(family, seed).save_pretrained(out, safe_serialization=True)
    # The CLIP tokenizers also get vocab.json + merges.txt, like tiny.py's; T5's folder is tokenizer.json only.
    for sub in ("tokenizer", "tokenizer_2") if family == "sd3" else ("tokenizer",):
        tiny._write_vocab_files(out / sub)
    return out

