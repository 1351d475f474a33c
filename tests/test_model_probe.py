"""Base-model inspection from files only (lora_trainer.preflight.probe)."""
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lora_trainer.families import SPECS
from lora_trainer.preflight.probe import folder as model_probe
from lora_trainer.preflight.probe import probe_model, read_safetensors_header
from lora_trainer.preflight.probe.result import SUPPORTED

FLUX1_COMPONENTS, SD3_COMPONENTS = SPECS["flux1"].components, SPECS["sd3"].components

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


@pytest.mark.parametrize("cls,comps,name", [
    ("QwenImageEditPipeline", ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"), "Qwen-Image"),
    ("ZImageControlNetPipeline", ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"), "Z-Image"),
    ("ChromaRadiancePipeline", ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
     "a Chroma pipeline this trainer does not know"),
    ("WanImageToVideoPipeline", ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"), "Wan"),
    ("KandinskyV22Pipeline", ("unet", "scheduler", "movq"), "Kandinsky"),
    ("PixArtSigmaPipeline", ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"), "PixArt"),
    ("FluxFillPipeline", FLUX1_COMPONENTS, "FLUX.1 Fill"),
    ("FluxKontextPipeline", FLUX1_COMPONENTS, "FLUX.1 Kontext"),
    ("FluxControlPipeline", FLUX1_COMPONENTS, "FLUX.1 Canny/Depth"),
    ("FluxSomethingNewPipeline", FLUX1_COMPONENTS, "a FLUX pipeline this trainer does not know"),  # not guessed as SDXL
    # these declare text_encoder_2 / a text_time UNet: once mistaken for SDXL
    ("HunyuanDiTPipeline", ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"), "Hunyuan-DiT"),
    ("KolorsPipeline", ("unet", "vae", "text_encoder", "tokenizer", "scheduler"), "Kolors"),
])
def test_unsupported_pipeline_class_names_the_family(tmp_path, cls, comps, name):
    p = probe_model(str(write_standin(tmp_path / "m", cls, {"addition_embed_type": "text_time"}, {}, comps=comps)))
    assert p.family is None and codes(p) == ["model_unsupported"], p.problems  # no "missing unet" noise
    msg = p.problems[0]["message"]
    assert f"pipeline class {cls} ({name}" in msg and ") is not supported; " in msg and f"supported: {SUPPORTED}" in msg
    assert SUPPORTED == ("SD1.x, SD2.x, SDXL, FLUX.1, SD3/3.5, FLUX.2, FLUX.2 klein, Z-Image, Qwen-Image, Qwen-Image 2.1, "
                         "Chroma, Anima, Krea 2, Ideogram 4, Wan")


def test_unknown_pipeline_class(tmp_path):
    p = probe_model(str(write_standin(tmp_path / "m", "MyCustomPipeline", {}, {})))
    assert p.family is None and codes(p) == ["model_unsupported"]
    assert p.problems[0]["message"] == f"pipeline class MyCustomPipeline is not supported; supported: {SUPPORTED}"


# ------------------------------------------------------------------------------ FLUX.1 / SD3 folders

def write_flow_pipeline(root: Path, cls: str, transformer: dict, *, family: str | None = None,
                        t5_tokenizer: tuple[str, ...] = ("tokenizer.json", "spiece.model"), drop=(),
                        index_extra: dict | None = None) -> Path:
    """A FLUX.1 / SD3 pipeline folder of stand-in files: configs, tiny safetensors (T5 sharded with its index)."""
    family = family or ("sd3" if cls.startswith("StableDiffusion3") else "flux1")
    comps = [c for c in (SD3_COMPONENTS if family == "sd3" else FLUX1_COMPONENTS) if c not in drop]
    t5, t5_tok = ("text_encoder_3", "tokenizer_3") if family == "sd3" else ("text_encoder_2", "tokenizer_2")
    root.mkdir(parents=True)
    index = {"_class_name": cls, "_diffusers_version": "0.42.1", **{c: ["x", "Y"] for c in comps}, **(index_extra or {})}
    (root / "model_index.json").write_text(json.dumps(index))
    for c in comps:
        d = root / c
        d.mkdir()
        if c == t5_tok:
            for name in t5_tokenizer:
                (d / name).write_text("{}")
        elif c.startswith("tokenizer"):
            (d / "vocab.json").write_text("{}")
            (d / "merges.txt").write_text("")
        elif c == "scheduler":
            (d / "scheduler_config.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}))
        elif c == t5:
            (d / "config.json").write_text(json.dumps({"_class_name": "T5EncoderModel"}))
            shards = {"model-00001-of-00002.safetensors": {"shared.weight": [4, 2]},
                      "model-00002-of-00002.safetensors": {"encoder.final_layer_norm.weight": [2]}}
            for name, tensors in shards.items():
                write_safetensors(d / name, tensors)
            (d / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": 10}, "weight_map": {k: n for n, t in shards.items() for k in t}}))
        else:
            (d / "config.json").write_text(json.dumps(transformer if c == "transformer" else {}))
            write_safetensors(d / ("model.safetensors" if c.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"),
                              {"w": [2]})
    return root


@pytest.mark.parametrize("guidance,variant", [(True, "dev"), (False, "schnell"), (None, "schnell")])
def test_flux1_folder(tmp_path, guidance, variant):
    tcfg = {"_class_name": "FluxTransformer2DModel", "in_channels": 4, "num_layers": 1, "num_single_layers": 1}
    if guidance is not None:
        tcfg["guidance_embeds"] = guidance
    p = probe_model(str(write_flow_pipeline(tmp_path / "flux", "FluxPipeline", tcfg)))
    assert p.ok, p.problems
    assert (p.family, p.variant, p.prediction_type) == ("flux1", variant, "flow")
    assert p.components_found == FLUX1_COMPONENTS and p.components_missing == ()
    assert "FluxPipeline" in p.family_evidence and variant in p.family_evidence
    assert p.weight_files["text_encoder_2"] == ("text_encoder_2/model-00001-of-00002.safetensors",
                                                "text_encoder_2/model-00002-of-00002.safetensors")
    assert set(p.weight_files) == {"transformer", "vae", "text_encoder", "text_encoder_2"}


@pytest.mark.parametrize("tcfg,variant", [
    ({"num_layers": 2}, "sd3-medium"),  # SD3 medium: no qk_norm, no dual attention
    ({"num_layers": 2, "dual_attention_layers": []}, "sd3-medium"),
    ({"num_layers": 2, "qk_norm": "rms_norm"}, "sd3.5-large"),  # tiny 3.5 large: classified by structure
    ({"num_layers": 38, "num_attention_heads": 38, "qk_norm": "rms_norm"}, "sd3.5-large"),  # the real one
    ({"num_layers": 38}, "sd3.5-large"),
    ({"num_layers": 2, "qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}, "sd3.5-medium"),
    ({"num_layers": 24, "qk_norm": "rms_norm", "dual_attention_layers": list(range(13))}, "sd3.5-medium"),
])
def test_sd3_folder_variants(tmp_path, tcfg, variant):
    p = probe_model(str(write_flow_pipeline(tmp_path / "sd3", "StableDiffusion3Pipeline",
                                            {"_class_name": "SD3Transformer2DModel", **tcfg})))
    assert p.ok, p.problems
    assert (p.family, p.variant, p.prediction_type) == ("sd3", variant, "flow")
    assert p.components_found == SD3_COMPONENTS


def test_sd3_without_t5(tmp_path):
    root = write_flow_pipeline(tmp_path / "sd3", "StableDiffusion3Pipeline", {"num_layers": 2},
                               drop=("text_encoder_3", "tokenizer_3"),
                               index_extra={"text_encoder_3": [None, None], "tokenizer_3": [None, None]})
    p = probe_model(str(root))
    assert p.family == "sd3" and set(p.components_missing) == {"text_encoder_3", "tokenizer_3"}
    assert codes(p) == ["model_incomplete"] and "text_encoder_3, tokenizer_3" in p.problems[0]["message"]


def test_flux_tokenizer_2_and_t5_folder_missing(tmp_path):
    root = write_flow_pipeline(tmp_path / "flux", "FluxPipeline", {"guidance_embeds": True})
    shutil.rmtree(root / "tokenizer_2")
    for f in (root / "text_encoder_2").glob("*.safetensors"):
        f.unlink()
    p = probe_model(str(root))
    assert (p.family, p.variant) == ("flux1", "dev")
    assert set(p.components_missing) == {"tokenizer_2", "text_encoder_2"} and set(codes(p)) == {"model_incomplete"}
    msgs = " | ".join(x["message"] for x in p.problems)
    assert "text_encoder_2/ has no weight files" in msgs and "missing component(s): tokenizer_2" in msgs


def test_t5_shards(tmp_path):
    root = write_flow_pipeline(tmp_path / "flux", "FluxPipeline", {"guidance_embeds": False})
    (root / "text_encoder_2" / "model-00002-of-00002.safetensors").unlink()
    p = probe_model(str(root))
    assert codes(p) == ["model_incomplete"]
    assert p.problems[0]["files"] == ["text_encoder_2/model-00002-of-00002.safetensors"]
    assert "model.safetensors.index.json" in p.problems[0]["message"]
    # shards without their index: from_pretrained would not find them
    (root / "text_encoder_2" / "model.safetensors.index.json").unlink()
    p = probe_model(str(root))
    assert codes(p) == ["model_incomplete", "model_incomplete"]
    assert "no model.safetensors.index.json" in p.problems[0]["message"]
    assert p.problems[1]["files"] == ["text_encoder_2/model-00002-of-00002.safetensors"]


@pytest.mark.parametrize("have_sp", [True, False])
def test_t5_tokenizer_files(tmp_path, monkeypatch, have_sp):
    monkeypatch.setattr(model_probe, "_have_sentencepiece", lambda: have_sp)
    p = probe_model(str(write_flow_pipeline(tmp_path / "j", "FluxPipeline", {}, t5_tokenizer=("tokenizer.json",))))
    assert p.ok  # tokenizer.json alone is enough, with or without sentencepiece
    p = probe_model(str(write_flow_pipeline(tmp_path / "s", "StableDiffusion3Pipeline", {}, t5_tokenizer=("spiece.model",))))
    if have_sp:
        assert p.ok and any("spiece.model" in n for n in p.notes)
    else:
        assert codes(p) == ["model_incomplete"] and p.components_missing == ("tokenizer_3",)
        assert "spiece.model" in p.problems[0]["message"] and "sentencepiece" in p.problems[0]["hint"]
    p = probe_model(str(write_flow_pipeline(tmp_path / "n", "FluxPipeline", {}, t5_tokenizer=("vocab.json", "merges.txt"))))
    assert codes(p) == ["model_incomplete"] and "neither tokenizer.json nor spiece.model" in p.problems[0]["message"]


@pytest.mark.parametrize("cls,family,extra", [
    ("StableDiffusion3Img2ImgPipeline", "sd3", {}),
    ("FluxInpaintPipeline", "flux1", {}),
    ("FluxControlNetPipeline", "flux1", {"controlnet": ["diffusers", "FluxControlNetModel"]}),
])
def test_pipeline_variants_train_as_the_base_family(tmp_path, cls, family, extra):
    p = probe_model(str(write_flow_pipeline(tmp_path / "m", cls, {}, index_extra=extra)))
    assert p.ok and p.family == family and p.pipeline_class == cls
    assert any("text-to-image" in n for n in p.notes)
    assert ("controlnet" in " ".join(p.notes)) == bool(extra)


def test_flux_conditioned_transformer_refused(tmp_path):
    tcfg = {"in_channels": 384, "out_channels": 64, "guidance_embeds": True}  # FLUX.1-Fill-dev's transformer
    p = probe_model(str(write_flow_pipeline(tmp_path / "m", "FluxPipeline", tcfg)))
    assert p.family is None and codes(p) == ["model_unsupported"] and "Fill" in p.problems[0]["message"]


def test_flow_folder_scheduler_does_not_decide_the_prediction(tmp_path):
    root = write_flow_pipeline(tmp_path / "m", "FluxPipeline", {})
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler",
                                                                         "prediction_type": "epsilon"}))
    p = probe_model(str(root))
    assert p.ok and p.prediction_type == "flow" and any("EulerDiscreteScheduler" in n for n in p.notes)


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


def bfl_flux_keys(prefix: str = "", dev: bool = True, img_in: int = 64) -> dict:
    """FLUX.1 transformer key names in the BFL layout (flux1-dev.safetensors), tiny shapes."""
    keys = {"img_in.weight": [4, img_in], "img_in.bias": [4], "time_in.in_layer.weight": [4, 4],
            "vector_in.in_layer.weight": [4, 8], "txt_in.weight": [4, 8],
            "double_blocks.0.img_attn.qkv.weight": [12, 4], "double_blocks.0.img_attn.norm.key_norm.scale": [2],
            "double_blocks.0.txt_attn.qkv.weight": [12, 4], "double_blocks.0.img_mlp.0.weight": [8, 4],
            "single_blocks.0.linear1.weight": [20, 4], "single_blocks.0.linear2.weight": [4, 12],
            "final_layer.linear.weight": [4, 4]}
    if dev:
        keys.update({"guidance_in.in_layer.weight": [4, 4], "guidance_in.in_layer.bias": [4]})
    return {prefix + k: v for k, v in keys.items()}


def save_real(path: Path, keys: dict) -> Path:
    """The same key names written by safetensors.torch.save_file (bf16), as real checkpoints are."""
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(v, dtype=torch.bfloat16) for k, v in keys.items()}, str(path))
    return path


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("dev,variant,repo", [(True, "dev", "black-forest-labs/FLUX.1-dev"),
                                              (False, "schnell", "black-forest-labs/FLUX.1-schnell")])
def test_single_file_flux1_transformer_only(tmp_path, prefix, dev, variant, repo):
    p = probe_model(str(save_real(tmp_path / "flux1.safetensors", bfl_flux_keys(prefix, dev))))
    assert p.kind == "single_file" and p.ok, p.problems
    assert (p.family, p.variant, p.prediction_type) == ("flux1", variant, "flow")
    assert "BFL" in p.family_evidence and (prefix in p.family_evidence if prefix else "under" not in p.family_evidence)
    # the common FLUX case: the transformer only; the rest comes from base_model_config / the default repo
    assert p.components_found == ("transformer",)
    assert p.components_missing == ("vae", "text_encoder", "text_encoder_2")
    assert any("base_model_config" in n and repo in n for n in p.notes)


def test_single_file_flux1_comfy_full_checkpoint(tmp_path):
    keys = {**bfl_flux_keys("model.diffusion_model."),
            "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": [4, 8],
            "text_encoders.t5xxl.transformer.shared.weight": [4, 8], "vae.decoder.conv_in.weight": [4]}
    p = probe_model(str(write_safetensors(tmp_path / "flux1-dev-fp8.safetensors", keys)))
    assert p.ok and (p.family, p.variant) == ("flux1", "dev")
    assert p.components_found == ("transformer", "vae", "text_encoder", "text_encoder_2") and not p.components_missing
    assert not p.notes


def sd3_keys(attn2: bool, ln_q: bool, blocks: int = 2) -> dict:
    keys = {"model.diffusion_model.x_embedder.proj.weight": [4, 16, 2, 2], "model.diffusion_model.pos_embed": [1, 16, 4]}
    for i in range(blocks):
        b = f"model.diffusion_model.joint_blocks.{i}."
        keys.update({b + "x_block.attn.qkv.weight": [12, 4], b + "context_block.attn.qkv.weight": [12, 4],
                     b + "context_block.adaLN_modulation.1.bias": [24], b + "x_block.mlp.fc1.weight": [8, 4]})
        if ln_q:
            keys.update({b + "x_block.attn.ln_q.weight": [2], b + "context_block.attn.ln_q.weight": [2]})
        if attn2:
            keys[b + "x_block.attn2.qkv.weight"] = [12, 4]
    return keys


SD3_TEXT = {"text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": [4, 8],
            "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight": [4, 8],
            "first_stage_model.decoder.conv_in.weight": [4]}
T5XXL = {"text_encoders.t5xxl.transformer.shared.weight": [4, 8]}


@pytest.mark.parametrize("attn2,ln_q,blocks,variant", [
    (True, True, 2, "sd3.5-medium"), (False, True, 2, "sd3.5-large"), (False, False, 38, "sd3.5-large"),
    (False, False, 2, "sd3-medium")])
def test_single_file_sd3(tmp_path, attn2, ln_q, blocks, variant):
    p = probe_model(str(write_safetensors(tmp_path / "sd3.safetensors", {**sd3_keys(attn2, ln_q, blocks), **SD3_TEXT, **T5XXL})))
    assert p.ok, p.problems
    assert (p.family, p.variant, p.prediction_type) == ("sd3", variant, "flow")
    assert "MMDiT" in p.family_evidence
    assert p.components_found == ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def test_single_file_sd3_medium_incl_clips(tmp_path):
    """sd3_medium_incl_clips.safetensors: no T5, which is not a problem here (it comes from the default repo)."""
    p = probe_model(str(write_safetensors(tmp_path / "sd3.safetensors", {**sd3_keys(False, False), **SD3_TEXT})))
    assert p.ok and p.variant == "sd3-medium" and p.components_missing == ("text_encoder_3",)
    assert any("stabilityai/stable-diffusion-3-medium-diffusers" in n for n in p.notes)


@pytest.mark.parametrize("keys,name", [
    ({**{k: v for k, v in bfl_flux_keys(dev=False).items() if not k.startswith(("vector_in", "img_in"))},
      "distilled_guidance_layer.in_proj.weight": [4, 4], "img_in_patch.weight": [4, 3, 16, 16],
      "nerf_blocks.0.norm.scale": [4]}, "Chroma Radiance"),
    ({"model.diffusion_model.head.modulation": [1, 2, 4], "model.diffusion_model.blocks.0.self_attn.q.weight": [4, 4],
      "model.diffusion_model.patch_embedding.weight": [4, 36, 1, 2, 2], "model.diffusion_model.text_embedding.0.weight": [4, 8],
      "model.diffusion_model.img_emb.proj.1.weight": [4, 4]}, "Wan image-to-video"),
    ({"layers.0.adaLN_modulation.1.weight": [4, 4], "cap_embedder.0.weight": [8], "noise_refiner.0.attention.qkv.weight": [12, 4]}, "Lumina 2"),
    ({"txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias": [4], "double_blocks.0.img_attn.qkv.weight": [12, 4],
      "img_in.weight": [4, 4]}, "HunyuanVideo"),
    ({k: v for k, v in bfl_flux_keys().items() if not k.startswith("vector_in")}, "FLUX-like (not FLUX.1)"),
    (bfl_flux_keys(img_in=384), "FLUX.1 Fill"),
    (bfl_flux_keys("model.diffusion_model.", img_in=128), "FLUX.1 Canny/Depth"),
])
def test_single_file_other_families_named(tmp_path, keys, name):
    p = probe_model(str(write_safetensors(tmp_path / "m.safetensors", keys)))
    assert p.family is None and codes(p) == ["model_unsupported"], p.problems
    msg = p.problems[0]["message"]
    assert f"this is a {name}" in msg and f"supported: {SUPPORTED}" in msg


@pytest.mark.parametrize("keys,needle", [
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": [4, 8], "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": [8, 4],
      "lora_unet_double_blocks_0_img_attn_qkv.alpha": []}, "LoRA (FLUX layout)"),
    ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": [4, 8],
      "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": [8, 4]}, "LoRA (FLUX layout)"),
    ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": [4, 8]}, "LoRA (FLUX layout)"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": [4, 8]}, "LoRA"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": [4, 8]}, "LoRA (SD3 layout)"),
])
def test_lora_as_base_model(tmp_path, keys, needle):
    p = probe_model(str(write_safetensors(tmp_path / "lora.safetensors", keys)))
    assert codes(p) == ["model_unsupported"] and needle in p.problems[0]["message"]
    assert "not a base model" in p.problems[0]["message"] and "init_lora" in p.problems[0]["hint"]


