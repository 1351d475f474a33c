"""Tests for lora_trainer.testing.tiny: offline tiny pipelines, tokenizer, datasets, single-file export."""

import os

# Before diffusers/huggingface_hub are imported: they read this once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.testing import tiny

FAMILIES = ["sd15", "sd2", "sd2-v", "sdxl"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fam: tiny.make_tiny_pipeline(root / fam, fam) for fam in FAMILIES}


def _pipeline_cls(family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _load(family, path):
    pipe = _pipeline_cls(family).from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_saves_loads_and_generates(pipelines, family):
    path = pipelines[family]
    subs = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if family == "sdxl":
        subs |= {"text_encoder_2", "tokenizer_2"}
    assert subs <= {p.name for p in path.iterdir() if p.is_dir()}
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")

    files = [p for p in path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    weights = {p.parent.name for p in files if p.suffix == ".safetensors"}
    assert weights == {"unet", "vae", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())

    pipe = _load(family, path)
    expected = "v_prediction" if family == "sd2-v" else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    unet = pipe.unet.config
    if family == "sdxl":
        hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert unet.cross_attention_dim == hidden
        assert unet.addition_embed_type == "text_time"
        assert unet.projection_class_embeddings_input_dim == (
            pipe.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim)
    else:
        assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size
        assert len(unet.down_block_types) == 4 and unet.use_linear_projection == (family != "sd15")
    for enc in ("text_encoder", "text_encoder_2"):
        if hasattr(pipe, enc):
            assert getattr(pipe, enc).config.vocab_size == len(pipe.tokenizer) == tiny.VOCAB_SIZE

    out = pipe("ohwx, a red circle, blue background", num_inference_steps=2, height=64, width=64,
               output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_vae_downsamples_8x(pipelines):
    pipe = _load("sd15", pipelines["sd15"])
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 96)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 12)


def test_pipeline_is_deterministic_and_keeps_global_rng(tmp_path):
    from safetensors.torch import load_file

    state = torch.get_rng_state()
    a = tiny.make_tiny_pipeline(tmp_path / "a", "sd15", seed=3)
    assert torch.equal(state, torch.get_rng_state())
    b = tiny.make_tiny_pipeline(tmp_path / "b", "sd15", seed=3)
    wa, wb = (load_file(p / "unet" / "diffusion_pytorch_model.safetensors") for p in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError):
        tiny.make_tiny_pipeline(tmp_path / "c", "flux2")


def test_tiny_names_come_from_the_family_folders():
    from lora_trainer import families

    names = []
    for family in families.FAMILIES:
        module = families.get_part(family, "tiny")
        assert module is not None, family
        assert module.DEFAULT in module.VARIANTS, family
        assert all(tiny.family_of(name) == family for name in module.VARIANTS)
        names += module.VARIANTS
    assert tuple(names) == tiny.FAMILIES
    assert set(tiny.DIT_FAMILIES) < set(tiny.FAMILIES)


@pytest.mark.parametrize("sub", ["tokenizer", "tokenizer_2"])
def test_tokenizer_roundtrip_unicode(pipelines, sub, tmp_path):
    from transformers import CLIPTokenizer

    folder = pipelines["sdxl"] / sub
    tok = CLIPTokenizer.from_pretrained(folder)
    caption = "ohwx, a Red circle — naïve Café 🐱 日本語 Ω\tsks"
    ids = tok(caption, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert tok.model_max_length == 77 and len(ids) == 77
    assert tok.pad_token == ("!" if sub == "tokenizer_2" else "<|endoftext|>")
    body = tok(caption).input_ids
    assert body[0] == tok.bos_token_id and body[-1] == tok.eos_token_id
    # unk is <|endoftext|>: it must not appear inside the caption's tokens
    assert tok.unk_token_id not in body[1:-1] and tok.bos_token_id not in body[1:]
    assert ids[len(body):] == [tok.pad_token_id] * (77 - len(body))
    squash = lambda text: "".join(text.lower().split())  # noqa: E731 - decode re-spaces words
    assert squash(tok.decode(body, skip_special_tokens=True)) == squash(caption)
    assert "ohwx</w>" in tok.convert_ids_to_tokens(body)

    # The vocab.json + merges.txt pair alone (no tokenizer.json) gives the same ids.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(folder / name, legacy / name)
    assert len(json.loads((legacy / "vocab.json").read_text(encoding="utf-8"))) == tiny.VOCAB_SIZE
    assert CLIPTokenizer.from_pretrained(legacy)(caption).input_ids == body


def test_dataset_deterministic(tmp_path):
    sizes = [(64, 64), (96, 64), (64, 128)]
    a = tiny.make_dataset(tmp_path / "a", n=6, sizes=sizes, seed=5)
    b = tiny.make_dataset(tmp_path / "b", n=6, sizes=sizes, seed=5)
    c = tiny.make_dataset(tmp_path / "c", n=6, sizes=sizes, seed=6)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert len([f for f in files if f.endswith(".txt")]) == 6
    assert {Path(f).suffix for f in files} == {".png", ".jpg", ".txt"}
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    images = sorted(p for p in a.iterdir() if p.suffix != ".txt")
    assert [Image.open(p).size for p in images] == [sizes[i % 3] for i in range(6)]
    caption = (a / "img_0000.txt").read_text(encoding="utf-8")
    assert caption.startswith("ohwx, ") and caption.endswith("background")

    d = tiny.make_dataset(tmp_path / "d", n=3, caption_ext=".caption", trigger=None, with_captions=True)
    assert not (d / "img_0000.caption").read_text(encoding="utf-8").startswith("ohwx")
    e = tiny.make_dataset(tmp_path / "e", n=3, with_captions=False)
    assert sorted(p.suffix for p in e.iterdir()) == [".png"] * 3


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_single_file_roundtrip(pipelines, family, tmp_path):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file

    src = pipelines[family]
    ckpt = tiny.make_single_file_checkpoint(src, tmp_path / f"{family}.safetensors")
    keys = load_file(ckpt)
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    if family == "sdxl":
        assert infer_diffusers_model_type(keys) == "xl_base"
    # Configs come from a different-seed folder, so equal weights can only come from the file.
    other = tiny.make_tiny_pipeline(tmp_path / "other", family, seed=1)
    loaded = _pipeline_cls(family).from_single_file(str(ckpt), config=str(other), local_files_only=True)
    ref = _load(family, src)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not hasattr(ref, name):
            continue
        want, got = getattr(ref, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name


def test_cli_writes_nothing_to_stdout(tmp_path, capsys):
    assert tiny.main(["dataset", "--out", str(tmp_path / "ds"), "-n", "2", "--sizes", "64x48"]) == 0
    assert tiny.main(["pipeline", "--family", "sd15", "--out", str(tmp_path / "p")]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "written" in captured.err
    assert Image.open(tmp_path / "ds" / "img_0001.png").size == (64, 48)
    assert (tmp_path / "p" / "model_index.json").is_file()
