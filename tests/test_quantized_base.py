"""A quantised frozen base (base_quantization / text_encoder_quantization: fp8, int8, nf4) on the CPU with the tiny
random models: each format converts the block Linears (and nothing else), gives finite LoRA gradients and keeps LoRA
fp32; each trains through the real CLI with the NaN guard armed; SIGTERM -> resume is bitwise exact (int8); the
exported LoRA loads on the full-precision base in diffusers; two processes (DDP) train; every refusal is a config
error naming the key."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT, lora_deltas, parse_events, run_cli, write_config

FORMATS = ("fp8", "int8", "nf4")
RANK, ALPHA = 4, 8
NAN = {"TRAIN_LORA_TEST_NAN_STEPS": "3"}  # step 3's update is skipped by the NaN guard in every run


def _cfg(tmp: Path, model: Path, data: Path, name: str, **params) -> Path:
    cfg = {"dataset_path": str(data), "base_model": str(model), "output_path": str(tmp / name),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "max_train_steps": 4,
           "checkpointing_steps": 2, "log_every_n_steps": 1, "lora_rank": RANK, "lora_alpha": ALPHA,
           "learning_rate": 2e-3, **params}
    return write_config(tmp / f"{name}.json", **cfg)


# ------------------------------------------------------------------------------------------ in process
def _flux_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))


def _sdxl_inputs(unet):
    g = torch.Generator().manual_seed(0)
    c = unet.config
    text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 8, c.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, text, generator=g), "time_ids": torch.randn(1, 6, generator=g)})


@pytest.mark.parametrize("family", ["flux1-dev", "sdxl"])
def test_each_format_converts_block_linears_and_trains(tiny_models, family):
    """Forward + backward through the quantised denoiser with LoRA on it: every LoRA gradient finite and non-zero,
    LoRA fp32, the block Linears really stored small (an output error above 0 and within the format's bound),
    the input/output layers untouched."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from lora_trainer.families import SPECS
    from lora_trainer.adapters.lora import add_lora
    from lora_trainer.runtime.quantize import after_lora, quantize_module

    cls, sub, spec = ((FluxTransformer2DModel, "transformer", SPECS["flux1"]) if family == "flux1-dev"
                      else (UNet2DConditionModel, "unet", SPECS["sdxl"]))
    errors = {}  # relative output error against the full-precision model

    def run(fmt):
        model = cls.from_pretrained(tiny_models[family], subfolder=sub).requires_grad_(False)
        info = quantize_module(model, fmt) if fmt in ("int8", "nf4") else None
        model.enable_gradient_checkpointing()  # backward recomputes each block through the quantised layers
        torch.manual_seed(0)  # the same LoRA A init in every run: the outputs then differ by the format alone
        params = add_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0, targets=spec.targets("auto"), use_dora=False,
                          path="target_modules")
        for name, p in model.named_parameters():  # B starts at zero: give it values so A gets a gradient too
            if "lora_B" in name:
                p.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        cfg = type("C", (), {"base_quantization": fmt, "text_encoder_quantization": "none"})()
        comps = type("K", (), {"denoisers": {sub: model}})()
        done = after_lora(cfg, comps, {sub: model})  # fp8 casting, then the fp32 check
        out = model(**(_flux_inputs() if family == "flux1-dev" else _sdxl_inputs(model))).sample
        out.square().mean().backward()
        return model, params, out.detach(), info or (done[0] if done else None)

    _, _, reference, _ = run("none")
    for fmt in FORMATS:
        model, params, out, info = run(fmt)
        assert info["layers"] > 0 and info["format"] == fmt
        assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params), fmt
        err = float((out - reference).norm() / reference.norm())
        errors[fmt] = err
        layers = dict(model.named_modules())
        blocks = [n for n in layers if n.endswith("to_q.base_layer") and min(layers[n].in_features, layers[n].out_features) >= 16]
        kind = {"fp8": "Linear", "int8": "Linear", "nf4": "Linear4bit"}[fmt]
        assert blocks and all(type(layers[n]).__name__ == kind for n in blocks)
        w = layers[blocks[0]].weight
        if fmt == "fp8":
            assert w.dtype == torch.float8_e4m3fn
        elif fmt == "int8":
            assert "Int8" in type(w).__name__, type(w)
            assert type(layers[blocks[0][: -len(".base_layer")]]).__name__ == "TorchaoLoraLinear"
        head = layers["proj_out" if family == "flux1-dev" else "time_embedding.linear_1"]
        assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32, "outside the blocks: untouched"
    # Really stored small, and as accurate as each format can be: per-layer errors on random weights are int8 ~0.4%,
    # fp8 e4m3 ~2.5%, NF4 ~9% (reference, section 5), and the whole network keeps that order.
    assert 0 < errors["int8"] < errors["fp8"] < errors["nf4"] < 0.5, errors


