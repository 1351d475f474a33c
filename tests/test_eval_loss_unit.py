"""Validation loss (eval_*), the parts without a model: the held-out split, the objectives' fixed-level loss, the
isolation of the eval pass from training's RNG and train/eval flags, the config and preflight checks, the plot."""
from __future__ import annotations

import contextlib
import types

import pytest
import torch

from lora_trainer.config.config import parse_config
from lora_trainer.contract.errors import EXIT_CONFIG, EXIT_DATASET, ConfigError
from lora_trainer.preflight.dataset_scan import scan_dataset
from lora_trainer.preflight.eval_set import split_records


def _cfg(tmp_path, data, **extra):
    cfg, warnings = parse_config({"dataset_path": str(data), "base_model": "org/model",
                                  "output_path": str(tmp_path / "out"), "trigger_words": ["ohwx"], **extra},
                                 base_dir=tmp_path)
    return cfg, warnings


@pytest.fixture()
def records(tmp_path):
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "data", n=12, trigger="ohwx")
    return scan_dataset(_cfg(tmp_path, data)[0]).usable


def test_split_is_deterministic_disjoint_and_sized(records):
    train, held = split_records(records, 0.25, 42, 32)
    assert (train, held) == split_records(records, 0.25, 42, 32)  # a pure function of (seed, file list)
    names = [r.rel_path for r in records]
    assert len(held) == 3 and len(train) == 9
    assert not {r.rel_path for r in train} & {r.rel_path for r in held}
    assert sorted(r.rel_path for r in train + held) == sorted(names)
    assert [r.rel_path for r in held] == [n for n in names if n in {r.rel_path for r in held}]  # scan order kept
    assert len(split_records(records, 0.25, 42, 2)[1]) == 2  # eval_max_images caps the split
    assert len(split_records(records, 0.01, 42, 32)[1]) == 1  # at least one image
    others = {tuple(r.rel_path for r in split_records(records, 0.25, seed, 32)[1]) for seed in range(8)}
    assert len(others) > 1  # the seed decides which images
    # Removing a training image does not move the others between the sets (the ranking is per image).
    fewer = tuple(r for r in records if r.rel_path != train[0].rel_path)
    assert {r.rel_path for r in split_records(fewer, 3 / 11, 42, 32)[1]} == {r.rel_path for r in held}


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def _objectives():
    from lora_trainer.objectives.ddpm import DiffusionObjective, ObjectiveSettings
    from lora_trainer.objectives.flow import FlowMatchingObjective, FlowSettings

    return [DiffusionObjective(_scheduler(), ObjectiveSettings("v_prediction", noise_offset=0.1, min_snr_gamma=5.0)),
            FlowMatchingObjective(FlowSettings(sigma_sampling="logit_normal", shift="static"))]


@pytest.mark.parametrize("objective", _objectives(), ids=["ddpm", "flow"])
def test_fixed_loss_repeats_and_draws_nothing(objective):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    weight = torch.randn(4, 4, generator=g)
    seen = []

    def model_fn(x, t):
        seen.append(t.clone())
        return torch.einsum("bchw,cd->bdhw", x, weight)

    rng, gen = torch.get_rng_state(), g.get_state()
    level = objective.default_eval_levels[0]
    first = objective.fixed_loss(model_fn, latents, noise, level)
    second = objective.fixed_loss(model_fn, latents, noise, level)
    assert first.item() == second.item() and torch.isfinite(first)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(g.get_state(), gen)
    assert objective.fixed_loss(model_fn, latents, noise * -1, level).item() != first.item()  # the noise counts
    assert objective.fixed_loss(model_fn, latents, noise, objective.default_eval_levels[-1]).item() != first.item()
    if objective.timestep_kind == "ddpm_index":
        assert seen[0].tolist() == [200, 200]  # kohya's 200 of 1000
        assert objective.default_eval_levels == (0.2, 0.4, 0.6, 0.8)
    else:
        assert seen[0].tolist() == [1.0, 1.0]  # ai-toolkit's sigmas, unshifted
        assert objective.default_eval_levels == (1.0, 0.75, 0.5, 0.25)


