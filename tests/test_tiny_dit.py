"""Tests for the tiny FLUX.1-dev/-schnell and SD3 pipelines (families/flux1/tiny.py, families/sd3/tiny.py) and
lora_trainer.testing.t5's offline T5 tokenizer."""

import os

# Before diffusers/huggingface_hub are imported: they read this once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_trainer.families.flux1 import tiny as flux1_tiny
from lora_trainer.families.sd3 import tiny as sd3_tiny
from lora_trainer.testing import parts, t5, tiny

FAMILIES = ["flux1-dev", "flux1-schnell", "sd3"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
CAPTION = "ohwx, a red circle, blue background"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_dit")
    return {fam: tiny.make_tiny_pipeline(root / fam, fam) for fam in FAMILIES}


@pytest.fixture(scope="module")
def loaded(pipelines):
    from diffusers import DiffusionPipeline

    out = {}
    for fam, path in pipelines.items():
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        out[fam] = pipe
    return out


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_family_lists_agree():
    assert (*flux1_tiny.VARIANTS, *sd3_tiny.VARIANTS) == tuple(FAMILIES) == tiny.DIT_FAMILIES[:len(FAMILIES)]
    assert set(FAMILIES) <= set(tiny.FAMILIES)
    with pytest.raises(ValueError):
        tiny.make_tiny_pipeline("unused", "flux2")


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_layout(pipelines, family):
    path = pipelines[family]
    index = json.loads((path / "model_index.json").read_text())
    flux = family != "sd3"
    assert index["_class_name"] == ("FluxPipeline" if flux else "StableDiffusion3Pipeline")
    encoders = ["text_encoder", "text_encoder_2"] + ([] if flux else ["text_encoder_3"])
    tokenizers = [e.replace("text_encoder", "tokenizer") for e in encoders]
    for sub in ["transformer", "vae", "scheduler", *encoders, *tokenizers]:
        assert index[sub][0] is not None and (path / sub).is_dir(), sub
    assert index["transformer"][1] == ("FluxTransformer2DModel" if flux else "SD3Transformer2DModel")
    assert index[encoders[-1]][1] == "T5EncoderModel"
    assert index[tokenizers[-1]][1] in ("T5Tokenizer", "T5TokenizerFast")

    files = [p for p in path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert {p.parent.name for p in files if p.suffix == ".safetensors"} == {"transformer", "vae", *encoders}
    # CLIP tokenizers carry vocab.json/merges.txt like the real repos; T5's is tokenizer.json only (no spiece.model).
    for sub in tokenizers[:-1]:
        assert (path / sub / "vocab.json").is_file() and (path / sub / "merges.txt").is_file()
    assert (path / tokenizers[-1] / "tokenizer.json").is_file()


@pytest.mark.parametrize("family", ["flux1-dev", "sd3"])
def test_components_load_individually(pipelines, family):
    import diffusers
    import transformers

    path = pipelines[family]
    index = json.loads((path / "model_index.json").read_text())
    for sub, (lib, cls_name) in ((k, v) for k, v in index.items() if isinstance(v, list) and v[0]):
        cls = getattr(diffusers if lib == "diffusers" else transformers, cls_name)
        if sub.startswith("tokenizer") or sub == "scheduler":
            kwargs = {"subfolder": sub, "local_files_only": True}
        else:
            kwargs = {"subfolder": sub, "local_files_only": True, "use_safetensors": True}
        assert type(cls.from_pretrained(path, **kwargs)).__name__ == cls_name


@pytest.mark.parametrize("family", FAMILIES)
def test_vae_16_channels_8x(loaded, family):
    pipe = loaded[family]
    cfg = pipe.vae.config
    assert cfg.latent_channels == parts.LATENT_CHANNELS == 16
    assert not cfg.use_quant_conv and not cfg.use_post_quant_conv
    scale, shift = ((sd3_tiny.SD3_VAE_SCALING, sd3_tiny.SD3_VAE_SHIFT) if family == "sd3"
                    else (flux1_tiny.FLUX_VAE_SCALING, flux1_tiny.FLUX_VAE_SHIFT))
    assert (cfg.scaling_factor, cfg.shift_factor) == (scale, shift)
    assert pipe.vae_scale_factor == parts.VAE_SCALE_FACTOR == 8
    with torch.no_grad():
        latent = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latent.shape == (1, 16, 8, 8)


@pytest.mark.parametrize("family", ["flux1-dev", "flux1-schnell"])
def test_flux_configs(loaded, family):
    pipe = loaded[family]
    dev = family == "flux1-dev"
    t = pipe.transformer.config
    assert type(pipe).__name__ == "FluxPipeline"
    assert t.guidance_embeds is dev
    assert (hasattr(pipe.transformer.time_text_embed, "guidance_embedder")) is dev
    assert t.patch_size == 1 and t.in_channels == 64 == flux1_tiny.FLUX_IN_CHANNELS
    assert (t.num_layers, t.num_single_layers) == (2, 2)
    assert sum(t.axes_dims_rope) == t.attention_head_dim
    assert t.joint_attention_dim == pipe.text_encoder_2.config.d_model == t5.T5_D_MODEL
    assert t.pooled_projection_dim == pipe.text_encoder.config.hidden_size == flux1_tiny.FLUX_CLIP_HIDDEN
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == tiny.VOCAB_SIZE
    assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2) == t5.T5_VOCAB_SIZE
    # Module names LoRA targets / ComfyUI mapping rely on.
    keys = set(pipe.transformer.state_dict())
    for k in ("transformer_blocks.1.attn.add_q_proj.weight", "transformer_blocks.1.attn.to_add_out.weight",
              "transformer_blocks.1.ff_context.net.2.weight", "single_transformer_blocks.1.proj_mlp.weight",
              "single_transformer_blocks.1.norm.linear.weight", "single_transformer_blocks.1.attn.to_v.weight",
              "norm_out.linear.weight"):
        assert k in keys, k

    s = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    expected = flux1_tiny.FLUX_DEV_SCHEDULER if dev else flux1_tiny.FLUX_SCHNELL_SCHEDULER
    assert {k: s[k] for k in expected} == expected
    assert s.use_dynamic_shifting is dev and s.shift == (3.0 if dev else 1.0)


def test_sd3_configs(loaded):
    pipe = loaded["sd3"]
    t = pipe.transformer.config
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert (t.in_channels, t.out_channels, t.patch_size, t.num_layers) == (16, 16, 2, 2)
    assert tuple(t.dual_attention_layers) == (0,) and t.qk_norm == "rms_norm"
    blocks = pipe.transformer.transformer_blocks
    assert blocks[0].attn2 is not None and blocks[1].attn2 is None
    assert blocks[1].context_pre_only and not blocks[0].context_pre_only
    assert t.pos_embed_max_size * t.patch_size >= t.sample_size
    te, te2 = pipe.text_encoder, pipe.text_encoder_2
    assert type(te).__name__ == type(te2).__name__ == "CLIPTextModelWithProjection"
    assert te.config.hidden_size < te2.config.hidden_size
    assert te.config.projection_dim != te.config.hidden_size and te2.config.projection_dim != te2.config.hidden_size
    assert t.pooled_projection_dim == te.config.projection_dim + te2.config.projection_dim
    assert te.config.hidden_size + te2.config.hidden_size < t.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert t.caption_projection_dim == t.num_attention_heads * t.attention_head_dim
    assert pipe.tokenizer.pad_token == tiny.EOS and pipe.tokenizer_2.pad_token == "!"
    assert pipe.text_encoder_3.config.vocab_size == len(pipe.tokenizer_3) == t5.T5_VOCAB_SIZE
    s = pipe.scheduler.config
    assert s.shift == 3.0 and not s.use_dynamic_shifting
    keys = set(pipe.transformer.state_dict())
    assert "transformer_blocks.0.attn2.to_q.weight" in keys and "transformer_blocks.1.attn2.to_q.weight" not in keys
    assert "transformer_blocks.0.attn.to_add_out.weight" in keys
    assert "transformer_blocks.1.ff_context.net.2.weight" not in keys  # last block is context_pre_only


def test_t5_tokenizer_roundtrip_without_sentencepiece(pipelines, monkeypatch):
    from transformers import AutoTokenizer, T5TokenizerFast

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # any `import sentencepiece` now fails
    folder = pipelines["flux1-dev"] / "tokenizer_2"
    for tok in (T5TokenizerFast.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)):
        assert len(tok) == t5.T5_VOCAB_SIZE
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        ids = tok(CAPTION).input_ids
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
        assert tok.unk_token_id not in ids
        # Caption words are whole pieces: "ohwx" is one token, not four characters.
        assert tok.convert_ids_to_tokens(ids)[:2] == ["▁ohwx", ","]
        assert tok.decode(ids, skip_special_tokens=True) == CAPTION
        for length in (32, 64, 256, 512):
            enc = tok(CAPTION, padding="max_length", max_length=length, truncation=True)
            assert len(enc.input_ids) == length and enc.input_ids[:len(ids)] == ids
            assert set(enc.input_ids[len(ids):]) == {tok.pad_token_id}
            assert sum(enc.attention_mask) == len(ids)
        long = tok(" ".join(["red"] * 100), max_length=32, truncation=True).input_ids
        assert len(long) == 32 and long[-1] == tok.eos_token_id
        odd = tok("Naïve Café 🐱 日本語 XYZ-42").input_ids
        assert all(0 <= i < t5.T5_VOCAB_SIZE for i in odd) and tok.unk_token_id in odd
    assert tok.model_max_length == t5.T5_MAX_LENGTH
    assert [p for p, _ in t5.t5_vocab()][:3] == ["<pad>", "</s>", "<unk>"]


