"""Single-file FLUX.1 / SD3 checkpoints: testing/single_file.py writes them (through the families' from_diffusers,
the inverse of diffusers' converters), runtime/single_file.py loads them (transformer from the file, everything
else from a diffusers config folder)."""

import os

# Before diffusers/huggingface_hub are imported: they read this once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_trainer.runtime import single_file as dsf
from lora_trainer.testing import tiny
from lora_trainer.preflight.probe import probe_single_file
from lora_trainer.testing.single_file import DIT_PREFIX, write_single_file
from lora_trainer.families.flux1.convert import from_diffusers as flux_to_bfl
from lora_trainer.families.flux1.convert import to_diffusers as flux_bfl_to_diffusers
from lora_trainer.families.sd3.convert import from_diffusers as sd3_to_sai

TINY = ["flux1-dev", "flux1-schnell", "sd3", "flux2-dev", "flux2-klein-4b", "zimage", "qwen-image", "qwen-image-2.1",
        "chroma", "anima", "krea2", "ideogram4", "wan21", "wan22-5b"]
FAMILY = {"flux1-dev": "flux1", "flux1-schnell": "flux1", "sd3": "sd3", "flux2-dev": "flux2",
          "flux2-klein-4b": "flux2_klein", "zimage": "zimage", "qwen-image": "qwen_image", "qwen-image-2.1": "qwen_image21",
          "chroma": "chroma", "anima": "anima", "krea2": "krea2", "ideogram4": "ideogram4", "wan21": "wan",
          "wan22-5b": "wan"}
CAPTION = "ohwx, a red circle, blue background"


def _distinct_weights(folder: Path, seed: int) -> None:
    """Fresh random values in every transformer and VAE tensor: at init the q/k norm and modulation weights are
    all ones or zeros, and swapping two equal tensors would go unseen by a round trip."""
    g = torch.Generator().manual_seed(seed)
    for comp in ("transformer", "vae"):
        f = folder / comp / "diffusion_pytorch_model.safetensors"
        save_file({k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in load_file(f).items()}, str(f))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_single")
    out = {name: tiny.make_tiny_pipeline(root / name, name) for name in TINY}
    for seed, folder in enumerate(out.values()):
        _distinct_weights(folder, seed)
    return out


def _config_only(src: Path, dst: Path, family: str) -> Path:
    """What a download with config_source_patterns leaves: everything but the transformer's weights."""
    pats = dsf.config_source_patterns(family)
    for f in src.rglob("*"):
        rel = f.relative_to(src).as_posix()
        if f.is_file() and any(fnmatch.fnmatchcase(rel, p) for p in pats):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst / rel)
    return dst