def test_lora_fp32_check_fails_loudly():
    from peft import LoraConfig, inject_adapter_in_model

    from lora_trainer.contract.errors import TrainingError
    from lora_trainer.runtime.quantize import check_lora_fp32

    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(16, 16)))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    check_lora_fp32({"unet": model})  # fp32 and trainable: passes
    model[0].lora_A["default"].weight.data = model[0].lora_A["default"].weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(TrainingError, match=r"unet\.0\.lora_A\.default\.weight \(torch\.float8_e4m3fn\)"):
        check_lora_fp32({"unet": model})


def test_a_backend_failure_while_converting_is_a_config_error(monkeypatch):
    from lora_trainer.runtime import loading
    from lora_trainer.runtime import quantize
    from lora_trainer.contract.errors import ConfigError

    def boom(*a, **k):
        raise RuntimeError("no kernel for this layer")

    monkeypatch.setattr(quantize, "quantize_at_load", boom)
    cfg = type("C", (), {"base_quantization": "nf4", "text_encoder_quantization": "none"})()
    with pytest.raises(ConfigError) as exc:
        loading._quantize(cfg, type("F", (), {"spec": None})(), None, None, {}, None)
    assert exc.value.problems[0]["path"] == "base_quantization" and "no kernel" in exc.value.message


# ------------------------------------------------------------------------------------------ refusals
def _preflight(tmp_path, model, data, **params):
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.run import run_preflight

    cfg, warnings = parse_config(json.loads(_cfg(tmp_path, model, data, "v", **params).read_text()))
    return run_preflight(cfg, warnings)


def _errors(pre, key):
    return [e for e in pre.errors if e["path"] == key]


def test_refusals_name_the_key(tmp_path, tiny_models, dataset, monkeypatch):
    import importlib.util

    model = tiny_models["flux1-dev"]
    assert _preflight(tmp_path, model, dataset, base_quantization="nf4", text_encoder_quantization="fp8").ok
    # DoRA on an fp8 layer that carries LoRA (int8 / NF4 DoRA trains: see the SDXL run)
    pre = _preflight(tmp_path, model, dataset, base_quantization="fp8", use_dora=True)
    (err,) = _errors(pre, "base_quantization")
    assert err["code"] == "config_invalid" and "use_dora" in err["message"] and pre.exit_code == 2
    # ... but not on a text encoder that gets no LoRA
    assert not _errors(_preflight(tmp_path, model, dataset, text_encoder_quantization="fp8", use_dora=True),
                       "text_encoder_quantization")
    # a backend that is not installed: the hint is the pip command
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    pre = _preflight(tmp_path, model, dataset, text_encoder_quantization="nf4")
    (err,) = _errors(pre, "text_encoder_quantization")
    assert "bitsandbytes, which is not installed" in err["message"] and 'pip install "bitsandbytes>=' in err["hint"]
    # int8 text encoders with a text cache are allowed (the cache's identity samples torchao's inner tensors; the
    # int8 CLI run below trains that way)
    assert not _errors(_preflight(tmp_path, model, dataset, text_encoder_quantization="int8"),
                       "text_encoder_quantization")


def test_the_text_cache_identity_samples_int8_weights():
    """torchao's int8 weights implement no reshape or view: the identity hashes their inner tensors, and still
    tells two encoders apart by their weights."""
    from lora_trainer.data.cache_identity import _weight_fingerprint
    from lora_trainer.runtime.quantize import quantize_module

    def encoder(seed):
        torch.manual_seed(seed)
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList([torch.nn.Linear(32, 32) for _ in range(2)])
        quantize_module(model, "int8")
        assert "Int8" in type(model.layers[0].weight).__name__
        return model

    a, b, c = _weight_fingerprint(encoder(0)), _weight_fingerprint(encoder(0)), _weight_fingerprint(encoder(1))
    assert a == b and a["samples_sha256"] != c["samples_sha256"]


def test_old_torchao_is_refused_by_validate_only_without_importing_it(tmp_path, tiny_models, dataset):
    """A stand-in torchao 0.15 first on sys.path: --validate-only reads its version from the metadata (an import
    would raise here) and refuses, exit 2, naming the key; the fp8 path needs no backend at all."""
    site = tmp_path / "site"
    (site / "torchao").mkdir(parents=True)
    (site / "torchao" / "__init__.py").write_text("raise ImportError('the stand-in must never be imported')\n")
    (site / "torchao-0.15.0.dist-info").mkdir()
    (site / "torchao-0.15.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torchao\nVersion: 0.15.0\n")
    env = {"PYTHONPATH": f"{site}"}
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["flux1-dev"], dataset, "old", base_quantization="int8")),
                  "--validate-only", env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    (err,) = [e for e in res.last("validation")["errors"] if e["path"] == "base_quantization"]
    assert "found 0.15.0" in err["message"] and "0.16" in err["message"] and "pip install" in err["hint"]
    ok = run_cli("--config", str(_cfg(tmp_path, tiny_models["flux1-dev"], dataset, "fp8", base_quantization="fp8")),
                 "--validate-only", env=env)
    assert ok.returncode == 0, ok.stdout[-2000:]