@pytest.mark.parametrize("length", [32, 77, 256, 512])
def test_encode_prompt_shapes(loaded, length):
    flux = loaded["flux1-dev"]
    emb, pooled, text_ids = flux.encode_prompt(CAPTION, prompt_2=None, max_sequence_length=length)
    assert emb.shape == (1, length, t5.T5_D_MODEL) and pooled.shape == (1, flux1_tiny.FLUX_CLIP_HIDDEN)
    assert text_ids.shape == (length, 3)

    sd3 = loaded["sd3"]
    emb, neg, pooled, neg_pooled = sd3.encode_prompt(CAPTION, None, None, max_sequence_length=length)
    clip_width = sd3_tiny.SD3_CLIP_L_HIDDEN + sd3_tiny.SD3_CLIP_G_HIDDEN
    assert emb.shape == (1, tiny.MAX_LENGTH + length, t5.T5_D_MODEL)
    assert pooled.shape == neg_pooled.shape == (1, sd3_tiny.SD3_POOLED_DIM) and neg.shape == emb.shape
    # CLIP-L + bigG states are zero-padded up to the T5 width; the T5 part is not.
    assert torch.count_nonzero(emb[:, :tiny.MAX_LENGTH, clip_width:]) == 0
    assert torch.count_nonzero(emb[:, :tiny.MAX_LENGTH, :clip_width]) > 0
    assert torch.count_nonzero(emb[:, tiny.MAX_LENGTH:, clip_width:]) > 0


