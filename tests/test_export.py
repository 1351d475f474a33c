"""Tests for lora_trainer.outputs.export: the kohya and PEFT/diffusers LoRA files.

Tiny UNets with the real SD1.5 / SDXL block layouts and tiny CLIP text encoders are wrapped with PEFT LoRA (alpha 8,
rank 4, so the scale alpha/r = 2 must survive), exported, and then
 (a) loaded back with diffusers' own pipeline ``load_lora_weights`` (kohya and PEFT files): every module's effective
     delta B @ A * scale must equal the trained one;
 (b) checked against re-implementations of ComfyUI's and A1111's key mapping: every key must be loaded and land on
     the module it was trained on;
 (c) metadata, hashes, non-finite refusal and the atomic writer.

Text encoders are wrapped with ``peft.inject_adapter_in_model``: transformers 5.x ``add_adapter`` demands
peft >= 0.22, newer than the peft in this environment. ``get_peft_model_state_dict`` works either way.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re

import pytest
import safetensors
import safetensors.torch
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,  # noqa: E402
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from loader_rules import (a1111_layer_mapping, a1111_lookup, assert_landed_on_trained, check_comfy_unet,  # noqa: E402
                          comfy_clip_key_map, comfy_not_loaded)
from lora_trainer.families._unet import export as kx  # noqa: E402
from lora_trainer.outputs import export as ex  # noqa: E402

RANK, ALPHA = 4, 8.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "time_embedding.linear_1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# ------------------------------------------------------------------------------------------------ tiny models
def sdxl_unet_config(layers_per_block=2, blocks=3, tlpb=(1, 2, 2)):
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (blocks - 1)  # SDXL: plain block first
    up = ("CrossAttnUpBlock2D",) * (blocks - 1) + ("UpBlock2D",)
    return dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
                block_out_channels=(16,) + (32,) * (blocks - 1), layers_per_block=layers_per_block,
                transformer_layers_per_block=tuple(tlpb), attention_head_dim=(2,) + (4,) * (blocks - 1),
                cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=16 + 6 * 8)


def sd15_unet_config():
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=16,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(16, 16, 32, 32), norm_num_groups=8, attention_head_dim=2)


def clip_config():
    return CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          vocab_size=100, max_position_embeddings=16, projection_dim=16, bos_token_id=0,
                          eos_token_id=2, pad_token_id=1)


def tiny_vae():
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                         layers_per_block=1)


def randomize_lora_b(model):
    # PEFT zero-initialises lora_B even with init_lora_weights="gaussian"; a zero delta would hide any mapping error.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)


def lora_config(targets):
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="gaussian")


def lora_unet(cfg, seed):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg)
    unet.add_adapter(lora_config(UNET_TARGETS))
    randomize_lora_b(unet)
    return unet


def lora_te(cls, seed):
    torch.manual_seed(seed)
    te = cls(clip_config())
    inject_adapter_in_model(lora_config(TE_TARGETS), te)
    randomize_lora_b(te)
    return te


@torch.no_grad()
def deltas(model):
    """{module path: B @ A * scaling} for every PEFT LoRA layer (convs: 1x1 B, so flatten-matmul-reshape)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and len(mod.lora_A) > 0:
            (adapter,) = list(mod.lora_A.keys())
            a, b = mod.lora_A[adapter].weight.float(), mod.lora_B[adapter].weight.float()
            weight = mod.get_base_layer().weight
            out[name.removeprefix("text_model.")] = (b.flatten(1) @ a.flatten(1)).reshape(weight.shape) \
                * mod.scaling[adapter]
    return out


def assert_same_deltas(trained, loaded, what):
    want, got = deltas(trained), deltas(loaded)
    assert want, f"{what}: nothing trained"
    assert set(got) == set(want), f"{what}: modules differ: {sorted(set(got) ^ set(want))[:5]}"
    for k in want:  # fp16 export: ~1e-3 relative error allowed; a wrong module or scale is off by O(1)
        torch.testing.assert_close(got[k], want[k], rtol=1e-2, atol=2e-3 * float(want[k].abs().max()),
                                   msg=lambda m: f"{what} {k}: {m}")