def test_preflight_stays_torch_free(tmp_path, tiny_models, dataset):
    cfg = _cfg(tmp_path, tiny_models["flux1-dev"], dataset, "tf", base_quantization="int8",
               text_encoder_quantization="nf4")
    code = ("import sys, json; from lora_trainer.config.config import load_config; from lora_trainer.preflight.run import "
            f"run_preflight; c, w = load_config({str(cfg)!r}); p = run_preflight(c, w); assert p.ok, p.errors; "
            "print(json.dumps(sorted(m for m in ('torch', 'torchao', 'bitsandbytes') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == []


# ------------------------------------------------------------------------------------------ through the CLI
@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """One 4-step FLUX.1-dev run per format (NaN injected at step 3), an int8 run stopped by SIGTERM at step 2 and
    resumed, and an SDXL run with NF4 UNet + trained fp8 text encoders; shared by the tests below."""
    from lora_trainer.testing.tiny import make_dataset

    tmp = tmp_path_factory.mktemp("quant")
    data = Path(make_dataset(tmp / "data", n=4, trigger="ohwx"))
    flux = tiny_models["flux1-dev"]
    from diffusers import FluxTransformer2DModel

    blocks = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer").named_modules()
    out = {"tmp": tmp, "flux": flux, "block_linears": sum(  # every Linear of the double and single blocks
        type(m) is torch.nn.Linear and n.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")
        for n, m in blocks)}
    te = {"fp8": "fp8", "int8": "int8", "nf4": "nf4"}  # each with a text cache, from encoders in that format
    for fmt in FORMATS:
        # samples at steps 0 and 4: the quantised layers run in eval mode between training steps
        out[fmt] = run_cli("--config", str(_cfg(tmp, flux, data, fmt, base_quantization=fmt, validation_steps=4,
                                                validation_inference_steps=2, validation_prompts=["ohwx, a cat"],
                                                text_encoder_quantization=te[fmt], max_sequence_length=32)), env=NAN)
    split = _cfg(tmp, flux, data, "split", base_quantization="int8", text_encoder_quantization="int8",
                 max_sequence_length=32)
    out["stopped"] = run_cli("--config", str(split), env={**NAN, "TRAIN_LORA_TEST_SIGTERM_STEP": "2"})
    out["resumed"] = run_cli("--config", str(split), "--resume", env=NAN)
    out["sdxl"] = run_cli("--config", str(_cfg(tmp, tiny_models["sdxl"], data, "sdxl", base_quantization="nf4",
                                               text_encoder_quantization="fp8", train_text_encoder=True)), env=NAN)
    out["dora"] = run_cli("--config", str(_cfg(tmp, flux, data, "dora", base_quantization="nf4", use_dora=True,
                                               max_sequence_length=32, max_train_steps=2)))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_trains_through_the_cli(runs, fmt):
    res = runs[fmt]
    assert res.returncode == 0, res.stderr[-4000:]
    converted = [e["message"] for e in res.of_type("status") if f"stored as {fmt}" in e["message"]]
    # fp8 of a denoiser happens after LoRA injection (no event); the frozen text encoders are converted at load
    want = {"fp8": {"text_encoder", "text_encoder_2"}, "int8": {"transformer", "text_encoder", "text_encoder_2"},
            "nf4": {"transformer", "text_encoder", "text_encoder_2"}}[fmt]
    assert {m.split(":")[0] for m in converted} == want
    assert res.last("run_started")["config"]["base_quantization"] == fmt
    steps = res.of_type("step")
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert {e["step"] for e in res.of_type("sample")} == {0, 4}
    # the guard skipped the injected step and nothing else: every other step's loss and LoRA grad norm were finite
    assert [e["details"]["step"] for e in res.of_type("warning") if e["code"] == "nonfinite_step_skipped"] == [3]
    out = runs["tmp"] / fmt
    state = load_file(out / "checkpoints" / "step-000004" / "lora_transformer.safetensors")
    assert state and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())
    assert any(t.abs().max() > 0 for k, t in state.items() if "lora_B" in k), "the LoRA must have trained"
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_quantization"] == fmt
    assert meta["ss_text_encoder_quantization"] == res.last("run_started")["config"]["text_encoder_quantization"]
    assert (meta.get("ss_fp8_base") == "True") == (fmt == "fp8")
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["quantization"]["base"] == fmt and manifest["quantization"]["lora_dtype"] == "float32"
    # what the trained model really held (FLUX.1's text encoders are released after caching)
    assert manifest["quantization"]["layers"] == {"transformer": {fmt: runs["block_linears"]}}
    assert set(manifest["quantization"]["backends"]) == {"int8": {"torchao"}, "nf4": {"bitsandbytes"}}.get(fmt, set())