def test_eval_pass_leaves_training_state_alone():
    """The eval pass on a fake run whose model draws from the global RNG and has dropout: the global RNG and
    every module's train flag are as before, the values repeat, and the eval ran in eval mode."""
    from lora_trainer.objectives.flow import FlowMatchingObjective, FlowSettings
    from lora_trainer.training.eval_loss import HeldOutLoss, _Batch, image_noise

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.Dropout(0.5))
    net[1].eval()  # a submodule in another mode than its parent must come back as it was
    modes_seen = []

    def predict(denoisers, noisy, t, cond, geometry):
        modes_seen.append(denoisers["d"].training)
        torch.rand(3)  # any stray draw from the global RNG inside the forward
        return denoisers["d"](noisy) + cond["x"].mean()

    latents = torch.randn(2, 4, 8, 8)
    batch = _Batch(latents, torch.stack([image_noise(7, f"img{i}", latents.shape[1:]) for i in range(2)]),
                   torch.zeros(2, 6), ["a", "b"], {"x": torch.ones(2, 3)})
    cfg = types.SimpleNamespace(eval_timesteps=None, eval_steps=2, report_to="none")
    trainer = types.SimpleNamespace(
        family=types.SimpleNamespace(predict=predict), device=torch.device("cpu"), denoisers={"d": net},
        comps=types.SimpleNamespace(text_encoders={}), objective=FlowMatchingObjective(FlowSettings()),
        accelerator=types.SimpleNamespace(autocast=contextlib.nullcontext), total_steps=4)
    held = HeldOutLoss(cfg, [batch], 2)
    net.train()
    net[1].eval()
    rng = torch.get_rng_state()
    first = held.measure(trainer)
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.training and not net[1].training and net[0].training
    assert modes_seen and not any(modes_seen)
    assert held.measure(trainer) == first and len(first) == 4
    assert torch.equal(image_noise(7, "img0", (4, 8, 8)), batch.noise[0])  # the noise is a function of the image
    assert not torch.equal(image_noise(8, "img0", (4, 8, 8)), batch.noise[0])
    # eval steps: every eval_steps, the last step, never twice (a resume starts at a step already measured)
    assert [s for s in range(6) if held.due(s, 5, [])] == [0, 2, 4, 5]
    assert not held.due(4, 5, [(4, 1.0, [1.0])])


def test_config_rules(tmp_path):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, tmp_path / "d", eval_split=0.1, eval_dataset_path="held")
    assert err.value.problems[0]["path"] == "eval_split"
    for bad in ({"eval_split": 1.0}, {"eval_timesteps": [0.0]}, {"eval_timesteps": []}, {"eval_steps": 0}):
        with pytest.raises(ConfigError):
            _cfg(tmp_path, tmp_path / "d", **bad)
    _, warnings = _cfg(tmp_path, tmp_path / "d", eval_steps=5)
    assert [w["path"] for w in warnings if w["code"] == "unused_setting"] == ["eval_steps"]
    cfg, _ = _cfg(tmp_path, tmp_path / "d", eval_split=0.2, eval_timesteps=[0.5, 1])
    assert cfg.eval_timesteps == (0.5, 1) and cfg.eval_steps == 100 and cfg.eval_max_images == 32


def test_preflight_rejects_unusable_held_out_sets(tmp_path, tiny_models):
    from lora_trainer.preflight.run import run_preflight
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "data", n=3, trigger="ohwx")
    (tmp_path / "empty").mkdir()
    base = {"base_model": str(tiny_models["sd15"]), "resolution": 64}
    cases = [({"eval_split": 0.9}, "config_invalid", "eval_split", EXIT_CONFIG),
             ({"eval_dataset_path": str(tmp_path / "nowhere")}, "eval_set_missing", "eval_dataset_path", EXIT_DATASET),
             ({"eval_dataset_path": str(tmp_path / "empty")}, "eval_set_empty", "eval_dataset_path", EXIT_DATASET),
             ({"eval_dataset_path": str(data)}, "config_invalid", "eval_dataset_path", EXIT_CONFIG)]
    for extra, code, path, exit_code in cases:
        cfg, _ = _cfg(tmp_path, data, **base, **extra)
        pre = run_preflight(cfg)
        assert [(e["code"], e["path"]) for e in pre.errors] == [(code, path)], (extra, pre.errors)
        assert pre.exit_code == exit_code
    cfg, _ = _cfg(tmp_path, data, **base, eval_split=0.5)
    pre = run_preflight(cfg)
    assert pre.ok, pre.errors
    info = pre.summary["dataset"]["eval"]
    assert (info["images"], info["training_images"]) == (2, 1) and pre.summary["dataset"]["samples_per_epoch"] == 1
    assert len(pre.scan.usable) == 1 and len(pre.scan.held_out) == 2
    assert pre.scan.fingerprint != run_preflight(_cfg(tmp_path, data, **base)[0]).scan.fingerprint


def test_loss_curve_draws_the_held_out_line(tmp_path):
    from lora_trainer.outputs import plots

    history = [(s, 1.0 / s, 1e-4) for s in range(1, 7)]
    evals = [(0, 0.9, [0.9]), (3, 0.8, [0.8]), (6, float("nan"), [float("nan")])]
    fig = plots.loss_curve(history, tmp_path / "loss.png", evals)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(lines[plots.EVAL_LABEL].get_xdata()) == [0, 3]  # a non-finite value is left out
    assert (tmp_path / "loss.png").stat().st_size > 0
    fig = plots.loss_curve(history, tmp_path / "loss.png")
    assert plots.EVAL_LABEL not in {ln.get_label() for ln in fig.axes[0].get_lines()}