class Trained:
    def __init__(self, family):
        self.family = family
        if family == "sdxl":
            self.cfg = sdxl_unet_config()
            self.unet = lora_unet(self.cfg, 0)
            self.tes = {"text_encoder": lora_te(CLIPTextModel, 1), "text_encoder_2": lora_te(CLIPTextModelWithProjection, 2)}
        else:
            self.cfg = sd15_unet_config()
            self.unet = lora_unet(self.cfg, 0)
            self.tes = {"text_encoder": lora_te(CLIPTextModel, 1)}
        self.models = {"unet": self.unet, **self.tes}
        self.states = {k: get_peft_model_state_dict(m) for k, m in self.models.items()}

    def fresh_pipeline(self):
        torch.manual_seed(7)
        unet = UNet2DConditionModel(**self.cfg)
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=tiny_vae(), text_encoder=CLIPTextModel(clip_config()),
                text_encoder_2=CLIPTextModelWithProjection(clip_config()), tokenizer=None, tokenizer_2=None,
                unet=unet, scheduler=EulerDiscreteScheduler())
        return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(clip_config()), tokenizer=None,
                                       unet=unet, scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def trained():
    return {f: Trained(f) for f in ("sdxl", "sd15")}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = {}
    for family, t in trained.items():
        d = tmp_path_factory.mktemp(family)
        md = ex.build_metadata(family=family, rank=RANK, alpha=ALPHA, output_name="tiny", trigger_words=["ohwx"],
                               tag_frequency={"10_ohwx": {"ohwx": 3}}, resolution=(64, 64), training={"steps": 5})
        # SD1.5 passes the trainer's LoraConfigs; SDXL exercises the config built from the weights.
        configs = {k: lora_config(UNET_TARGETS if k == "unet" else TE_TARGETS) for k in t.models} \
            if family == "sd15" else None
        info = ex.export_lora(d, "tiny", family, t.states, alpha=ALPHA, rank=RANK, unet_config=t.unet.config,
                              metadata=md, lora_configs=configs)
        out[family] = info
    return out


def kohya_modules(path):
    sd = safetensors.torch.load_file(path)
    return sd, sorted({k.split(".", 1)[0] for k in sd})


# ------------------------------------------------------------------------------------ (a) diffusers round trip
@pytest.mark.parametrize("family", ["sdxl", "sd15"])
@pytest.mark.parametrize("which", ["kohya_path", "peft_path"])
def test_diffusers_round_trip(trained, exported, family, which):
    t, pipe = trained[family], trained[family].fresh_pipeline()
    pipe.load_lora_weights(exported[family][which])
    assert_same_deltas(t.unet, pipe.unet, f"{family} {which} unet")
    assert_same_deltas(t.tes["text_encoder"], pipe.text_encoder, f"{family} {which} te1")
    if family == "sdxl":
        assert_same_deltas(t.tes["text_encoder_2"], pipe.text_encoder_2, f"{family} {which} te2")
    scales = {s for m in pipe.unet.modules() if hasattr(m, "scaling") for s in m.scaling.values()}
    assert scales == {ALPHA / RANK}  # alpha != rank survived


def test_sdxl_kohya_names_are_sgm(exported):
    sd, names = kohya_modules(exported["sdxl"]["kohya_path"])
    unet = [n for n in names if n.startswith("lora_unet_")]
    assert not [n for n in unet if re.search(r"down_blocks|mid_block|up_blocks", n)]
    for expected in ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # first cross-attn level
                     "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_out_0",
                     "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2",
                     "lora_unet_output_blocks_2_1_transformer_blocks_1_attn1_to_k",
                     "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_3_0_op",  # up/down samplers
                     "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_output_blocks_8_0_skip_connection",
                     "lora_unet_middle_block_2_emb_layers_1", "lora_unet_input_blocks_0_0", "lora_unet_out_2",
                     "lora_unet_time_embed_0", "lora_te1_text_model_encoder_layers_1_mlp_fc2",
                     "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]:
        assert expected in names
    assert all(float(sd[f"{n}.alpha"]) == ALPHA for n in names)


# diffusers' _maybe_map_sgm_blocks_to_diffusers collects keys by substring ("input_blocks_1" also matches
# "input_blocks_10_..."), so it cannot load layouts with 10+ input/output blocks (SDXL has 9): those are checked
# with ComfyUI's mapping only.
@pytest.mark.parametrize("layers_per_block,blocks,diffusers_can_load",
                         [(1, 3, True), (1, 4, True), (3, 2, True), (3, 3, False), (2, 4, False)])
