"""FLUX.1-dev, FLUX.1-schnell and SD3 end to end through the real CLI on tiny random pipelines (CPU): one test per
family covers events, sampling, the NaN guard, SIGTERM -> checkpoint -> resume (bitwise equal to an uninterrupted
run), the exported files in diffusers (trained deltas, changed image) and ComfyUI's key mapping."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_cli, write_config

# fixture -> (family, variant, CLIP encoders trained with train_text_encoder: exercised on two of the three)
FAMILIES = {"flux1-dev": ("flux1", "dev", ("text_encoder",)), "flux1-schnell": ("flux1", "schnell", ()),
            "sd3": ("sd3", "sd3.5-medium", ("text_encoder", "text_encoder_2"))}
COMFY_FAMILY = {"flux1": "flux", "sd3": "sd3"}  # tests/comfy_dit_rules.py's names
RANK, ALPHA = 4, 8


def _config(tmp_path: Path, model: Path, dataset: Path, name: str, **params) -> Path:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / name),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "max_train_steps": 4,
           "checkpointing_steps": 2, "log_every_n_steps": 1, "lora_rank": RANK, "lora_alpha": ALPHA,
           "learning_rate": 2e-3, "max_sequence_length": 32, **params}
    return write_config(tmp_path / f"{name}.json", **cfg)


def _deltas(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in module.named_modules():
        if hasattr(layer, "lora_A") and layer.lora_A:
            adapter = next(iter(layer.lora_A.keys()))
            a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
            out[name] = layer.scaling[adapter] * (b @ a)
    return out


def _trained(ckpt: Path, component: str = "transformer") -> dict[str, torch.Tensor]:
    state = load_file(ckpt / f"lora_{component}.safetensors")
    return {k[: -len(".lora_A.weight")]: (ALPHA / RANK) * (state[k.replace("lora_A", "lora_B")].float() @ a.float())
            for k, a in state.items() if k.endswith("lora_A.weight")}


@pytest.mark.parametrize("fixture", list(FAMILIES))
def test_dit_family_end_to_end(tmp_path, tiny_models, dataset, fixture):
    from diffusers import DiffusionPipeline

    family, variant, encoders = FAMILIES[fixture]
    model = tiny_models[fixture]
    te = {"train_text_encoder": True, "text_encoder_lr": 1e-3} if encoders else {}
    nan = {"TRAIN_LORA_TEST_NAN_STEPS": "3"}  # both runs skip step 3's update: the NaN guard, and still comparable
    full = run_cli("--config", str(_config(tmp_path, model, dataset, "full", validation_steps=4,
                                           validation_inference_steps=2, **te)), env=nan)
    assert full.returncode == 0, full.stderr[-4000:]
    started = full.last("run_started")
    assert (started["family"], started["variant"], started["prediction_type"]) == (family, variant, "flow")
    assert started["objective"]["kind"] == "flow"
    assert [e["step"] for e in full.of_type("step")] == [1, 2, 3, 4]
    assert [e["details"]["step"] for e in full.of_type("warning") if e["code"] == "nonfinite_step_skipped"] == [3]
    assert {e["step"] for e in full.of_type("sample")} == {0, 4}
    out = tmp_path / "full"

    # SIGTERM during step 2 -> exit 143 with a checkpoint at 2; resume: "auto" finishes the same run.
    cfg = _config(tmp_path, model, dataset, "split", **te)
    stopped = run_cli("--config", str(cfg), env={**nan, "TRAIN_LORA_TEST_SIGTERM_STEP": "2"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.last("interrupted")["step"] == 2
    resumed = run_cli("--config", str(cfg), "--resume", env=nan)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.last("resumed")["step"] == 2
    for component in ("transformer", *encoders):
        a = load_file(out / "checkpoints" / "step-000004" / f"lora_{component}.safetensors")
        b = load_file(tmp_path / "split" / "checkpoints" / "step-000004" / f"lora_{component}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{component}: resume not exact"
    assert [e["loss"] for e in resumed.of_type("step")] == [e["loss"] for e in full.of_type("step")][2:]

    lora, peft_file = out / "lora.safetensors", out / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["modelspec.architecture"].startswith("flux-1-" if family == "flux1" else "stable-diffusion-3")
    assert meta["modelspec.trigger_phrase"] == "ohwx" and meta["ss_network_dim"] == str(RANK)
    assert {k.split(".", 1)[0] for k in keys} == {"transformer", *encoders}
    assert all(".text_model." in k for k in keys if k.startswith("text_encoder")), "ComfyUI maps text_model. only"
    assert not any(k.endswith(".alpha") for k in keys), "alpha is folded into lora_B (see export_dit)"

    pipe = DiffusionPipeline.from_pretrained(model)
    trained = _trained(out / "checkpoints" / "step-000004")
    zero = sorted(n for n, d in trained.items() if not d.abs().max() > 0)
    # SD3's last block is context_pre_only: the text stream's queries there feed no output, so no gradient.
    last = f"transformer_blocks.{json.loads((model / 'transformer' / 'config.json').read_text())['num_layers'] - 1}."
    assert trained and zero == ([f"{last}attn.add_q_proj"] if family == "sd3" else []), zero

    def image(p):
        return p("ohwx, a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                 max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images[0]

    before = image(pipe)
    for path in (peft_file, lora):
        pipe = DiffusionPipeline.from_pretrained(model)
        pipe.load_lora_weights(str(path))
        for component in ("transformer", *encoders):
            want = trained if component == "transformer" else _trained(out / "checkpoints" / "step-000004", component)
            loaded = _deltas(getattr(pipe, component))
            assert set(loaded) == set(want), f"{path.name} {component}: module sets differ"
            for name, delta in want.items():
                torch.testing.assert_close(loaded[name], delta, rtol=2e-2, atol=2e-4, msg=f"{path.name} {name}")
        assert abs(image(pipe) - before).max() > 0, "loading the LoRA must change the image"

    from comfy_dit_rules import forge_unmatched_keys, missing_targets, unloaded_keys

    clips = {"clip_l": pipe.text_encoder.config, "t5xxl": pipe.text_encoder_2.config} \
        if family == "flux1" else {"clip_l": pipe.text_encoder.config, "clip_g": pipe.text_encoder_2.config,
                                   "t5xxl": pipe.text_encoder_3.config}
    transformer_cfg = dict(pipe.transformer.config)
    assert unloaded_keys(keys, COMFY_FAMILY[family], transformer_cfg, clips) == []
    assert missing_targets(keys, COMFY_FAMILY[family], transformer_cfg, clips) == []
    if family == "flux1":  # Forge maps FLUX.1's diffusers names like ComfyUI; SD3: see README "FLUX.1 and SD3 files"
        assert forge_unmatched_keys(keys, "flux", transformer_cfg, clips) == []
    assert unloaded_keys([k.replace("transformer.", "diffusion_model.", 1) for k in keys], COMFY_FAMILY[family],
                         transformer_cfg, clips), "negative control: diffusers names under diffusion_model."
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["family"] == family and manifest["prediction_type"] == "flow"