def test_resume_with_a_quantised_base_is_bitwise_exact(runs):
    stopped, resumed = runs["stopped"], runs["resumed"]
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.last("interrupted")["step"] == 2
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.last("resumed")["step"] == 2
    for comp in ("transformer",):
        a = load_file(runs["tmp"] / "int8" / "checkpoints" / "step-000004" / f"lora_{comp}.safetensors")
        b = load_file(runs["tmp"] / "split" / "checkpoints" / "step-000004" / f"lora_{comp}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume not exact"
    assert [e["loss"] for e in resumed.of_type("step")] == [e["loss"] for e in runs["int8"].of_type("step")][2:]


def test_exported_lora_loads_on_the_full_precision_base(runs):
    from diffusers import DiffusionPipeline

    for fmt in FORMATS:
        ckpt = load_file(runs["tmp"] / fmt / "checkpoints" / "step-000004" / "lora_transformer.safetensors")
        want = {k[: -len(".lora_A.weight")]: (ALPHA / RANK) * (ckpt[k.replace("lora_A", "lora_B")] @ a)
                for k, a in ckpt.items() if k.endswith("lora_A.weight")}
        pipe = DiffusionPipeline.from_pretrained(runs["flux"])
        assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters()), "a full-precision base"
        pipe.load_lora_weights(str(runs["tmp"] / fmt / "pytorch_lora_weights.safetensors"))
        loaded = lora_deltas(pipe.transformer)
        assert set(loaded) == set(want), fmt
        for name, delta in want.items():  # the file is fp16 (save_precision)
            torch.testing.assert_close(loaded[name], delta, rtol=2e-2, atol=2e-4, msg=f"{fmt} {name}")


def test_unet_nf4_with_trained_fp8_text_encoders(runs):
    res = runs["sdxl"]
    assert res.returncode == 0, res.stderr[-4000:]
    assert any("unet: " in e["message"] and "stored as nf4" in e["message"] for e in res.of_type("status"))
    assert [e["details"]["step"] for e in res.of_type("warning") if e["code"] == "nonfinite_step_skipped"] == [3]
    ckpt = runs["tmp"] / "sdxl" / "checkpoints" / "step-000004"
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        state = load_file(ckpt / f"lora_{comp}.safetensors")
        assert state and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values()), comp
        assert any(t.abs().max() > 0 for k, t in state.items() if "lora_B" in k), comp


def test_dora_on_an_nf4_base(runs):
    """PEFT dequantises the NF4 weight for DoRA's norm; the manifest's ComfyUI row-scale check reads it the same way."""
    res = runs["dora"]
    assert res.returncode == 0, res.stderr[-4000:]
    state = load_file(runs["tmp"] / "dora" / "checkpoints" / "step-000002" / "lora_transformer.safetensors")
    magnitudes = [t for k, t in state.items() if "lora_magnitude" in k]
    assert magnitudes and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())
    scale = json.loads((runs["tmp"] / "dora" / "training_manifest.json").read_text())["dora_comfyui_row_scale"]
    assert scale["layers"] == len(magnitudes) and 0.5 < scale["min"] <= scale["max"] < 2.0, scale


def test_two_processes_with_quantised_modules(tmp_path, tiny_models, dataset):
    """DDP broadcasts every parameter when it wraps a model; an fp8 UNet (float8 over gloo) and a trained int8
    text encoder (torchao tensors have no view()) are told to skip their frozen weights, which agree on every rank."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = _cfg(tmp_path, tiny_models["sd15"], dataset, "ddp", max_train_steps=2, base_quantization="fp8",
               text_encoder_quantization="int8", train_text_encoder=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(ROOT / "train_lora.py"), "--config", str(cfg)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = parse_events(proc.stdout)
    assert [e["world_size"] for e in events if e["type"] == "run_started"] == [2]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2]
    for comp in ("unet", "text_encoder"):
        state = load_file(tmp_path / "ddp" / "checkpoints" / "step-000002" / f"lora_{comp}.safetensors")
        assert state and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values()), comp
