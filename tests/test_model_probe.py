"""Base-model inspection from files only (lora_trainer.model_probe)."""
import json
import shutil
import struct
from pathlib import Path

import pytest

from lora_trainer.model_probe import probe_model, read_safetensors_header

SD15_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": [4, 4],
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": [4, 768],
    "first_stage_model.decoder.conv_in.weight": [4],
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": [4, 8],
}
SD2_KEYS = {
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": [4, 1024],
    "first_stage_model.decoder.conv_in.weight": [4],
    "cond_stage_model.model.token_embedding.weight": [4, 8],
}
SDXL_KEYS = {
    "model.diffusion_model.label_emb.0.0.weight": [4, 4],
    "first_stage_model.decoder.conv_in.weight": [4],
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": [4, 8],
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": [4],
}


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None, *, cut: int = 0) -> Path:
    """A real safetensors file (uint8 tensors), written by hand: header length, JSON header, data."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": "U8", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    data = struct.pack("<Q", len(blob)) + blob + b"\x01" * offset
    path.write_bytes(data[: len(data) - cut] if cut else data)
    return path


def codes(probe):
    return [p["code"] for p in probe.problems]


# ------------------------------------------------------------------------------ diffusers folders

@pytest.mark.parametrize("family,expected,prediction", [
    ("sd15", "sd15", "epsilon"), ("sd2", "sd2", "epsilon"), ("sd2-v", "sd2", "v_prediction"), ("sdxl", "sdxl", "epsilon")])
def test_tiny_pipelines(tiny_models, family, expected, prediction):
    p = probe_model(str(tiny_models[family]), "/")
    assert p.kind == "diffusers_dir" and p.ok, p.problems
    assert (p.family, p.prediction_type) == (expected, prediction)
    assert p.components_missing == ()
    assert ("text_encoder_2" in p.components_found) == (expected == "sdxl")


@pytest.fixture()
def sd15_copy(tiny_models, tmp_path):
    return Path(shutil.copytree(tiny_models["sd15"], tmp_path / "sd15"))


def test_incomplete_folder(sd15_copy):
    shutil.rmtree(sd15_copy / "vae")
    (sd15_copy / "scheduler" / "scheduler_config.json").unlink()
    p = probe_model(str(sd15_copy))
    assert set(p.components_missing) == {"vae", "scheduler"}
    assert codes(p) and set(codes(p)) == {"model_incomplete"}
    assert any("vae" in m["message"] for m in p.problems)


def test_bin_only_weights_refused(sd15_copy):
    unet = sd15_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    p = probe_model(str(sd15_copy))
    assert "model_pickle_refused" in codes(p)
    refused = next(x for x in p.problems if x["code"] == "model_pickle_refused")
    assert refused["files"] == ["unet/diffusion_pytorch_model.bin"] and "unet" in p.components_missing


def test_truncated_weights_in_folder(sd15_copy):
    f = sd15_copy / "text_encoder" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    p = probe_model(str(sd15_copy))
    assert codes(p) == ["model_incomplete"] and "truncated" in p.problems[0]["message"]


def test_no_model_index(tmp_path):
    (tmp_path / "m").mkdir()
    write_safetensors(tmp_path / "m" / "model.safetensors", SD15_KEYS)
    p = probe_model(str(tmp_path / "m"))
    assert codes(p) == ["model_incomplete"] and "model_index.json" in p.problems[0]["message"]
    assert "model.safetensors" in p.problems[0]["hint"]


def write_standin(root: Path, cls: str, unet: dict, te: dict, comps=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
                  sched: dict | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": cls, **{c: ["x", "Y"] for c in comps},
                                                       "safety_checker": [None, None]}))
    for c in comps:
        (root / c).mkdir()
        if c.startswith("tokenizer"):
            (root / c / "tokenizer.json").write_text("{}")
        elif c == "scheduler":
            (root / c / "scheduler_config.json").write_text(json.dumps(sched or {}))
        else:
            (root / c / "config.json").write_text(json.dumps(unet if c == "unet" else te))
            write_safetensors(root / c / "model.safetensors", {"w": [2]})
    return root


@pytest.mark.parametrize("unet,te,family", [
    ({"cross_attention_dim": 768, "use_linear_projection": True}, {"hidden_act": "gelu"}, "sd15"),  # real width wins
    ({"cross_attention_dim": 1024}, {"hidden_act": "quick_gelu"}, "sd2"),
    ({"cross_attention_dim": 32}, {"hidden_act": "gelu"}, "sd2"),
    ({"cross_attention_dim": 32}, {"hidden_act": "quick_gelu"}, "sd15"),
    ({"cross_attention_dim": 32, "attention_head_dim": [2, 4]}, {}, "sd2"),
    ({"cross_attention_dim": 32, "use_linear_projection": True}, {}, "sd2"),
    ({"cross_attention_dim": 32, "attention_head_dim": 8}, {}, "sd15"),
    ({"addition_embed_type": "text_time"}, {}, "sdxl"),
])
def test_structural_family_rules(tmp_path, unet, te, family):
    p = probe_model(str(write_standin(tmp_path / "m", "StableDiffusionPipeline", unet, te)))
    assert p.family == family and p.family_evidence
    assert p.prediction_type == "epsilon"  # scheduler config without the key: diffusers' default


def test_sdxl_folder_needs_second_encoder(tmp_path):
    p = probe_model(str(write_standin(tmp_path / "m", "StableDiffusionXLPipeline", {}, {},
                                      sched={"prediction_type": "v_prediction"})))
    assert p.family == "sdxl" and p.prediction_type == "v_prediction"
    assert set(p.components_missing) == {"text_encoder_2", "tokenizer_2"} and codes(p) == ["model_incomplete"]


def test_unsupported_pipeline_class(tmp_path):
    p = probe_model(str(write_standin(tmp_path / "m", "FluxPipeline", {}, {})))
    assert p.family is None and "model_unsupported" in codes(p)


# ------------------------------------------------------------------------------ single files

@pytest.mark.parametrize("keys,family,prediction,marker", [
    (SD15_KEYS, "sd15", "epsilon", "cond_stage_model.transformer."), (SD2_KEYS, "sd2", None, "cond_stage_model.model."),
    (SDXL_KEYS, "sdxl", "epsilon", "conditioner.embedders.1.model.")])
def test_single_file_families(tmp_path, keys, family, prediction, marker):
    p = probe_model(str(write_safetensors(tmp_path / "m.safetensors", keys)))
    assert p.kind == "single_file" and p.ok, p.problems
    assert (p.family, p.prediction_type) == (family, prediction)
    assert p.family_evidence.startswith(marker)  # decided by the text-encoder marker, not a fallback
    assert set(p.components_found) == {"unet", "vae", "text_encoder"}


def test_single_file_fallbacks_and_flags(tmp_path):
    unet_only_widths = {k: v for k, v in SD2_KEYS.items() if not k.startswith("cond_stage")}
    unet_only_widths["cond_stage_model.something.weight"] = [2]
    p = probe_model(str(write_safetensors(tmp_path / "a.safetensors", unet_only_widths)))
    assert p.family == "sd2" and "to_k" in p.family_evidence
    p = probe_model(str(write_safetensors(tmp_path / "v.safetensors", {**SDXL_KEYS, "v_pred": [0]})))
    assert p.prediction_type == "v_prediction"
    p = probe_model(str(write_safetensors(tmp_path / "m.safetensors", SD2_KEYS, {"modelspec.prediction_type": "v"})))
    assert p.prediction_type == "v_prediction"


def test_single_file_missing_vae(tmp_path):
    keys = {k: v for k, v in SD15_KEYS.items() if not k.startswith("first_stage_model")}
    p = probe_model(str(write_safetensors(tmp_path / "m.safetensors", keys)))
    assert codes(p) == ["model_incomplete"] and p.components_missing == ("vae",)


@pytest.mark.parametrize("keys,needle", [
    ({"lora_unet_down_blocks_0.lora_down.weight": [2]}, "LoRA"),
    ({"conditioner.embedders.0.model.text_projection": [2], "model.diffusion_model.x": [2]}, "refiner"),
    ({"conv_in.weight": [2], "down_blocks.0.resnets.0.conv1.weight": [2]}, "component"),
    ({"something.else": [2]}, "no Stable Diffusion"),
])
def test_single_file_unsupported(tmp_path, keys, needle):
    p = probe_model(str(write_safetensors(tmp_path / "m.safetensors", keys)))
    assert codes(p) == ["model_unsupported"] and needle in p.problems[0]["message"]


def test_truncated_and_corrupt_headers(tmp_path):
    full = write_safetensors(tmp_path / "full.safetensors", SD15_KEYS)
    data = full.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    (tmp_path / "header.safetensors").write_bytes(data[:40])  # header length points past the end
    write_safetensors(tmp_path / "tensors.safetensors", SD15_KEYS, cut=10)  # data cut short
    (tmp_path / "json.safetensors").write_bytes(struct.pack("<Q", 6) + b"{nope}")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}" * 10)
    for name, code, text in [("short", "model_incomplete", "too short"), ("header", "model_incomplete", "beyond the file size"),
                             ("tensors", "model_incomplete", "truncated"), ("json", "model_corrupt", "invalid"),
                             ("huge", "model_incomplete", "beyond")]:
        p = probe_model(str(tmp_path / f"{name}.safetensors"))
        assert codes(p) == [code] and text in p.problems[0]["message"], (name, p.problems)
    header, problem = read_safetensors_header(full)
    assert problem is None and set(header) == set(SD15_KEYS)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".CKPT"])
def test_pickle_checkpoints_refused(tmp_path, suffix):
    f = tmp_path / f"model{suffix}"
    f.write_bytes(b"\x80\x04anything")
    p = probe_model(str(f))
    assert codes(p) == ["model_pickle_refused"] and "convert to .safetensors" in p.problems[0]["message"]
    missing = probe_model(str(tmp_path / f"gone{suffix}"))
    assert set(codes(missing)) == {"model_not_found", "model_pickle_refused"}


def test_relative_paths_use_base_dir(tmp_path):
    write_safetensors(tmp_path / "m.safetensors", SD15_KEYS)
    assert probe_model("m.safetensors", tmp_path).family == "sd15"
    assert codes(probe_model("m.safetensors", tmp_path / "elsewhere")) == ["model_not_found"]


def test_not_found(tmp_path):
    for s in [str(tmp_path / "nothing"), "justaword", str(tmp_path / "x.safetensors"), "a/b/c"]:
        p = probe_model(s, tmp_path)
        assert p.kind == "invalid" and codes(p) == ["model_not_found"], s


# ------------------------------------------------------------------------------ hub ids

def make_cache(cache: Path, repo: str, source: Path, ref: bool = True) -> Path:
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / "0123abcd"
    shutil.copytree(source, snap)
    if ref:
        (repo_dir / "refs").mkdir(parents=True)
        (repo_dir / "refs" / "main").write_text("0123abcd")
    return snap


def test_hub_cache_hit(tmp_path, tiny_models, monkeypatch):
    cache = tmp_path / "hub"
    snap = make_cache(cache, "stabilityai/sdxl-tiny", tiny_models["sdxl"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    p = probe_model("stabilityai/sdxl-tiny", tmp_path)
    assert (p.kind, p.in_cache, p.family, p.path) == ("hub", True, "sdxl", snap) and p.ok and not p.warnings
    # no refs/main: newest snapshot with a model_index.json; found via HF_HOME/hub
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    make_cache(tmp_path / "home" / "hub", "org/sd15", tiny_models["sd15"], ref=False)
    p = probe_model("org/sd15", tmp_path)
    assert p.in_cache and p.family == "sd15"


def test_hub_cache_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    p = probe_model("org/name", tmp_path)
    assert (p.kind, p.in_cache, p.family) == ("hub", False, None) and p.ok
    assert [w["code"] for w in p.warnings] == ["hub_not_cached"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = probe_model("org/name", tmp_path)
    assert codes(p) == ["model_not_found"] and "HF_HUB_OFFLINE" in p.problems[0]["message"]


def test_partial_hub_snapshot(tmp_path, tiny_models, monkeypatch):
    snap = make_cache(tmp_path / "hub", "org/partial", tiny_models["sd15"])
    shutil.rmtree(snap / "unet")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    p = probe_model("org/partial", tmp_path)
    assert p.ok and p.in_cache and [w["code"] for w in p.warnings] == ["hub_not_cached"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert codes(probe_model("org/partial", tmp_path)) == ["model_incomplete"]


def test_local_folder_wins_over_hub_id(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    shutil.copytree(tiny_models["sd15"], tmp_path / "org" / "name")
    p = probe_model("org/name", tmp_path)
    assert p.kind == "diffusers_dir" and p.family == "sd15"


# ------------------------------------------------------------------------------ model_type

def test_model_type_mismatch(tmp_path, tiny_models):
    p = probe_model(str(tiny_models["sdxl"]), model_type="sd15")
    assert codes(p) == ["model_type_mismatch"] and "sdxl" in p.problems[0]["message"]
    assert probe_model(str(tiny_models["sdxl"]), model_type="sdxl").ok
    assert probe_model(str(tiny_models["sdxl"]), model_type="auto").ok
    f = write_safetensors(tmp_path / "m.safetensors", SD2_KEYS)
    assert codes(probe_model(str(f), model_type="sd15")) == ["model_type_mismatch"]


def test_hub_like_local_path_mentions_both_readings(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "models").mkdir()
    p = probe_model("models/sd15", tmp_path)
    assert p.kind == "hub" and "no local folder" in p.warnings[0]["message"]
    assert "no local folder" not in probe_model("org/sd15", tmp_path).warnings[0]["message"]
