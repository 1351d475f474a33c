"""LoKr and LoHa (``network_type``): training through the CLI, exact resume, and files every consumer applies exactly.

(a) sd15 (a UNet family, text encoder and convs too) trains LoKr; (b) FLUX.1 (a flow transformer whose ComfyUI
weights fuse q/k/v) trains LoHa. For both: --validate-only's memory plan counts exactly the parameters trained; the
tool file is consumed completely by ComfyUI's key maps, and ComfyUI's own LoKr / LoHa reconstruction
(tests/lycoris_rules.py) of every module, applied to ComfyUI's (fused) weights, equals the trained delta; the PEFT
file loads in diffusers (LoKr, model-level load_lora_adapter) or PEFT (LoHa: diffusers has no LoHa loader) with the
trained delta; resuming from a checkpoint ends bitwise where the uninterrupted run did. Then the other half of the
matrix (LoKr on FLUX.1, LoHa with Tucker convs on a UNet) without the CLI, and the refusals.
"""
from __future__ import annotations

import json
import shutil

import pytest
import safetensors
import safetensors.torch
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import run_cli, write_config  # noqa: E402
from lycoris_rules import comfy_delta, not_loaded, prefixes  # noqa: E402

SAVE = "fp32"  # the files hold the factors as trained (to fp32 rounding), so the deltas compare tightly
RTOL, ATOL = 1e-5, 1e-7


def _config(tmp_path, model, dataset, out, **extra):
    fields = dict(dataset_path=str(dataset), base_model=str(model), output_path=str(tmp_path / out),
                  trigger_words=["ohwx"], resolution=64, max_train_steps=4, checkpointing_steps=2,
                  learning_rate=5e-3, save_precision=SAVE, seed=7)
    return write_config(tmp_path / f"{out}.json", **{**fields, **extra})


def _adapted(model):
    """module path -> PEFT LoKr / LoHa layer of a model."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "r")
            and ("default" in getattr(m, "lokr_w1", {}) or "default" in getattr(m, "lokr_w1_a", {})
                 or "default" in getattr(m, "hada_w1_a", {}))}


def _adapt(model, cfg_fields, targets):
    """``model`` given the run's adapters on ``targets`` (adapters/lora.add_lora, as training does)."""
    from lora_trainer.adapters.lora import add_lora
    from lora_trainer.adapters.lycoris import Network

    net = Network(cfg_fields["network_type"], cfg_fields.get("lokr_factor", -1),
                  cfg_fields.get("lokr_decompose_both", False), cfg_fields.get("lycoris_effective_conv", False))
    add_lora(model, rank=cfg_fields["lora_rank"], alpha=cfg_fields["lora_alpha"], dropout=0.0,
             targets=tuple(targets), use_dora=False, path="target_modules", network=net)
    return model


def _deltas(model):
    return {n: m.get_delta_weight("default").detach().float() for n, m in _adapted(model).items()}


def _trained(model, cfg_fields, state):
    """The trained deltas: ``model`` adapted on the modules the checkpoint's PEFT ``state`` holds
    (``cfg_fields["targets"]`` without one), then that state -> {module path: fp32 delta}."""
    from peft.utils import set_peft_model_state_dict

    _adapt(model, cfg_fields, sorted({k.rsplit(".", 1)[0] for k in state}) or cfg_fields["targets"])
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    assert not getattr(result, "unexpected_keys", None)
    return _deltas(model)