@pytest.fixture(scope="module")
def config_sources(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_config")
    return {name: _config_only(folders[name], root / name, FAMILY[name]) for name in TINY}


def _transformer_sd(folder: Path) -> dict:
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def _assert_same(sd: dict, ref: dict) -> None:
    assert sd.keys() == ref.keys(), set(sd) ^ set(ref)
    bad = [k for k in ref if sd[k].dtype != ref[k].dtype or not torch.equal(sd[k], ref[k])]
    assert not bad, bad[:5]


# ---------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("prefix", [True, False], ids=["prefixed", "bare"])
def test_round_trip_bitwise(folders, config_sources, tmp_path, name, prefix):
    """folder -> BFL/SAI single file -> loader: the folder's transformer, bit for bit; the config source has no
    transformer weights, so they can only come from the file."""
    f = write_single_file(folders[name], tmp_path / "model.safetensors", prefix=prefix)
    with safe_open(str(f), "pt") as fh:
        keys = list(fh.keys())
    assert all(k.startswith(DIT_PREFIX) for k in keys) == prefix and any(k.startswith(DIT_PREFIX) for k in keys) == prefix
    bare = {k.removeprefix(DIT_PREFIX) for k in keys}
    if FAMILY[name] == "flux1":
        assert {"img_in.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight"} <= bare
        assert ("guidance_in.in_layer.weight" in bare) == (name == "flux1-dev")
    elif FAMILY[name].startswith("flux2"):
        assert {"img_in.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.2.linear1.weight",
                "single_stream_modulation.lin.weight", "final_layer.adaLN_modulation.1.weight"} <= bare
        assert ("guidance_in.in_layer.weight" in bare) == (name == "flux2-dev") and "vector_in.in_layer.weight" not in bare
    elif FAMILY[name] == "zimage":  # ComfyUI's z_image_turbo_bf16.safetensors: Lumina 2's names, fused qkv
        assert {"cap_embedder.1.weight", "layers.0.attention.qkv.weight", "layers.0.attention.out.weight",
                "noise_refiner.0.adaLN_modulation.0.weight", "context_refiner.0.attention.qkv.weight"} <= bare
    elif FAMILY[name] == "qwen_image":  # ComfyUI's qwen_image_bf16.safetensors: diffusers' names
        assert {"img_in.weight", "txt_norm.weight", "txt_in.weight", "transformer_blocks.2.img_mod.1.weight",
                "transformer_blocks.0.attn.add_q_proj.weight", "norm_out.linear.weight"} <= bare
    elif FAMILY[name] == "chroma":  # Chroma1-HD.safetensors: BFL names, the approximator, no modulation Linears
        assert {"img_in.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                "distilled_guidance_layer.in_proj.weight", "distilled_guidance_layer.norms.0.scale"} <= bare
        assert not any(k.startswith(("vector_in.", "guidance_in.", "time_in.")) or "_mod.lin" in k for k in bare)
    elif FAMILY[name] == "anima":  # ComfyUI's Anima file: Cosmos-Predict2's MiniTrainDIT names
        assert {"x_embedder.proj.1.weight", "t_embedding_norm.weight", "blocks.0.self_attn.q_proj.weight",
                "blocks.1.cross_attn.k_proj.weight", "blocks.0.adaln_modulation_mlp.1.weight",
                "final_layer.linear.weight"} <= bare
    elif FAMILY[name] == "qwen_image21":  # ComfyUI's layout: diffusers' names, fused img_mlp.gate_up, txt_in's norm
        assert {"img_in.weight", "modulation.1.weight", "txt_in.text_norm.weight", "transformer_blocks.0.attn.to_q.weight",
                "transformer_blocks.1.img_mlp.gate_up.weight"} <= bare
        assert not any(".img_mlp.proj." in k or ".img_mlp.gate_layer." in k for k in bare)
    elif FAMILY[name] == "krea2":  # Krea's own names
        assert {"first.weight", "blocks.0.attn.wq.weight", "blocks.1.mlp.gate.weight", "txtfusion.projector.weight",
                "last.linear.weight"} <= bare
        assert not any(".to_q." in k for k in bare)
    elif FAMILY[name] == "ideogram4":  # the peers' original layout: fused attention.qkv, attention.o
        assert {"llm_cond_proj.weight", "layers.0.attention.qkv.weight", "layers.1.attention.o.weight",
                "layers.0.adaln_modulation.weight", "final_layer.linear.weight"} <= bare
        assert not any(".to_q." in k or ".to_out." in k for k in bare)
    elif FAMILY[name] == "wan":  # ComfyUI's wan2.1_t2v_*.safetensors: the original Wan names
        assert {"patch_embedding.weight", "text_embedding.0.weight", "time_projection.1.weight", "head.modulation",
                "blocks.0.self_attn.q.weight", "blocks.1.cross_attn.o.weight", "blocks.0.ffn.0.weight",
                "blocks.0.modulation", "blocks.0.norm3.weight", "head.head.weight"} <= bare
        assert not any(".to_q." in k or ".attn1." in k for k in bare)
    else:
        assert {"pos_embed", "joint_blocks.0.x_block.attn2.qkv.weight", "joint_blocks.1.context_block.attn.qkv.weight",
                "x_embedder.proj.weight", "y_embedder.mlp.0.weight"} <= bare
        assert "joint_blocks.1.context_block.attn.proj.weight" not in bare  # the last block is context_pre_only
    probe = probe_single_file(f, str(f))
    assert probe.ok and probe.family == FAMILY[name]
    model = dsf.load_transformer_single_file(FAMILY[name], f, config_source=config_sources[name], dtype=torch.float32)
    assert not model.training
    _assert_same(model.state_dict(), _transformer_sd(folders[name]))


@pytest.mark.parametrize("name", TINY)
def test_family_converters_are_inverses(folders, name):
    """Each family's convert module: to_diffusers undoes from_diffusers bit for bit and uses every tensor."""
    from lora_trainer.families import get_part

    conv = get_part(FAMILY[name], "convert")
    config = json.loads((folders[name] / "transformer" / "config.json").read_text())
    ref = _transformer_sd(folders[name])
    original = conv.from_diffusers(ref, config)
    left = dict(original)
    _assert_same(conv.to_diffusers(left, config), ref)
    assert not left
    refusal, figures = conv.config_checks({k: list(v.shape) for k, v in original.items()}, config, "config.json")
    assert refusal is None and figures and all(a == b for _, a, b in figures), figures


def test_single_file_families_have_every_hook():
    """A family loads single-file transformers iff its convert module has to_diffusers; then it has every hook."""
    from lora_trainer.families import FAMILIES, get_part

    found = [n for n in FAMILIES if hasattr(get_part(n, "convert"), "to_diffusers")]
    assert found == sorted(set(FAMILY.values()), key=FAMILIES.index)
    for name in found:
        conv = get_part(name, "convert")
        assert callable(conv.from_diffusers) and callable(conv.config_checks)
        # FLUX.2 ships no all-in-one files: its text-encoder map is empty
        assert conv.COMPONENT_PREFIXES and conv.ALL_IN_ONE_VAE and isinstance(conv.ALL_IN_ONE_TEXT_ENCODERS, dict)


def test_sd3_file_reads_back_through_diffusers_from_single_file(folders, tmp_path):
    """diffusers' own loader (its converter, unchanged) reads the SAI file written from the folder bit for bit."""
    from diffusers import SD3Transformer2DModel

    f = write_single_file(folders["sd3"], tmp_path / "sd3.safetensors", prefix=True)
    model = SD3Transformer2DModel.from_single_file(str(f), config=str(folders["sd3"]), subfolder="transformer",
                                                   local_files_only=True)
    _assert_same(model.state_dict(), _transformer_sd(folders["sd3"]))


def _row_ids(shapes: dict) -> dict:
    """One column per tensor, every row a distinct number: the converters only cut and join along dim 0, so
    this tests them at the real models' row counts in a few KB."""
    out, n = {}, 0
    for k, shape in sorted(shapes.items()):
        rows = shape[0]
        out[k] = torch.arange(n, n + rows, dtype=torch.float64).reshape(rows, *([1] * (len(shape) - 1)))
        n += rows
    return out


def test_flux_converters_match_diffusers_at_flux_widths():
    """At FLUX.1-dev's real widths (3072 inner, 12288 MLP, 4096 T5, 768 CLIP): diffusers' converter (which
    hard-codes 3072, so the tiny models cannot use it) and ours give the same tensors, and our inverse is
    undone exactly by diffusers' converter."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    config = {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 128,
                  "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
                  "axes_dims_rope": (16, 56, 56)}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FluxTransformer2DModel(**config).state_dict().items()}
    assert shapes["single_transformer_blocks.0.proj_mlp.weight"][0] == 12288
    ref = _row_ids(shapes)
    bfl = flux_to_bfl(ref, config)
    assert bfl["single_blocks.1.linear1.weight"].shape[0] == 3 * 3072 + 12288
    _assert_same(convert_flux_transformer_checkpoint_to_diffusers(dict(bfl)), ref)
    _assert_same(flux_bfl_to_diffusers(dict(bfl), config), ref)


def test_sd3_inverse_matches_diffusers_at_sd35_large_widths():
    """SD3.5-large's widths (38 heads x 64, q/k RMS norm, no attn2), two blocks: sd3_to_sai is undone by diffusers'
    converter exactly."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    config = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 2, "attention_head_dim": 64,
                  "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
                  "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192, "qk_norm": "rms_norm"}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in SD3Transformer2DModel(**config).state_dict().items()}
    ref = _row_ids(shapes)
    _assert_same(convert_sd3_transformer_checkpoint_to_diffusers(sd3_to_sai(ref, config)), ref)


# ---------------------------------------------------------------------------------- all-in-one files

@pytest.mark.parametrize("name", ["flux1-dev", "sd3"])
def test_all_in_one_file(folders, config_sources, tmp_path, name):
    """ComfyUI-style: VAE (LDM layout) and text encoders in the file too. The loader reads the transformer only;
    the probe sees every component; diffusers reads the VAE and T5 back bit for bit."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_sd3_t5_checkpoint_to_diffusers,
    )

    f = write_single_file(folders[name], tmp_path / "aio.safetensors", prefix=True, components=True)
    probe = probe_single_file(f, str(f))
    assert probe.ok and probe.components_missing == ()
    model = dsf.load_transformer_single_file(FAMILY[name], f, config_source=config_sources[name], dtype=torch.float32)
    _assert_same(model.state_dict(), _transformer_sd(folders[name]))
    vae = AutoencoderKL.from_single_file(str(f), config=str(folders[name]), subfolder="vae", local_files_only=True)
    _assert_same(vae.state_dict(), load_file(folders[name] / "vae" / "diffusion_pytorch_model.safetensors"))
    t5 = "text_encoder_2" if name == "flux1-dev" else "text_encoder_3"
    _assert_same(convert_sd3_t5_checkpoint_to_diffusers(load_file(f)), load_file(folders[name] / t5 / "model.safetensors"))


# ---------------------------------------------------------------------------------- components

@pytest.mark.parametrize("name", ["flux1-dev", "sd3"])
def test_components_equal_the_folders(folders, config_sources, tmp_path, name):
    from lora_trainer.families import get_family

    f = write_single_file(folders[name], tmp_path / "model.safetensors", prefix=name == "sd3")
    ticks = []
    family = get_family(FAMILY[name])
    comps = dsf.load_components_single_file(family, f, config_source=config_sources[name], dtype=torch.float32,
                                            progress=lambda i, n, what: ticks.append((i, n, what)))
    ref = get_family(FAMILY[name])._load_folder(folders[name], dtype=torch.float32, progress=None)
    assert ticks[0] == (0, len(comps.modules()), "transformer") and ticks[-1][2] == "done"
    assert comps.denoisers.keys() == ref.denoisers.keys() == {"transformer"}
    assert comps.text_encoders.keys() == ref.text_encoders.keys() == comps.tokenizers.keys()
    for mine, theirs in zip(comps.modules(), ref.modules()):
        assert type(mine) is type(theirs)
        _assert_same(mine.state_dict(), theirs.state_dict())
    assert comps.vae.dtype == torch.float32
    for key in comps.tokenizers:
        assert torch.equal(family.tokenize(comps.tokenizers[key], [CAPTION]), family.tokenize(ref.tokenizers[key], [CAPTION]))
    assert comps.scheduler_config == ref.scheduler_config
    assert (comps.prediction_type, comps.variant) == (ref.prediction_type, ref.variant)
    assert comps.variant == ("dev" if name == "flux1-dev" else "sd3.5-medium")


def test_fp8_file_loads_in_bf16(folders, config_sources, tmp_path):
    """fp8 checkpoints (flux1-dev-fp8 style, plain e4m3 weights) are cast to the training dtype as they are read."""
    f = write_single_file(folders["flux1-schnell"], tmp_path / "fp8.safetensors", dtype=torch.float8_e4m3fn)
    model = dsf.load_transformer_single_file("flux1", f, config_source=config_sources["flux1-schnell"],
                                             dtype=torch.bfloat16)
    ref = {k: v.to(torch.float8_e4m3fn).to(torch.bfloat16) for k, v in _transformer_sd(folders["flux1-schnell"]).items()}
    _assert_same(model.state_dict(), ref)


def test_resolve_config_source_from_the_hub_cache(folders, tmp_path, monkeypatch):
    f = write_single_file(folders["flux1-dev"], tmp_path / "flux1-dev.safetensors", prefix=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(dsf.DiTSingleFileError, match="black-forest-labs/FLUX.1-dev.*not in the local Hugging Face cache") as e:
        dsf.resolve_config_source(None, family_name="flux1", checkpoint=f)
    assert "hf download black-forest-labs/FLUX.1-dev --include 'model_index.json'" in e.value.hint
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev"
    snap = _config_only(folders["flux1-dev"], repo / "snapshots" / ("a" * 40), "flux1")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert dsf.resolve_config_source(None, family_name="flux1", checkpoint=f) == snap
    assert dsf.resolve_config_source("black-forest-labs/FLUX.1-dev", family_name="flux1", checkpoint=f) == snap
    assert dsf.resolve_config_source(str(folders["flux1-dev"]), family_name="flux1", checkpoint=f) == folders["flux1-dev"]


def test_config_source_patterns_select_no_transformer_weights(folders):
    files = [p.relative_to(folders["sd3"]).as_posix() for p in folders["sd3"].rglob("*") if p.is_file()]
    picked = dsf.config_source_files_needed("sd3", files)
    assert "transformer/config.json" in picked and "transformer/diffusion_pytorch_model.safetensors" not in picked
    assert {"vae/diffusion_pytorch_model.safetensors", "text_encoder_3/model.safetensors",
            "tokenizer_3/tokenizer.json", "scheduler/scheduler_config.json", "model_index.json"} <= set(picked)
    assert set(files) - set(picked) == {"transformer/diffusion_pytorch_model.safetensors"}


# ---------------------------------------------------------------------------------- refusals

def test_wrong_family_is_refused(folders, config_sources, tmp_path):
    sd3 = write_single_file(folders["sd3"], tmp_path / "sd3.safetensors")
    flux = write_single_file(folders["flux1-dev"], tmp_path / "flux.safetensors", prefix=False)
    with pytest.raises(dsf.DiTSingleFileError, match=r"sd3\.safetensors is a SD3/3\.5 checkpoint .*not FLUX\.1") as e:
        dsf.load_transformer_single_file("flux1", sd3, config_source=config_sources["flux1-dev"], dtype=torch.float32)
    assert "model_type to 'sd3'" in e.value.hint
    with pytest.raises(dsf.DiTSingleFileError, match=r"is a FLUX\.1 checkpoint \(BFL FLUX layout.*not SD3/3\.5"):
        dsf.load_transformer_single_file("sd3", flux, config_source=config_sources["sd3"], dtype=torch.float32)
    with pytest.raises(dsf.DiTSingleFileError, match="not a DiT family"):
        dsf.load_transformer_single_file("sdxl", flux, config_source=config_sources["sd3"], dtype=torch.float32)


def test_other_models_config_is_refused(folders, config_sources, tmp_path):
    dev = write_single_file(folders["flux1-dev"], tmp_path / "dev.safetensors")
    with pytest.raises(dsf.DiTSingleFileError, match="is FLUX.1 dev but the config source .* is FLUX.1 schnell") as e:
        dsf.load_transformer_single_file("flux1", dev, config_source=config_sources["flux1-schnell"], dtype=torch.float32)
    assert "black-forest-labs/FLUX.1-dev" in e.value.hint
    # An SD3.5 large config (q/k norm, no attn2) for a 3.5 medium file.
    large = shutil.copytree(config_sources["sd3"], tmp_path / "large")
    cfg = json.loads((large / "transformer" / "config.json").read_text())
    (large / "transformer" / "config.json").write_text(json.dumps({**cfg, "dual_attention_layers": []}))
    sd3 = write_single_file(folders["sd3"], tmp_path / "sd3.safetensors")
    with pytest.raises(dsf.DiTSingleFileError, match="is SD3/3.5 sd3.5-medium but the config source .* sd3.5-large"):
        dsf.load_transformer_single_file("sd3", sd3, config_source=large, dtype=torch.float32)
    # Same variant, other depth: a pruned FLUX (Flux.1-lite style) with the full model's config.
    deeper = shutil.copytree(config_sources["flux1-dev"], tmp_path / "deeper")
    cfg = json.loads((deeper / "transformer" / "config.json").read_text())
    (deeper / "transformer" / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(dsf.DiTSingleFileError, match="double blocks: 2 in the file, 3 in the config"):
        dsf.load_transformer_single_file("flux1", dev, config_source=deeper, dtype=torch.float32)


def test_config_source_without_weights_is_refused(folders, config_sources, tmp_path):
    """SD single files need configs only; DiT single files need the VAE and text encoder weights too."""
    from lora_trainer.families import get_family

    f = write_single_file(folders["flux1-dev"], tmp_path / "dev.safetensors")
    jsons = tmp_path / "jsons"  # what `hf download ... --include '*.json' '*.txt'` leaves
    for p in folders["flux1-dev"].rglob("*"):
        if p.is_file() and p.suffix in (".json", ".txt"):
            (jsons / p.relative_to(folders["flux1-dev"])).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, jsons / p.relative_to(folders["flux1-dev"]))
    problems = dsf.config_source_problems(jsons, "flux1")
    assert [p.split("/")[0] for p in problems] == ["vae", "text_encoder", "text_encoder_2"], problems
    with pytest.raises(dsf.DiTSingleFileError, match="text_encoder_2/ has no safetensors weights") as e:
        dsf.load_components_single_file(get_family("flux1"), f, config_source=jsons, dtype=torch.float32)
    assert "VAE and text encoder weights" in e.value.hint and "hf download" in e.value.hint
    assert dsf.config_source_problems(config_sources["flux1-dev"], "flux1") == []
    assert "not a FLUX.1 pipeline" in dsf.config_source_problems(config_sources["sd3"], "flux1")[0]


def test_unloadable_files_are_refused(folders, config_sources, tmp_path):
    src = config_sources["flux1-schnell"]
    load = lambda p: dsf.load_transformer_single_file("flux1", p, config_source=src, dtype=torch.float32)
    with pytest.raises(dsf.DiTSingleFileError, match="refusing to load the pickle checkpoint flux.ckpt"):
        load(tmp_path / "flux.ckpt")
    f = write_single_file(folders["flux1-schnell"], tmp_path / "schnell.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(dsf.DiTSingleFileError, match="truncated"):
        load(cut)
    # A ComfyUI scaled-fp8 file: its weights need their scales.
    sd = load_file(f)
    sd[DIT_PREFIX + "scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(tmp_path / "scaled.safetensors"))
    with pytest.raises(dsf.DiTSingleFileError, match="quantised checkpoint .*scaled_fp8"):
        load(tmp_path / "scaled.safetensors")
    # A diffusers-layout transformer on its own (the folder's file, not a single-file release).
    with pytest.raises(dsf.DiTSingleFileError, match="single diffusers component"):
        load(folders["flux1-schnell"] / "transformer" / "diffusion_pytorch_model.safetensors")
    # A tensor missing / one too many.
    for edit, msg in ((lambda d: d.pop(DIT_PREFIX + "single_blocks.1.linear2.weight"), "lacks the tensor single_blocks.1.linear2.weight"),
                      (lambda d: d.__setitem__(DIT_PREFIX + "double_blocks.0.extra.weight", torch.zeros(1)),
                       "1 tensor\\(s\\) a FLUX.1 transformer does not have, e.g. double_blocks.0.extra.weight")):
        bad = dict(sd)
        bad.pop(DIT_PREFIX + "scaled_fp8")
        edit(bad)
        save_file(bad, str(tmp_path / "bad.safetensors"))
        with pytest.raises(dsf.DiTSingleFileError, match=msg):
            load(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------- preflight side (torch-free)

def test_single_file_problems_for_preflight(folders, config_sources, tmp_path):
    """What preflight can learn from headers and JSON alone, before gigabytes are read."""
    dev = write_single_file(folders["flux1-dev"], tmp_path / "dev.safetensors")
    assert dsf.single_file_problems("flux1", dev, config_sources["flux1-dev"]) == []
    wrong = dsf.single_file_problems("flux1", dev, config_sources["flux1-schnell"])
    assert len(wrong) == 1 and "is FLUX.1 dev but the config source" in wrong[0].message
    sd3 = dsf.single_file_problems("flux1", dev, config_sources["sd3"])
    assert "not a FLUX.1 pipeline" in " ".join(e.message for e in sd3) and "guidance" not in " ".join(e.message for e in sd3)
    empty = tmp_path / "empty"
    shutil.copytree(config_sources["flux1-dev"], empty, ignore=shutil.ignore_patterns("*.safetensors"))
    msgs = [e.message for e in dsf.single_file_problems("flux1", dev, empty)]
    assert len(msgs) == 3 and all("has no safetensors weights" in m for m in msgs), msgs
    assert "hf download black-forest-labs/FLUX.1-dev --include" in dsf.single_file_problems("flux1", dev, empty)[0].hint
    assert "pickle" in dsf.single_file_problems("flux1", tmp_path / "x.ckpt", config_sources["flux1-dev"])[0].message


def test_import_is_torch_free():
    import subprocess
    import sys

    code = ("import sys, lora_trainer.runtime.single_file as d; d.config_source_patterns('sd3'); "
            "assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules), 'heavy import'")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_problem_kinds_tell_a_download_from_a_wrong_model(folders, config_sources, tmp_path):
    """preflight downloads (or asks for) what is "incomplete"; an "invalid" config source is another model."""
    dev = write_single_file(folders["flux1-dev"], tmp_path / "dev.safetensors")
    bare = tmp_path / "bare"
    (bare / "transformer").mkdir(parents=True)
    shutil.copy(config_sources["flux1-dev"] / "model_index.json", bare)
    found = dsf.single_file_problems("flux1", dev, bare)
    assert {e.kind for e in found} == {"incomplete"} and len({e.message for e in found}) == len(found)
    assert any("transformer/config.json is missing" in e.message for e in found)
    assert {e.kind for e in dsf.single_file_problems("flux1", dev, config_sources["flux1-schnell"])} == {"invalid"}
    assert "invalid" in {e.kind for e in dsf.single_file_problems("flux1", dev, config_sources["sd3"])}