def test_sgm_mapping_other_layouts(tmp_path, layers_per_block, blocks, diffusers_can_load):
    """Any layers_per_block / block count: ComfyUI must map every name onto the trained module, and diffusers' own
    SGM remapper (driven by the UNet config) must put every delta back on its module."""
    cfg = sdxl_unet_config(layers_per_block, blocks, (1,) + (2,) * (blocks - 1))
    unet = lora_unet(cfg, 3)
    states = {"unet": get_peft_model_state_dict(unet)}
    sd = kx.kohya_state_dict("sdxl", states, alpha=ALPHA, rank=RANK, unet_config=unet.config)
    check_comfy_unet(unet, sd, states["unet"])
    if diffusers_can_load:
        path = tmp_path / "k.safetensors"
        ex.save_safetensors_atomic(sd, path)
        fresh = UNet2DConditionModel(**cfg)
        lsd, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=fresh.config)
        StableDiffusionXLPipeline.load_lora_into_unet(lsd, alphas, fresh)
        assert_same_deltas(unet, fresh, f"lpb={layers_per_block} blocks={blocks}")


# ----------------------------------------------------------------- (b) ComfyUI key rules (comfy/utils.py, lora.py)
@pytest.mark.parametrize("family", ["sdxl", "sd15", "sd2"])
def test_comfyui_loads_every_key(trained, family):
    t = trained["sd15" if family == "sd2" else family]  # SD2 uses SD1.5's UNet layout and naming rules
    sd = kx.kohya_state_dict(family, t.states, alpha=ALPHA, rank=RANK, unet_config=t.unet.config)
    check_comfy_unet(t.unet, sd, t.states["unet"])
    te_sd = {k: v for k, v in sd.items() if not k.startswith("lora_unet_")}
    key_map = comfy_clip_key_map(family, t.tes)
    assert te_sd and comfy_not_loaded(te_sd, key_map) == []
    landed = set()
    for name in {k.split(".", 1)[0] for k in te_sd}:
        component, path = key_map[name]
        assert_landed_on_trained(te_sd, name, t.states[component], path)
        landed.add((component, path))
    assert landed == {(c, k.rsplit(".lora_A", 1)[0].removeprefix("text_model."))
                      for c, st in t.states.items() if c != "unet" for k in st if ".lora_A." in k}


def test_sgm_names_on_sd15_layout(trained):
    """The SGM mapping is layout-generic: on SD1.5's layout (up_blocks.0 is a plain UpBlock2D whose upsampler sits
    at output_blocks.2.1, not .2.2) ComfyUI must still land every module."""
    t = trained["sd15"]
    sd = kx.kohya_state_dict("sdxl", {"unet": t.states["unet"]}, alpha=ALPHA, rank=RANK, unet_config=t.unet.config)
    assert "lora_unet_output_blocks_2_1_conv.lora_up.weight" in sd
    check_comfy_unet(t.unet, sd, t.states["unet"])


def test_comfyui_ignores_names_without_text_model_level(trained):
    # The pitfall the export avoids: transformers 5.x CLIPTextModel paths lack "text_model.".
    assert "encoder.layers.0.self_attn.q_proj.lora_A.weight" in trained["sd15"].states["text_encoder"]
    key_map = comfy_clip_key_map("sd15", trained["sd15"].tes)
    assert "lora_te_encoder_layers_0_self_attn_q_proj" not in key_map
    assert kx.kohya_module_name("sd15", "text_encoder", "encoder.layers.0.self_attn.q_proj") in key_map


# ------------------------------------------------------------- (b) A1111 key rules (extensions-builtin/Lora)
@pytest.mark.parametrize("family", ["sdxl", "sd15", "sd2"])
def test_a1111_matches_every_key(trained, family):
    t = trained["sd15" if family == "sd2" else family]
    sd = kx.kohya_state_dict(family, t.states, alpha=ALPHA, rank=RANK, unet_config=t.unet.config)
    mapping = a1111_layer_mapping(family, t.unet, t.tes)
    failed, landed = [], {}
    for name in {k.split(".", 1)[0] for k in sd}:  # load_network splits each key at its first "."
        module = a1111_lookup(name, mapping, is_sd2=family == "sd2")
        if module is None:
            failed.append(name)
        else:
            landed[name] = module
    assert failed == []
    trained_modules = {(c, k.rsplit(".lora_A", 1)[0].removeprefix("text_model."))
                       for c, st in t.states.items() for k in st if ".lora_A." in k}
    for name, (c, target) in landed.items():
        if isinstance(target, tuple):  # OpenCLIP fuses q/k/v into one MultiheadAttention; the suffix picks the part
            target = target["qkv".index(name[-6])]
        assert_landed_on_trained(sd, name, t.states[c], target)
        landed[name] = (c, target)
    assert set(landed.values()) == trained_modules


