"""DoRA (``use_dora: true``): the exported files and a real training run.

PEFT's DoRA layer computes W' = m * (W + s*B@A) / ||W + s*B@A||, norm per output channel. The tests check that
 (a) diffusers, loading ``pytorch_lora_weights.safetensors``, reproduces every trained layer's output;
 (b) the kohya file's ``dora_scale`` has the layout ComfyUI/Forge read as output-axis DoRA, every key is consumed,
     and ComfyUI's weight_decompose (with the adapted-weight norm of PR #15458 / LyCORIS) reproduces the layers;
 (c) the real CLI trains DoRA (magnitudes move), writes both files and checkpoints, and resumes exactly.
Base weights matter for DoRA (m is divided by the norm of W + dW), so loaders get the trained model's base weights.
"""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import safetensors
import safetensors.torch
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import (EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,  # noqa: E402
                       UNet2DConditionModel)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from conftest import run_cli, write_config  # noqa: E402
from loader_rules import (check_comfy_unet, comfy_clip_key_map, comfy_lora_weight, comfy_maps,  # noqa: E402
                          comfy_not_loaded)
from lora_trainer.families._unet import export as kx  # noqa: E402
from lora_trainer.outputs import export as ex  # noqa: E402
from test_export import (ALPHA, RANK, TE_TARGETS, UNET_TARGETS, clip_config, sd15_unet_config,  # noqa: E402
                         sdxl_unet_config, tiny_vae)


def dora_config(targets):
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="gaussian", use_dora=True)


def lora_layers(model):
    return {name: mod for name, mod in model.named_modules() if hasattr(mod, "lora_A") and len(mod.lora_A) > 0}


class DoraTrained:
    """Tiny UNet + CLIP text encoders with DoRA on every Linear/Conv2d kind the trainer can target. lora_B and the
    magnitudes are perturbed after DoRA's init (m = ||W||), so m, ||W|| and ||W + dW|| all differ."""

    def __init__(self, family):
        self.family = family
        self.cfg = sdxl_unet_config() if family == "sdxl" else sd15_unet_config()
        te_classes = {"text_encoder": CLIPTextModel}
        if family == "sdxl":
            te_classes["text_encoder_2"] = CLIPTextModelWithProjection
        torch.manual_seed(0)
        self.models = {"unet": UNet2DConditionModel(**self.cfg)}
        self.models.update({name: cls(clip_config()) for name, cls in te_classes.items()})
        self.te_classes = te_classes
        self.base = {name: copy.deepcopy(m.state_dict()) for name, m in self.models.items()}
        self.models["unet"].add_adapter(dora_config(UNET_TARGETS))
        for name in te_classes:
            inject_adapter_in_model(dora_config(TE_TARGETS), self.models[name])
        with torch.no_grad():
            for m in self.models.values():
                m.eval()  # no lora dropout; the base models have none either
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.normal_(std=0.1)
                    elif "lora_magnitude_vector" in n:
                        p.mul_(1 + 0.2 * torch.randn_like(p))
        self.states = {name: get_peft_model_state_dict(m) for name, m in self.models.items()}

    def fresh_pipeline(self):
        unet = UNet2DConditionModel(**self.cfg)
        unet.load_state_dict(self.base["unet"])
        tes = {}
        for name, cls in self.te_classes.items():
            tes[name] = cls(clip_config())
            tes[name].load_state_dict(self.base[name])
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(vae=tiny_vae(), tokenizer=None, tokenizer_2=None, unet=unet,
                                             scheduler=EulerDiscreteScheduler(), **tes)
        return StableDiffusionPipeline(vae=tiny_vae(), tokenizer=None, unet=unet, scheduler=EulerDiscreteScheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **tes)


@pytest.fixture(scope="module")
def dora():
    return {f: DoraTrained(f) for f in ("sd15", "sdxl")}


