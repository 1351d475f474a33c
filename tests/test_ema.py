"""EMA of the adapter weights (ema_decay, training/ema.py): the update maths, and through the real CLI on a tiny
UNet (sd15) and a tiny flow transformer (flux1): the exported LoRA is the formula applied to the per-step raw
weights (read from a checkpoint per step), a step skipped by the NaN guard leaves the EMA as it was, the raw
weights are exported beside it, and SIGTERM + resume gives the same files bit for bit, EMA included."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_cli, write_config

NAN = {"TRAIN_LORA_TEST_NAN_STEPS": "3"}  # step 3's update is skipped by the NaN guard


def _decays(n_updates: int, decay: float, warmup: bool) -> list[float]:
    """d_n for updates 1..n as README "EMA of the adapter weights" states it."""
    return [0.0 if n == 1 else (min(decay, n / (n + 9)) if warmup else decay) for n in range(1, n_updates + 1)]


def _expected(raw_by_step: dict[int, dict[str, torch.Tensor]], initial: dict[str, torch.Tensor], steps: list[int],
              *, decay: float, warmup: bool) -> dict[str, torch.Tensor]:
    """The EMA after the updates at ``steps`` (the steps that changed the weights), in float64."""
    ema = {k: v.double() for k, v in initial.items()}
    for step, d in zip(steps, _decays(len(steps), decay, warmup)):
        ema = {k: d * ema[k] + (1 - d) * raw_by_step[step][k].double() for k in ema}
    return ema


# ------------------------------------------------------------------------------------------------ unit: the maths
# float64 weights take the path of weights the fp32 shadows cannot average in place (ema_device "cpu" on a GPU)
@pytest.mark.parametrize("warmup,interval,dtype", [(True, 1, torch.float32), (False, 2, torch.float64)])
def test_update_follows_the_formula_and_swaps_back_exactly(warmup, interval, dtype):
    from lora_trainer.training.ema import AdapterEMA

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, dtype=dtype)), torch.nn.Parameter(torch.randn(5, dtype=dtype))]
    cfg = SimpleNamespace(ema_decay=0.8, ema_warmup=warmup, ema_update_interval=interval, ema_sampling="both",
                          ema_device="accelerator")
    ema = AdapterEMA(cfg, params, {}, torch.device("cpu"))
    initial = {str(i): p.detach().clone() for i, p in enumerate(params)}
    raw, updated = {}, []
    for step in range(1, 8):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        raw[step] = {str(i): p.detach().clone() for i, p in enumerate(params)}
        ema.update(step)
        if step % interval == 0:
            updated.append(step)
    assert ema.updates == len(updated)
    want = _expected(raw, initial, updated, decay=0.8, warmup=warmup)
    for i, shadow in enumerate(ema.model.shadow_params):
        torch.testing.assert_close(shadow.double(), want[str(i)], rtol=1e-6, atol=1e-6)
    before = [p.detach().clone() for p in params]
    with ema.applied():
        assert all(torch.equal(p, s.to(dtype)) for p, s in zip(params, ema.model.shadow_params))
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "the raw weights must come back bit for bit"
    assert [(w, d) for w, d, _ in ema.sample_sets()] == [("ema", None), ("raw", "raw")]
    # Turned on at a resume from a checkpoint without EMA: the average starts from the resumed weights.
    ema.restore({}, None)
    assert ema.updates == 0 and all(torch.equal(p.float(), s) for p, s in zip(params, ema.model.shadow_params))
    assert [(w, d) for w, d, _ in ema.sample_sets()] == [("ema", None)]


# ------------------------------------------------------------------------------------------------ config, plan
BASE = {"dataset_path": "data", "base_model": "org/model", "output_path": "out", "trigger_words": ["ohwx"]}


def test_config_checks(tmp_path):
    from lora_trainer.config.config import parse_config
    from lora_trainer.contract.errors import ConfigError

    for bad in ({"ema_decay": 1.0}, {"ema_decay": 0}, {"ema_device": "gpu"}, {"ema_sampling": "all"},
                {"ema_update_interval": 0}, {"ema_decay": 0.99, "shard_base": True}):
        with pytest.raises(ConfigError) as err:
            parse_config({**BASE, **bad}, base_dir=tmp_path)
        assert {p["path"] for p in err.value.problems} & {*bad, "shard_base"}, bad
    cfg, warnings = parse_config({**BASE, "ema_sampling": "both"}, base_dir=tmp_path)
    assert cfg.ema_decay is None and [(w["code"], w["path"]) for w in warnings] == [("unused_setting", "ema_sampling")]
    # A constant 0.999 over 100 updates hardly leaves the first weights; with the warm-up it does.
    slow = {**BASE, "ema_decay": 0.999, "max_train_steps": 100}
    assert [w["code"] for w in parse_config({**slow, "ema_warmup": False}, base_dir=tmp_path)[1]] == ["ema_too_slow"]
    assert parse_config(slow, base_dir=tmp_path)[1] == []


def test_memory_plan_counts_the_shadow_on_the_device(tmp_path, tiny_models, dataset):
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.memory_plan import plan_memory
    from lora_trainer.preflight.probe import probe_model

    model = tiny_models["sd15"]
    probe = probe_model(str(model), tmp_path)

    def plan(**kw):
        cfg, _ = parse_config({**BASE, "dataset_path": str(dataset), "base_model": str(model), **kw}, base_dir=tmp_path)
        return plan_memory(cfg, probe, "sd15", 64, gpu=None)

    off, on, host = plan(), plan(ema_decay=0.99), plan(ema_decay=0.99, ema_device="cpu")
    assert "ema" not in off["parts_gib"] and "ema" not in host["parts_gib"]
    assert on["total_bytes"] - off["total_bytes"] >= on["lora_params"] * 4 == host["lora_params"] * 4 > 0


# ------------------------------------------------------------------------------------------------ CLI runs
def _config(tmp_path: Path, model: Path, dataset: Path, name: str, **extra) -> Path:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / name),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "max_train_steps": 5,
           "checkpointing_steps": 1, "checkpoints_total_limit": 10, "log_every_n_steps": 1, "lora_rank": 4,
           "learning_rate": 5e-3, "save_precision": "fp32", **extra}
    return write_config(tmp_path / f"{name}.json", **cfg)


def _peft_file(path: Path, component: str) -> dict[str, torch.Tensor]:
    """A pytorch_lora_weights file's tensors of one component, by the checkpoint's (PEFT state dict) names."""
    return {k.removeprefix(f"{component}."): v for k, v in load_file(path).items() if k.startswith(f"{component}.")}


def _check_run(out: Path, component: str, *, decay: float, warmup: bool, interval: int, steps: int = 5) -> None:
    ckpt = out / "checkpoints"
    raw = {s: load_file(ckpt / f"step-{s:06d}" / f"lora_{component}.safetensors") for s in range(1, steps + 1)}
    # The skipped step changed neither the weights nor the EMA.
    assert all(torch.equal(raw[2][k], raw[3][k]) for k in raw[2])
    ema2, ema3 = (load_file(ckpt / f"step-{s:06d}" / f"ema_{component}.safetensors") for s in (2, 3))
    assert ema2.keys() == raw[2].keys() and all(torch.equal(ema2[k], ema3[k]) for k in ema2)
    updated = [s for s in range(1, steps + 1) if s != 3 and s % interval == 0]
    # The EMA's start never counts (the first update copies), so any initial value gives the same result.
    want = _expected(raw, raw[1], updated, decay=decay, warmup=warmup)
    exported = _peft_file(out / "pytorch_lora_weights.safetensors", component)
    assert exported.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(exported[k].double(), want[k], rtol=1e-5, atol=1e-7, msg=k)
    # The raw weights beside it: the last step's, and different from the EMA.
    raw_file = _peft_file(out / "raw" / "pytorch_lora_weights.safetensors", component)
    assert all(torch.equal(raw_file[k], raw[steps][k]) for k in raw_file)
    assert any(not torch.equal(raw_file[k], exported[k]) for k in raw_file)
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["ema"]["updates"] == len(updated) and manifest["ema"]["decay"] == decay
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["ss_ema"])["updates"] == len(updated)
    with safe_open(str(out / "raw" / "lora.safetensors"), "pt") as f:
        assert "ss_ema" not in f.metadata()


def test_ema_unet_formula_nan_skip_and_exact_resume(tmp_path, tiny_models, dataset):
    model = tiny_models["sd15"]
    ema = {"ema_decay": 0.7, "ema_warmup": True}
    full = run_cli("--config", str(_config(tmp_path, model, dataset, "full", **ema)), env=NAN)
    assert full.returncode == 0, full.stderr[-3000:]
    outputs = full.last("completed")["outputs"]
    assert outputs["raw_lora"] == str(tmp_path / "full" / "raw" / "lora.safetensors")
    assert outputs["raw_peft_lora"] == str(tmp_path / "full" / "raw" / "pytorch_lora_weights.safetensors")
    _check_run(tmp_path / "full", "unet", decay=0.7, warmup=True, interval=1)

    # SIGTERM during step 4 (after the skipped one), then resume: every exported file and the last checkpoint's
    # EMA are bitwise those of the uninterrupted run.
    cfg = _config(tmp_path, model, dataset, "split", **ema)
    stopped = run_cli("--config", str(cfg), env={**NAN, "TRAIN_LORA_TEST_SIGTERM_STEP": "4"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.last("interrupted")["step"] == 4
    resumed = run_cli("--config", str(cfg), "--resume", env=NAN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.last("resumed")["step"] == 4
    for rel in ("lora.safetensors", "pytorch_lora_weights.safetensors", "raw/lora.safetensors",
                "raw/pytorch_lora_weights.safetensors", "checkpoints/step-000005/ema_unet.safetensors"):
        a, b = load_file(tmp_path / "full" / rel), load_file(tmp_path / "split" / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{rel}: resume not exact"


def test_ema_flow_transformer_interval_no_warmup_and_samples(tmp_path, tiny_models, dataset):
    ema = {"ema_decay": 0.5, "ema_warmup": False, "ema_update_interval": 2, "ema_sampling": "both"}
    res = run_cli("--config", str(_config(tmp_path, tiny_models["flux1-dev"], dataset, "flux", max_sequence_length=32,
                                          validation_steps=5, validation_inference_steps=1, **ema)), env=NAN)
    assert res.returncode == 0, res.stderr[-3000:]
    _check_run(tmp_path / "flux", "transformer", decay=0.5, warmup=False, interval=2)
    # Step 0: EMA == raw, one set; the last step: the EMA set in the step's folder, the raw one in raw/.
    samples = [(e["step"], e["weights"], Path(e["path"]).parent.name) for e in res.of_type("sample")]
    assert samples == [(0, "ema", "step-000000"), (5, "ema", "step-000005"), (5, "raw", "raw")]