# ------------------------------------------------------------------------------------- (c) metadata and files
def test_kohya_metadata(exported):
    with safetensors.safe_open(exported["sdxl"]["kohya_path"], "pt") as f:
        md = f.metadata()
    assert ex.LORA_ADAPTER_METADATA_KEY not in md  # diffusers would then reject network alphas + metadata
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert md["ss_network_alpha"] == "8.0" and json.loads(md["ss_network_args"]) == {}
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["ss_output_name"] == "tiny" and md["ss_steps"] == "5" and md["ss_resolution"] == "(64, 64)"
    assert json.loads(md["ss_tag_frequency"]) == {"10_ohwx": {"ohwx": 3}}
    assert md["modelspec.sai_model_spec"] == "1.0.0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert md["modelspec.title"] == "tiny" and md["modelspec.resolution"] == "64x64"
    assert md["modelspec.prediction_type"] == "epsilon" and md["modelspec.trigger_phrase"] == "ohwx"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", md["modelspec.date"])
    float(md["ss_training_started_at"])
    assert all(isinstance(v, str) for v in md.values())


def test_metadata_families():
    common = dict(rank=8, alpha=4, output_name="o", trigger_words=["a", " b "], tag_frequency={},
                  resolution=(768, 512), training={"learning_rate": 1e-4, "ss_seed": 3, "unet_lr": None},
                  network_args={"conv_dim": "4"}, started_at=1_700_000_000.0)
    sd1 = ex.build_metadata(family="sd15", **common)
    assert sd1["ss_base_model_version"] == "sd_v1" and sd1["ss_v2"] == "False"
    assert sd1["modelspec.architecture"] == "stable-diffusion-v1/lora" and sd1["modelspec.implementation"] == "diffusers"
    assert sd1["ss_learning_rate"] == "0.0001" and sd1["ss_seed"] == "3" and "ss_unet_lr" not in sd1
    assert sd1["ss_network_args"] == '{"conv_dim": "4"}' and sd1["modelspec.trigger_phrase"] == "a, b"
    assert sd1["modelspec.resolution"] == "768x512" and sd1["ss_training_started_at"] == "1700000000.0"
    v = ex.build_metadata(family="sd2", prediction_type="v_prediction", **common)
    assert v["ss_base_model_version"] == "sd_v2" and v["ss_v2"] == "True" and v["ss_v_parameterization"] == "True"
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and v["modelspec.prediction_type"] == "v"
    eps = ex.build_metadata(family="sd2", **common)
    assert eps["modelspec.architecture"] == "stable-diffusion-v2-512/lora"