def test_deterministic_and_keeps_global_rng(tmp_path):
    state = torch.get_rng_state()
    a = _files(tiny.make_tiny_pipeline(tmp_path / "a", "flux1-dev", seed=3))
    assert torch.equal(state, torch.get_rng_state())
    b = _files(tiny.make_tiny_pipeline(tmp_path / "b", "flux1-dev", seed=3))
    assert a == b  # every file, weights and configs, byte for byte
    c = _files(tiny.make_tiny_pipeline(tmp_path / "c", "flux1-dev", seed=4))
    weights = [k for k in a if k.endswith(".safetensors")]
    assert len(weights) == 4 and all(a[k] != c[k] for k in weights)


def test_sd3_deterministic(tmp_path, pipelines):
    # The module fixture used seed 0; a fresh build with seed 0 must match it exactly.
    fresh = _files(tiny.make_tiny_pipeline(tmp_path / "sd3", "sd3", seed=0))
    assert fresh == _files(pipelines["sd3"])


def test_tiny_module_delegates(tmp_path):
    from safetensors.torch import load_file

    path = tiny.make_tiny_pipeline(tmp_path / "via_tiny", "flux1-schnell", seed=1)
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert tiny.main(["pipeline", "--family", "flux1-schnell", "--seed", "1", "--out", str(tmp_path / "cli")]) == 0
    name = "transformer/diffusion_pytorch_model.safetensors"
    wa, wb = load_file(path / name), load_file(tmp_path / "cli" / name)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(SystemExit):
        tiny.main(["pipeline", "--family", "sd3", "--out", str(tmp_path / "x"), "--single-file", "x.safetensors"])


def _generate(pipe, guidance, **kwargs):
    out = pipe(CAPTION, num_inference_steps=2, height=64, width=64, guidance_scale=guidance, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    return out.images


@pytest.mark.parametrize("family", FAMILIES)
def test_generates_64px(loaded, family):
    pipe = loaded[family]
    if family == "sd3":
        with_cfg, without = _generate(pipe, 7.0, max_sequence_length=64), _generate(pipe, 1.0, max_sequence_length=64)
        assert not np.array_equal(with_cfg, without)  # CFG (a negative pass) is active at 7.0
    else:
        a, b = _generate(pipe, 3.5, max_sequence_length=64), _generate(pipe, 1.0, max_sequence_length=64)
        # dev feeds guidance to the guidance embedder; schnell has none and must ignore it.
        assert np.array_equal(a, b) is (family == "flux1-schnell")
    assert float(np.std(with_cfg if family == "sd3" else a)) > 0