def _close(got, want, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.allclose(got, want, rtol=RTOL, atol=ATOL), (what, float((got - want).abs().max()),
                                                             float(want.abs().max()))


def _metadata(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata()


def _resume_matches(tmp_path, model, dataset, out, fields):
    """Resuming from the step-2 checkpoint (copied elsewhere) writes the same final files, bitwise."""
    shutil.copytree(out / "checkpoints" / "step-000002", tmp_path / "step-000002")
    resumed = run_cli("--config", str(_config(tmp_path, model, dataset, "resumed", resume=str(tmp_path / "step-000002"),
                                              **fields)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.last("resumed")["step"] == 2
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        a = safetensors.torch.load_file(out / name)
        b = safetensors.torch.load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ------------------------------------------------------------------------------ (a) sd15, LoKr, through the CLI
SD15_LOKR = dict(network_type="lokr", lokr_factor=4, lora_rank=4, lora_alpha=8, train_text_encoder=True,
                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                 offload_blocks=1, gradient_checkpointing=True)  # block streaming combines


def test_lokr_sd15_trains_exports_reconstructs_in_comfyui_loads_in_diffusers_and_resumes(tmp_path, tiny_models,
                                                                                         dataset):
    from diffusers import StableDiffusionPipeline
    from loader_rules import a1111_layer_mapping, a1111_lookup, comfy_clip_key_map, comfy_maps

    model = tiny_models["sd15"]
    cfg = _config(tmp_path, model, dataset, "run", **SD15_LOKR)
    check = run_cli("--config", str(cfg), "--validate-only")
    assert check.returncode == 0, check.stdout[-2000:]
    plan = check.last("validation")["summary"]["memory"]
    run = run_cli("--config", str(cfg))
    assert run.returncode == 0, run.stderr[-3000:]
    forward = run.last("run_started")["lora_forward"]  # LoKr layers keep PEFT's forward (adapters/fused.py)
    assert forward["fused"] == 0 and forward["peft"] > 0, forward
    out = tmp_path / "run"
    ckpt = {c: safetensors.torch.load_file(out / "checkpoints" / "step-000004" / f"lora_{c}.safetensors")
            for c in ("unet", "text_encoder")}
    assert plan["network_type"] == "lokr" and plan["offload"]["blocks"] == 1
    assert plan["lora_params"] == sum(t.numel() for s in ckpt.values() for t in s.values())
    assert all(k.rsplit(".", 1)[1].startswith("lokr_") for s in ckpt.values() for k in s)

    sd = safetensors.torch.load_file(out / "lora.safetensors")
    md = _metadata(out / "lora.safetensors")
    assert md["ss_network_module"] == "lycoris.kohya"
    args = json.loads(md["ss_network_args"])
    assert args["algo"] == "lokr" and args["factor"] == "4" and all(isinstance(v, str) for v in args.values())
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["network_type"] == "lokr" and "LoKr" in (out / "README.md").read_text()
    # Both scale rules are exercised: 32-wide layers get two full factors (the UIs apply scale 1, so alpha / rank is
    # in w1), 64-wide ones a low-rank w2 (the UIs apply alpha / rank from .alpha).
    names = prefixes(sd)
    assert any(f"{x}.lokr_w2" in sd for x in names) and any(f"{x}.lokr_w2_a" in sd for x in names)
    assert all(float(sd[f"{x}.alpha"]) == 8.0 for x in names)

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    key_map, s2d = comfy_maps(pipe.unet)
    te_map = comfy_clip_key_map("sd15", {"text_encoder": pipe.text_encoder})
    assert not_loaded(sd, {**key_map, **te_map}) == []
    mapping = a1111_layer_mapping("sd15", pipe.unet, {"text_encoder": pipe.text_encoder})
    assert [x for x in names if a1111_lookup(x, mapping, False) is None] == []

    want = {c: _trained(getattr(pipe, c), SD15_LOKR, ckpt[c]) for c in ckpt}
    landed = set()
    for x in names:
        if x.startswith("lora_unet_"):
            component, path = "unet", s2d[key_map[x]]
        else:
            component, path = te_map[x]
            path = path if path in want[component] else "text_model." + path
        _close(comfy_delta(sd, x, want[component][path].shape), want[component][path], x)
        landed.add((component, path))
    assert landed == {(c, p) for c, d in want.items() for p in d}

    # diffusers: the PEFT file at model level (the pipeline's load_lora_weights refuses any non-"lora" key).
    fresh = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    fresh.unet.load_lora_adapter(out, weight_name="pytorch_lora_weights.safetensors", prefix="unet",
                                 adapter_name="lokr")
    loaded = {n: m.get_delta_weight("lokr").float() for n, m in fresh.unet.named_modules()
              if "lokr" in getattr(m, "lokr_w1", {}) or "lokr" in getattr(m, "lokr_w1_a", {})}
    assert loaded.keys() == want["unet"].keys()
    for path, delta in loaded.items():
        _close(delta, want["unet"][path], path)

    # init_lora: either file starts a LoKr run from exactly the trained deltas (the scale folded into w1 undone)
    from lora_trainer.adapters.init_lycoris import apply_init_lycoris
    from lora_trainer.families import get_family

    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        again = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
        mods = {c: _adapt(getattr(again, c), SD15_LOKR, sorted({k.rsplit(".", 1)[0] for k in ckpt[c]})) for c in ckpt}
        info = apply_init_lycoris(out / name, get_family("sd15"), mods, {"unet": again.unet.config}, rank=4, alpha=8.0)
        assert info["modules"] == len(names) and info["not_in_file"] == [], name
        for c, m in mods.items():
            got = _deltas(m)
            assert got.keys() == want[c].keys()
            for path, delta in got.items():
                _close(delta, want[c][path], f"init_lora {name} {path}")
    wrong = run_cli("--config", str(_config(tmp_path, model, dataset, "loha", network_type="loha", lora_rank=4,
                                            init_lora=str(out / "lora.safetensors"))), "--validate-only")
    assert [e["path"] for e in wrong.last("validation")["errors"]] == ["network_type"]

    _resume_matches(tmp_path, model, dataset, out, SD15_LOKR)


# ----------------------------------------------------------------------------- (b) FLUX.1, LoHa, through the CLI
FLUX_LOHA = dict(network_type="loha", lora_rank=4, lora_alpha=8, base_quantization="fp8")  # fp8 storage combines


def _comfy_flux_apply(sd, transformer):
    """Apply a FLUX.1 tool file as ComfyUI does (LoraLoaderModelOnly): each prefix's key-map target (fused
    ``img_attn.qkv`` / ``linear1`` slices included) gets comfy_delta; returns {comfy key: summed delta} and the
    diffusers-name -> target map to read each module's slice back."""
    from comfy_dit_rules import comfy_unet_config, flux_to_diffusers, lora_key_map, split_target

    cfg = dict(transformer.config)
    key_map = lora_key_map("flux", cfg)
    assert not_loaded(sd, key_map) == []
    d2c = flux_to_diffusers(comfy_unet_config("flux", cfg), output_prefix="diffusion_model.")
    weights = {n.removesuffix(".base_layer") + ".weight": m.weight for n, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear)}  # an adapted layer keeps its weight in base_layer
    sizes: dict[str, list[int]] = {}
    for dkey, target in d2c.items():
        if dkey in weights:
            key, offset, _ = split_target(target)
            rows = offset[1] + offset[2] if offset else weights[dkey].shape[0]
            sizes[key] = [max(rows, sizes.get(key, [0])[0]), *weights[dkey].shape[1:]]
    comfy = {k: torch.zeros(s) for k, s in sizes.items()}
    for x in prefixes(sd):
        key, offset, _ = split_target(key_map[x])
        w = comfy[key] if offset is None else comfy[key].narrow(offset[0], offset[1], offset[2])
        w += comfy_delta(sd, x, w.shape)  # in place, as ComfyUI patches the (sliced) weight
    return comfy, d2c


def _slice(comfy, target):
    from comfy_dit_rules import split_target

    key, offset, _ = split_target(target)
    return comfy[key] if offset is None else comfy[key].narrow(offset[0], offset[1], offset[2])


def test_loha_flux1_trains_exports_reconstructs_through_fused_qkv_loads_in_peft_and_resumes(tmp_path, tiny_models,
                                                                                             dataset):
    from diffusers import FluxTransformer2DModel
    from peft import LoHaConfig, inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    model = tiny_models["flux1-dev"]
    cfg = _config(tmp_path, model, dataset, "run", **FLUX_LOHA)
    check = run_cli("--config", str(cfg), "--validate-only")
    assert check.returncode == 0, check.stdout[-2000:]
    run = run_cli("--config", str(cfg))
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "run"
    ckpt = safetensors.torch.load_file(out / "checkpoints" / "step-000004" / "lora_transformer.safetensors")
    assert check.last("validation")["summary"]["memory"]["lora_params"] == sum(t.numel() for t in ckpt.values())
    assert json.loads(_metadata(out / "lora.safetensors")["ss_network_args"])["algo"] == "loha"
    assert json.loads((out / "training_manifest.json").read_text())["quantization"]["layers"]["transformer"]["fp8"]

    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    want = _trained(transformer, FLUX_LOHA, ckpt)
    assert any(p.endswith("attn.to_q") for p in want)  # q/k/v: slices of ComfyUI's fused qkv weight

    sd = safetensors.torch.load_file(out / "lora.safetensors")
    comfy, d2c = _comfy_flux_apply(sd, transformer)
    for path, delta in want.items():
        _close(_slice(comfy, d2c[path + ".weight"]), delta, path)
    # and nothing else was patched: the fused weights hold exactly the trained modules' deltas
    assert sum(float(t.abs().sum()) for t in comfy.values()) == pytest.approx(
        sum(float(d.abs().sum()) for d in want.values()), rel=1e-5)

    # diffusers has no LoHa loader; PEFT loads the PEFT file with the config its metadata carries.
    peft_sd = safetensors.torch.load_file(out / "pytorch_lora_weights.safetensors")
    meta = json.loads(_metadata(out / "pytorch_lora_weights.safetensors")["lora_adapter_metadata"])
    fields = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
    fields.pop("peft_type", None)
    fresh = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    inject_adapter_in_model(LoHaConfig(**fields), fresh, adapter_name="default")
    set_peft_model_state_dict(fresh, {k.removeprefix("transformer."): v for k, v in peft_sd.items()},
                              adapter_name="default")
    got = {n: m.get_delta_weight("default").float() for n, m in _adapted(fresh).items()}
    assert got.keys() == want.keys()
    for path, delta in got.items():
        _close(delta, want[path], path)

    _resume_matches(tmp_path, model, dataset, out, FLUX_LOHA)


# ----------------------------------------------------- the rest of the matrix, from random factors (no training)
def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_lokr_on_flux1_fused_qkv_and_loha_tucker_convs_on_a_unet_reconstruct_exactly(tiny_models, tmp_path):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    from lora_trainer.families import get_family
    from lora_trainer.outputs import lycoris
    from lora_trainer.outputs.export import save_safetensors_atomic
    from lora_trainer.outputs.lycoris import adapter_metadata, peft_state_dict, tool_state_dict

    # LoKr, rank 4 and factor 4 on 64-wide layers: w2 low-rank, so .alpha / rank is the UIs' scale (alpha 6: not 1)
    transformer = FluxTransformer2DModel.from_pretrained(tiny_models["flux1-dev"], subfolder="transformer")
    fields = dict(network_type="lokr", lokr_factor=4, lokr_decompose_both=True, lora_rank=4, lora_alpha=6,
                  targets=["to_q", "to_k", "to_v", "add_q_proj", "proj_mlp", "to_out.0"])
    _trained(transformer, fields, {})
    _randomise(transformer)
    want = {n: m.get_delta_weight("default").float() for n, m in _adapted(transformer).items()}
    states = {"transformer": get_peft_model_state_dict(transformer, adapter_name="default")}
    configs = {"transformer": transformer.config}
    sd = tool_state_dict(get_family("flux1"), states, configs, alpha=6.0, rank=4, dtype=torch.float32)
    assert lycoris.is_lycoris(states) and all(k.startswith("transformer.") for k in sd)
    comfy, d2c = _comfy_flux_apply(sd, transformer)
    for path, delta in want.items():
        _close(_slice(comfy, d2c[path + ".weight"]), delta, path)

    # the PEFT file in diffusers: model-level load_lora_adapter, with and without the file's metadata (diffusers
    # infers alpha = rank without it: the scale is in the factors, so both load the trained delta)
    peft_file = tmp_path / "pytorch_lora_weights.safetensors"
    save_safetensors_atomic(peft_state_dict(states, alpha=6.0, rank=4, dtype=torch.float32), peft_file,
                            adapter_metadata(states, {"transformer": transformer.peft_config["default"]}))
    for kwargs in ({"weight_name": peft_file.name}, {}):
        fresh = FluxTransformer2DModel.from_pretrained(tiny_models["flux1-dev"], subfolder="transformer")
        fresh.load_lora_adapter(peft_file.parent if kwargs else peft_file, prefix="transformer",
                                adapter_name="x", **kwargs)
        got = {n: m.get_delta_weight("x").float() for n, m in fresh.named_modules() if "x" in getattr(m, "r", {})}
        assert got.keys() == want.keys()
        for path, delta in got.items():
            _close(delta, want[path], path)

    # LoHa with Tucker 3x3 convs (hada_t1 / hada_t2) and Linear layers on an SD1.5 UNet, kohya names
    unet = UNet2DConditionModel.from_pretrained(tiny_models["sd15"], subfolder="unet")
    fields = dict(network_type="loha", lycoris_effective_conv=True, lora_rank=2, lora_alpha=3,
                  targets=["to_q", "to_out.0", "conv1", "conv2"])
    _trained(unet, fields, {})
    _randomise(unet, 1)
    want = {n: m.get_delta_weight("default").float() for n, m in _adapted(unet).items()}
    states = {"unet": get_peft_model_state_dict(unet, adapter_name="default")}
    assert any(k.endswith("hada_t1") for k in states["unet"])
    sd = tool_state_dict(get_family("sd15"), states, {"unet": unet.config}, alpha=3.0, rank=2, dtype=torch.float32)
    from loader_rules import comfy_maps

    key_map, s2d = comfy_maps(unet)
    assert not_loaded(sd, key_map) == []
    seen = set()
    for x in prefixes(sd):
        path = s2d[key_map[x]]
        _close(comfy_delta(sd, x, want[path].shape), want[path], x)
        seen.add(path)
    assert seen == set(want)


# ------------------------------------------------------------------------------------------------- refusals
def test_lokr_and_loha_are_refused_where_they_cannot_be_exported_or_trained(tmp_path, tiny_models, dataset):
    from lora_trainer.config.config import parse_config
    from lora_trainer.contract.errors import ConfigError
    from lora_trainer.outputs.lycoris import tool_names

    base = dict(dataset_path=str(dataset), base_model="m", output_path=str(tmp_path / "o"), trigger_words=["x"])
    for extra, path in ((dict(network_type="lokr", use_dora=True), "use_dora"),
                        (dict(network_type="loha", base_quantization="nf4"), "base_quantization"),
                        (dict(network_type="lokr", shard_base=True), "shard_base"),
                        (dict(network_type="lokr", lokr_factor=0), "lokr_factor")):
        with pytest.raises(ConfigError) as err:
            parse_config({**base, **extra}, base_dir=tmp_path)
        assert [p["path"] for p in err.value.problems] == [path], extra
    _, warnings = parse_config({**base, "lokr_factor": 8}, base_dir=tmp_path)
    assert [w["path"] for w in warnings if w["code"] == "unused_setting"] == ["lokr_factor"]

    # FLUX.2's tool file fuses q/k/v: refused by --validate-only, before training
    for net, errors in (("lokr", ["network_type"]), ("lora", [])):
        cfg = _config(tmp_path, tiny_models["flux2-klein-4b"], dataset, f"f2{net}", network_type=net)
        res = run_cli("--config", str(cfg), "--validate-only")
        assert [e["path"] for e in res.last("validation")["errors"]] == errors, res.stdout[-2000:]

    # and the export itself refuses a family layout that fuses or reorders modules, instead of writing wrong keys
    class Fusing:
        class spec:
            label = "Fused"

        @staticmethod
        def tool_state_dict(states, configs, *, alpha, rank, dtype):
            parts = [states["transformer"][f"{m}.lora_A.weight"] for m in ("a", "b")]
            b = states["transformer"]["a.lora_B.weight"]
            return {"qkv.lora_down.weight": torch.cat(parts), "qkv.lora_up.weight": torch.cat([b, b], 1)}

    lokr = {f"{m}.{p}": torch.ones(2, 2) for m in ("a", "b") for p in ("lokr_w1", "lokr_w2")}
    with pytest.raises(ValueError, match="fuses or transforms"):
        tool_names(Fusing, {"transformer": lokr}, {})


def test_the_memory_plan_counts_peft_lokr_and_loha_parameters_exactly():
    from types import SimpleNamespace

    from peft import inject_adapter_in_model

    from lora_trainer.adapters.lycoris import Network
    from lora_trainer.config.network import adapter_params

    layers = {"lin": torch.nn.Linear(96, 320), "conv": torch.nn.Conv2d(64, 48, 3), "pw": torch.nn.Conv2d(40, 80, 1)}
    for net in ("lokr", "loha"):
        for factor, both, eff, rank in ((-1, False, False, 4), (8, True, True, 2), (4, False, True, 16)):
            cfg = SimpleNamespace(network_type=net, lokr_factor=factor, lokr_decompose_both=both,
                                  lycoris_effective_conv=eff)
            model = torch.nn.ModuleDict({k: torch.nn.Sequential(v) for k, v in layers.items()})
            conf = Network(net, factor, both, eff).peft_config(rank=rank, alpha=rank, dropout=0.0,
                                                               targets=[f"{k}.0" for k in layers])
            inject_adapter_in_model(conf, model)
            for name, layer in layers.items():
                trained = sum(p.numel() for n, p in model[name].named_parameters() if n.split(".")[1] != "base_layer")
                assert adapter_params(tuple(layer.weight.shape), rank, cfg) == trained, (net, factor, both, eff, name)


@pytest.mark.parametrize("family", __import__("lora_trainer.families", fromlist=["FAMILIES"]).FAMILIES)
def test_every_family_gets_a_lycoris_name_for_every_module_or_is_refused_before_training(tiny_models, family):
    """No family branch: the tool file's names come from each family's own LoRA layout (outputs/lycoris.tool_names),
    for every Linear its all_linear preset adapts and its LoRA'd text encoders; exactly the families whose tool file
    fuses q/k/v (FamilySpec.tool_file_dora, which preflight refuses lokr / loha for) have none."""
    import diffusers
    import transformers
    from peft.utils import get_peft_model_state_dict

    from lora_trainer.adapters.lora import add_lora
    from lora_trainer.adapters.lycoris import Network
    from lora_trainer.families import get_family, get_part, get_spec
    from lora_trainer.outputs.lycoris import tool_names

    spec = get_spec(family)
    path = tiny_models[get_part(family, "tiny").DEFAULT]
    states, configs = {}, {}
    for name in spec.denoisers:
        model = getattr(diffusers, spec.component_classes[name]).from_pretrained(path, subfolder=name)
        add_lora(model, rank=2, alpha=4, dropout=0.0, targets=spec.targets("all_linear"), use_dora=False, path="t",
                 network=Network("lokr"))
        states[name], configs[name] = get_peft_model_state_dict(model, adapter_name="default"), model.config
    for name in spec.lora_text_encoders:
        model = getattr(transformers, spec.component_classes[name]).from_pretrained(path, subfolder=name)
        add_lora(model, rank=2, alpha=4, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "out_proj"),
                 use_dora=False, path="t", network=Network("loha"))
        states[name] = get_peft_model_state_dict(model, adapter_name="default")
    if not spec.tool_file_dora:
        with pytest.raises(ValueError):
            tool_names(get_family(family), states, configs)
        return
    names = tool_names(get_family(family), states, configs)
    modules = {(c, k.rsplit(".", 1)[0]) for c, s in states.items() for k in s}
    assert set(names) == modules and len(set(names.values())) == len(modules)