def test_peft_file_adapter_metadata(exported):
    for family in ("sdxl", "sd15"):
        with safetensors.safe_open(exported[family]["peft_path"], "pt") as f:
            md, keys = f.metadata(), list(f.keys())
        cfg = json.loads(md[ex.LORA_ADAPTER_METADATA_KEY])
        for comp in ("unet", "text_encoder") + (("text_encoder_2",) if family == "sdxl" else ()):
            assert cfg[f"{comp}.r"] == RANK and cfg[f"{comp}.lora_alpha"] == ALPHA and cfg[f"{comp}.target_modules"]
        assert all(k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model.")) for k in keys)


def test_hashes_match_written_file(exported):
    path = exported["sdxl"]["kohya_path"]
    raw = open(path, "rb").read()
    header = int.from_bytes(raw[:8], "little")
    with safetensors.safe_open(path, "pt") as f:
        md = f.metadata()
    assert md["sshs_model_hash"] == hashlib.sha256(raw[8 + header:]).hexdigest()
    sd = safetensors.torch.load_file(path)
    ss_only = safetensors.torch.save(sd, {k: v for k, v in md.items() if k.startswith("ss_")})
    assert len(ss_only) < 0x100000, "this file is too small for the legacy hash: see the next test"
    first = next(iter(sd))
    sd[first] = sd[first] + 1
    assert ex.add_hashes(sd, md)["sshs_model_hash"] != md["sshs_model_hash"]


def _sd_scripts_legacy_hash(buf: bytes) -> str:
    """sd-scripts' addnet_hash_legacy: seek to 1 MiB, hash the next 64 KiB, first 8 hex digits."""
    fh = io.BytesIO(buf)
    fh.seek(0x100000)
    window = fh.read(0x10000)
    assert len(window) == 0x10000, "the window must lie inside the file, or both sides hash nothing"
    return hashlib.sha256(window).hexdigest()[:8]


def test_legacy_hash_of_a_file_past_the_window(tmp_path):
    # A 1.5 MiB kohya file (one rank-96 module pair of a 4096-wide layer): the legacy hash reads real tensor bytes.
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    kohya = {f"{name}.lora_down.weight": torch.randn(96, 4096, generator=g).half(),
             f"{name}.lora_up.weight": torch.randn(4096, 96, generator=g).half(), f"{name}.alpha": torch.tensor(96.0)}
    md = {"ss_network_dim": "96", "ss_output_name": "big", "modelspec.title": "big"}
    info = ex.export_lora(tmp_path, "big", "sdxl", {}, alpha=96, rank=96, unet_config=None, metadata=md, kohya=kohya)
    raw = open(info["kohya_path"], "rb").read()
    assert len(raw) > 0x110000
    with safetensors.safe_open(info["kohya_path"], "pt") as f:
        written = f.metadata()
    sd = safetensors.torch.load_file(info["kohya_path"])
    ss_only = safetensors.torch.save(sd, {k: v for k, v in written.items() if k.startswith("ss_")})
    assert written["sshs_legacy_hash"] == _sd_scripts_legacy_hash(ss_only)
    # The window holds tensor values: changing the element at 1 MiB + 256 changes the hash.
    n = int.from_bytes(ss_only[:8], "little")
    at = 0x100000 + 0x100 - 8 - n  # offset into the data section
    key, (start, _) = next((k, v["data_offsets"]) for k, v in json.loads(ss_only[8:8 + n]).items()
                           if k != "__metadata__" and v["data_offsets"][0] <= at < v["data_offsets"][1])
    changed = sd[key].clone()
    changed.view(-1)[(at - start) // changed.element_size()] += 1
    assert ex.add_hashes({**sd, key: changed}, written)["sshs_legacy_hash"] != written["sshs_legacy_hash"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])  # 1e6 overflows fp16 to Inf
def test_non_finite_refused_nothing_written(trained, tmp_path, bad):
    states = {k: dict(v) for k, v in trained["sd15"].states.items()}
    key = next(k for k in states["unet"] if k.endswith("lora_B.weight"))
    states["unet"][key] = states["unet"][key].clone()
    states["unet"][key].view(-1)[0] = bad
    with pytest.raises(ValueError, match=r"lora_unet_\w+\.lora_up\.weight"):
        ex.export_lora(tmp_path, "x", "sd15", states, alpha=ALPHA, rank=RANK, unet_config=None,
                       metadata={"ss_output_name": "x"})
    assert os.listdir(tmp_path) == []


def test_atomic_writer(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    ex.save_safetensors_atomic({"w": torch.ones(2)}, path, {"k": "v"})
    ex.save_safetensors_atomic({"w": torch.zeros(3)}, path, {"k": "v2"})
    assert os.listdir(tmp_path) == ["a.safetensors"]
    assert safetensors.torch.load_file(path)["w"].tolist() == [0.0, 0.0, 0.0]

    def crash(fd):  # the temp file is written but cannot be flushed to disk: a full disk
        raise OSError("disk full")
    monkeypatch.setattr(ex.os, "fsync", crash)
    with pytest.raises(OSError):
        ex.save_safetensors_atomic({"w": torch.ones(5)}, path)
    assert os.listdir(tmp_path) == ["a.safetensors"]  # old file intact, temp removed
    assert safetensors.torch.load_file(path)["w"].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="'bad'"):
        ex.save_safetensors_atomic({"ok": torch.ones(1), "bad": torch.tensor([float("nan")])}, tmp_path / "b.safetensors")
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_refusals(trained):
    st = trained["sd15"].states
    with pytest.raises(ValueError, match="rank"):
        kx.kohya_state_dict("sd15", st, alpha=ALPHA, rank=8)
    with pytest.raises(ValueError, match="unsupported PEFT key"):
        kx.kohya_state_dict("sd15", {"unet": {"a.to_q.lora_B.bias": torch.ones(1)}}, alpha=1, rank=1)
    with pytest.raises(ValueError, match="needs both lora_A and lora_B"):
        kx.kohya_state_dict("sd15", {"unet": {"a.to_q.lora_magnitude_vector": torch.ones(1)}}, alpha=1, rank=1)
    with pytest.raises(ValueError, match="not part of a sd15"):
        kx.kohya_state_dict("sd15", {"text_encoder_2": st["text_encoder"]}, alpha=ALPHA, rank=RANK)
    with pytest.raises(ValueError, match="no SGM"):
        kx.kohya_module_name("sdxl", "unet", "down_blocks.9.attentions.0.proj_in", sdxl_unet_config())