def _probe(base_layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = base_layer.weight
    shape = (3, w.shape[1]) if w.dim() == 2 else (2, w.shape[1] * base_layer.groups, 6, 6)
    return torch.randn(shape, generator=g)


def _apply(base_layer, weight, x):
    if weight.dim() == 2:
        return torch.nn.functional.linear(x, weight, base_layer.bias)
    return base_layer._conv_forward(x, weight, base_layer.bias)


def _assert_close(got, want, what):
    # fp16 lora_A/lora_B in the files: ~1e-3 relative; a wrong magnitude, axis or module is off by O(1e-1) or more.
    torch.testing.assert_close(got, want, rtol=1e-2, atol=3e-3 * float(want.abs().max()), msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------- (a) diffusers
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_peft_file_reproduces_every_dora_layer_in_diffusers(dora, family, tmp_path):
    t = dora[family]
    md = ex.build_metadata(family=family, rank=RANK, alpha=ALPHA, output_name="d", trigger_words=["ohwx"],
                           tag_frequency={}, resolution=(64, 64), training={}, dora=True)
    info = ex.export_lora(tmp_path, "d", family, t.states, alpha=ALPHA, rank=RANK, unet_config=t.cfg, metadata=md)
    with safetensors.safe_open(info["peft_path"], "pt") as f:
        adapter_cfg = json.loads(f.metadata()[ex.LORA_ADAPTER_METADATA_KEY])
    assert all(adapter_cfg[f"{c}.use_dora"] is True for c in t.models)

    pipe = t.fresh_pipeline()
    pipe.load_lora_weights(info["peft_path"])
    loaded_models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder,
                     "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    for comp, trained in t.models.items():
        want_layers, got_layers = lora_layers(trained), lora_layers(loaded_models[comp])
        assert set(got_layers) == set(want_layers) and want_layers, comp
        for name, want in want_layers.items():
            got = got_layers[name]
            assert all(got.use_dora.values()), f"{comp}.{name} loaded as plain LoRA"
            x = _probe(want.get_base_layer())
            with torch.no_grad():
                _assert_close(got(x), want(x), f"{comp}.{name}")


# --------------------------------------------------------------------------------------- (b) ComfyUI / Forge
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_file_is_output_axis_dora_that_comfyui_applies(dora, family):
    t = dora[family]
    sd = kx.kohya_state_dict(family, t.states, alpha=ALPHA, rank=RANK, unet_config=t.cfg)
    names = {k.split(".", 1)[0] for k in sd}
    assert all(f"{n}.dora_scale" in sd for n in names)
    for n in names:
        scale, down, up = sd[f"{n}.dora_scale"], sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"]
        assert scale.dtype == torch.float32 and scale.shape == (up.shape[0],) + (1,) * (down.dim() - 1), n

    # Every key (dora_scale included) is consumed by ComfyUI's loader and lands on its trained module.
    check_comfy_unet(t.models["unet"], sd, t.states["unet"])
    tes = {c: m for c, m in t.models.items() if c != "unet"}
    clip_map = comfy_clip_key_map(family, tes)
    te_sd = {k: v for k, v in sd.items() if not k.startswith("lora_unet_")}
    assert te_sd and comfy_not_loaded(te_sd, clip_map) == []

    # ComfyUI's patched weight reproduces each PEFT layer's output, with the normalisation LyCORIS and PEFT use.
    key_map, s2d = comfy_maps(t.models["unet"])
    targets = {n: ("unet", s2d[key_map[n]]) for n in names if n.startswith("lora_unet_")}
    targets.update({n: clip_map[n] for n in names if not n.startswith("lora_unet_")})
    flat_breaks, ratios = 0, []
    for n, (comp, path) in targets.items():
        model = t.models[comp]
        layers = lora_layers(model)
        layer = layers.get(path) or layers["text_model." + path]  # CLIPTextModelWithProjection keeps text_model.
        base = layer.get_base_layer()
        w = base.weight.detach()
        fixed = comfy_lora_weight(w, sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"],
                                  float(sd[f"{n}.alpha"]), sd[f"{n}.dora_scale"], normalise_adapted=True)
        x = _probe(base)
        with torch.no_grad():
            _assert_close(_apply(base, fixed, x), layer(x), f"ComfyUI {n}")
        # ComfyUI/Forge as released: same direction, rows scaled by ||W + dW|| / ||W|| (README "DoRA").
        today = comfy_lora_weight(w, sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"],
                                  float(sd[f"{n}.alpha"]), sd[f"{n}.dora_scale"])
        # So each output channel of the layer is PEFT's times ||W + dW|| / ||W|| (W + dW from the file's up, down
        # and alpha): ComfyUI users get exactly that. The ratio must differ from 1, or this would prove nothing.
        up, down = sd[f"{n}.lora_up.weight"].float(), sd[f"{n}.lora_down.weight"].float()
        adapted = w.float() + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * float(sd[f"{n}.alpha"]) / down.shape[0]
        ratio = adapted.flatten(1).norm(dim=1) / w.float().flatten(1).norm(dim=1)
        ratios.append(ratio)
        per_channel = (1, -1) if w.dim() == 2 else (1, -1, 1, 1)
        bias = (base.bias if base.bias is not None else torch.zeros(w.shape[0])).reshape(per_channel)
        with torch.no_grad():
            _assert_close(_apply(base, today, x) - bias, (layer(x) - bias) * ratio.reshape(per_channel),
                          f"ComfyUI as released {n}")
        # Negative control: PEFT's own flat [out] magnitude would not survive ComfyUI's broadcasting.
        flat = sd[f"{n}.dora_scale"].flatten()
        try:
            wrong = comfy_lora_weight(w, sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"],
                                      float(sd[f"{n}.alpha"]), flat, normalise_adapted=True)
            flat_breaks += not torch.allclose(wrong, fixed, rtol=1e-3, atol=1e-5)
        except ValueError:
            flat_breaks += 1
    assert flat_breaks == len(targets)
    assert float((torch.cat(ratios) - 1).abs().max()) > 1e-2, "the released-ComfyUI check needs ||W + dW|| != ||W||"


def test_dora_metadata():
    md = ex.build_metadata(family="sdxl", rank=4, alpha=4, output_name="d", trigger_words=[], tag_frequency={},
                           resolution=(64, 64), training={}, network_args={"dropout": 0.0}, dora=True)
    assert md["ss_network_module"] == "lycoris.kohya"
    assert json.loads(md["ss_network_args"]) == {"dropout": 0.0, "algo": "lora", "dora_wd": "True", "wd_on_out": "True"}
    plain = ex.build_metadata(family="sdxl", rank=4, alpha=4, output_name="d", trigger_words=[], tag_frequency={},
                              resolution=(64, 64), training={})
    assert plain["ss_network_module"] == "networks.lora" and json.loads(plain["ss_network_args"]) == {}


# --------------------------------------------------------------------------------------------- (c) the CLI
def _dora_config(tmp_path, model, dataset, out, **extra):
    return write_config(tmp_path / f"{out}.json", dataset_path=str(dataset), base_model=str(model),
                        output_path=str(tmp_path / out), trigger_words=["ohwx"], resolution=64, max_train_steps=6,
                        checkpointing_steps=3, lora_rank=4, lora_alpha=8, learning_rate=5e-3, use_dora=True,
                        train_text_encoder=True, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                        seed=11, **extra)


def test_dora_training_end_to_end_and_exact_resume(tmp_path, tiny_models, dataset):
    model = tiny_models["sd15"]
    cfg = _dora_config(tmp_path, model, dataset, "run")
    check = run_cli("--config", str(cfg), "--validate-only")
    assert check.returncode == 0 and any(w["code"] == "dora_loaders" for w in check.last("validation")["warnings"])

    run = run_cli("--config", str(cfg))
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(e.get("code") == "dora_loaders" for e in run.of_type("warning"))
    out = tmp_path / "run"
    kohya = safetensors.torch.load_file(out / "lora.safetensors")
    modules = {k.split(".", 1)[0] for k in kohya}
    assert modules and all(f"{m}.dora_scale" in kohya for m in modules)
    assert any(m.startswith("lora_te_") for m in modules)
    with safetensors.safe_open(out / "lora.safetensors", "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
    ckpt = out / "checkpoints" / "step-000003"
    assert any(k.endswith(".dora_scale") for k in safetensors.torch.load_file(ckpt / "lora.safetensors"))

    # diffusers, from the PEFT file, gets exactly the magnitudes the final checkpoint holds, and training moved
    # them away from DoRA's initial value ||W|| (the magnitude is trained, not frozen).
    final = safetensors.torch.load_file(out / "checkpoints" / "step-000006" / "lora_unet.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    base_norms = {n: m.weight.detach().flatten(1).norm(dim=1) for n, m in pipe.unet.named_modules()
                  if n.endswith(("to_q", "conv1"))}
    pipe.load_lora_weights(out / "pytorch_lora_weights.safetensors")
    moved = 0
    for name, layer in lora_layers(pipe.unet).items():
        assert all(layer.use_dora.values()), name
        (mag,) = [p.weight.detach() for p in layer.lora_magnitude_vector.values()]
        assert torch.equal(mag.float(), final[f"{name}.lora_magnitude_vector"].float()), name
        if name in base_norms:
            moved += not torch.allclose(mag.flatten(), base_norms[name], rtol=1e-4)
    assert moved > 0
    assert lora_layers(pipe.text_encoder)

    # The manifest's record of how far current ComfyUI/Forge normalisation is from PEFT's: recomputed here from
    # the kohya file and the base UNet and text encoder, both ends (a one-sided check would pass min 0, max 1e9).
    drift = json.loads((out / "training_manifest.json").read_text())["dora_comfyui_row_scale"]
    assert drift["layers"] == len(modules)
    base_pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    _, s2d = comfy_maps(base_pipe.unet)
    bases = {"lora_unet_" + d.replace(".", "_"): base_pipe.unet.get_submodule(d) for d in s2d.values()}
    for n, m in base_pipe.text_encoder.named_modules():  # kohya names say text_model.; newer transformers do not
        bases["lora_te_" + ("" if n.startswith("text_model.") else "text_model_") + n.replace(".", "_")] = m
    ratios = []
    for m in modules:
        w = bases[m].weight.detach().float()
        dw = (kohya[f"{m}.lora_up.weight"].float().flatten(1) @ kohya[f"{m}.lora_down.weight"].float().flatten(1))
        dw = dw.reshape(w.shape) * float(kohya[f"{m}.alpha"]) / kohya[f"{m}.lora_down.weight"].shape[0]
        ratios.append((w + dw).flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1))
    ratios = torch.cat(ratios)
    # fp16 up/down in the file against the manifest's float32: a few 1e-4 at most on a ratio near 1.
    assert abs(drift["min"] - float(ratios.min())) < 2e-3 and abs(drift["max"] - float(ratios.max())) < 2e-3, \
        (drift, float(ratios.min()), float(ratios.max()))
    assert drift["max"] > 1 + 1e-4 or drift["min"] < 1 - 1e-4  # training moved the directions

    # Resuming from the step-3 checkpoint in another folder continues exactly: the same final files, bitwise.
    shutil.copytree(ckpt, tmp_path / "step-000003")
    resumed = run_cli("--config", str(_dora_config(tmp_path, model, dataset, "resumed",
                                                   resume=str(tmp_path / "step-000003"))))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.last("resumed")["step"] == 3
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        a = safetensors.torch.load_file(out / name)
        b = safetensors.torch.load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