@pytest.mark.parametrize("keys,needle", [
    ({"transformer_blocks.0.attn.to_q.weight": [4, 4], "single_transformer_blocks.0.attn.to_q.weight": [4, 4],
      "x_embedder.weight": [4, 4]}, "diffusers layout"),
    ({"encoder.conv_in.weight": [4, 3, 3, 3], "decoder.conv_in.weight": [4, 16, 3, 3],
      "encoder.down.0.block.0.conv1.weight": [4, 4, 3, 3]}, "VAE"),  # ae.safetensors
    ({"shared.weight": [4, 8], "encoder.block.0.layer.0.SelfAttention.q.weight": [4, 4]}, "text encoder"),  # t5xxl
])
def test_single_component_files(tmp_path, keys, needle):
    p = probe_model(str(write_safetensors(tmp_path / "c.safetensors", keys)))
    assert codes(p) == ["model_unsupported"] and needle in p.problems[0]["message"]


def test_flow_model_type_mismatch(tmp_path):
    f = write_safetensors(tmp_path / "flux.safetensors", bfl_flux_keys())
    assert probe_model(str(f), model_type="flux1").ok
    p = probe_model(str(f), model_type="sdxl")
    assert codes(p) == ["model_type_mismatch"] and "flux1" in p.problems[0]["message"]


def test_probe_imports_no_torch(tmp_path):
    f = write_safetensors(tmp_path / "flux.safetensors", bfl_flux_keys())
    code = ("import sys; from lora_trainer.preflight.probe import probe_model; "
            f"p = probe_model({str(f)!r}); assert p.family == 'flux1', p; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


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


def test_hub_cache_flux_snapshot(tmp_path, monkeypatch):
    src = write_flow_pipeline(tmp_path / "src", "FluxPipeline", {"guidance_embeds": True})
    make_cache(tmp_path / "hub", "black-forest-labs/FLUX.1-dev", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    p = probe_model("black-forest-labs/FLUX.1-dev", tmp_path)
    assert (p.kind, p.in_cache, p.family, p.variant, p.prediction_type) == ("hub", True, "flux1", "dev", "flow") and p.ok


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
