"""Interruption and exact resume through the real CLI: SIGTERM mid-run, then resume: the final LoRA is
bitwise identical to an uninterrupted run, and the step/loss events after the resume point match."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, parse_events, run_cli, write_config


def _config(tmp_path: Path, model: Path, dataset: Path, out: str, **extra) -> Path:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / out),
           "trigger_words": ["ohwx"], "resolution": 64, "max_train_steps": 8, "log_every_n_steps": 1,
           "checkpointing_steps": 4, "lora_rank": 4, "learning_rate": 1e-3, "batch_size": 2,
           "caption_dropout_rate": 0.2, "shuffle_tags": True, "noise_offset": 0.05, "lora_dropout": 0.1, **extra}
    return write_config(tmp_path / f"{out}.json", **cfg)


def _run_until_step(config: Path, stop_after: int, sig=signal.SIGTERM):
    """Start the CLI, send `sig` once a step event >= stop_after arrives; returns (rc, events, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    sent_at = None
    for line in proc.stdout:
        lines.append(line)
        ev = json.loads(line)
        if sent_at is None and ev["type"] == "step" and ev["step"] >= stop_after:
            proc.send_signal(sig)
            sent_at = time.monotonic()
    rc = proc.wait(timeout=300)
    stderr = proc.stderr.read()
    return rc, parse_events("".join(lines)), stderr, (time.monotonic() - sent_at) if sent_at else None


def _steps(events):
    return [(e["step"], e["loss"]) for e in events if e["type"] == "step"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_models):
    """The uninterrupted run, once for every interruption pattern (the dataset generator is deterministic)."""
    from lora_trainer.testing.tiny import make_dataset

    tmp = tmp_path_factory.mktemp("reference")
    data = make_dataset(tmp / "data", n=4, trigger="ohwx")
    ref = run_cli("--config", str(_config(tmp, tiny_models["sd15"], data, "ref")))
    assert ref.returncode == 0, ref.stderr[-3000:]
    return load_file(tmp / "ref" / "lora.safetensors"), dict(_steps(ref.events))


@pytest.mark.parametrize("stops", [[3], [2, 5]])
def test_sigterm_then_resume_is_bitwise_identical(tmp_path, tiny_models, dataset, stops, reference_run):
    model = tiny_models["sd15"]
    ref_lora, ref_steps = reference_run

    cfg = _config(tmp_path, model, dataset, "run", resume="auto")
    for n, stop in enumerate(stops):
        rc, events, stderr, took = _run_until_step(cfg, stop)
        assert rc == 128 + signal.SIGTERM, stderr[-3000:]
        assert "Traceback" not in stderr
        inter = [e for e in events if e["type"] == "interrupted"][-1]
        assert inter["signal"] == "SIGTERM" and inter["checkpoint"]
        ckpt = [e for e in events if e["type"] == "checkpoint"][-1]
        # The step's own interval checkpoint when the stop lands on one (not written twice), else an interrupt one.
        assert ckpt["step"] == inter["step"] and ckpt["path"] == inter["checkpoint"]
        assert ckpt["reason"] == ("interval" if inter["step"] % 4 == 0 else "interrupt")
        if n:
            assert [e for e in events if e["type"] == "resumed"], "the second run must resume"
    final = run_cli("--config", str(cfg))
    assert final.returncode == 0, final.stderr[-3000:]
    resumed = final.last("resumed")
    start = resumed["step"]
    assert final.last("run_started")["start_step"] == start
    # The same losses, step for step, after the resume point.
    for step, loss in _steps(final.events):
        assert step > start and loss == ref_steps[step], f"step {step}: {loss} != {ref_steps[step]}"
    assert final.last("completed")["steps"] == 8
    lora = load_file(tmp_path / "run" / "lora.safetensors")
    assert lora.keys() == ref_lora.keys()
    for k in ref_lora:
        assert lora[k].dtype == ref_lora[k].dtype and lora[k].equal(ref_lora[k]), k


def test_resume_with_changed_rank_is_refused(tmp_path, tiny_models, dataset):
    cfg = _config(tmp_path, tiny_models["sd15"], dataset, "run", max_train_steps=4)
    assert run_cli("--config", str(cfg)).returncode == 0
    changed = _config(tmp_path, tiny_models["sd15"], dataset, "run", max_train_steps=6, lora_rank=8,
                      resume="auto", overwrite_output=True)
    res = run_cli("--config", str(changed))
    assert res.returncode == 2
    err = res.last("error")
    assert "lora_rank" in err["message"]


def test_resume_may_extend_the_run_and_reports_the_change(tmp_path, tiny_models, dataset):
    cfg = _config(tmp_path, tiny_models["sd15"], dataset, "run", max_train_steps=2, checkpointing_steps=2)
    assert run_cli("--config", str(cfg)).returncode == 0
    longer = _config(tmp_path, tiny_models["sd15"], dataset, "run", max_train_steps=4, checkpointing_steps=2,
                     resume="auto", overwrite_output=True)
    res = run_cli("--config", str(longer))
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = res.last("resumed")
    assert resumed["step"] == 2 and resumed["changed"]["max_train_steps"] == {"from": 2, "to": 4}
    assert [e["step"] for e in res.of_type("step")] == [3, 4]
    assert res.last("completed")["steps"] == 4


def test_missing_resume_path_is_an_error(tmp_path, tiny_models, dataset):
    cfg = _config(tmp_path, tiny_models["sd15"], dataset, "run", resume=str(tmp_path / "nope"))
    res = run_cli("--config", str(cfg))
    assert res.returncode == 2 and res.last("error")["code"] == "config_invalid"


def test_stop_on_a_checkpoint_step_saves_once(tmp_path, tiny_models, dataset):
    """A signal during the step that ends with an interval checkpoint: that checkpoint is the interrupt's; writing
    the same step again would double the stop time (an SDXL checkpoint is hundreds of MB)."""
    cfg = _config(tmp_path, tiny_models["sd15"], dataset, "run", checkpointing_steps=3)
    res = run_cli("--config", str(cfg), env={"TRAIN_LORA_TEST_SIGTERM_STEP": "3"})
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    ckpts = res.of_type("checkpoint")
    assert [(c["step"], c["reason"]) for c in ckpts] == [(3, "interval")]
    inter = res.last("interrupted")
    assert inter["step"] == 3 and inter["checkpoint"] == ckpts[0]["path"]
    resumed = run_cli("--config", str(cfg), "--resume")
    assert resumed.returncode == 0 and resumed.last("resumed")["step"] == 3


# A value other than the default for every MUST_MATCH key: a key added to MUST_MATCH without one fails the test.
_OTHER = {"base_model": "org/other-model", "lora_rank": 8, "lora_alpha": 3.0, "target_modules": ("to_q",),
          "text_encoder_target_modules": ("q_proj",), "train_text_encoder": True, "use_dora": True, "batch_size": 2,
          "gradient_accumulation_steps": 2, "seed": 7, "optimizer": "adafactor", "cache_latents": False,
          "merge_lora": "adapter.safetensors", "merge_lora_scale": 0.5, "train_experts": "high_noise",
          "network_type": "lokr", "lokr_factor": 8, "lokr_decompose_both": True, "lycoris_effective_conv": True,
          # set by the trainer, not the config:
          "family": "sdxl", "prediction_type": "v_prediction", "dataset_fingerprint": "another dataset",
          "resolution": 128, "bucketing": True, "world_size": 2}


def _identity(cfg, **run):
    from lora_trainer.training.resume import run_identity

    base = dict(family="sd15", prediction_type="epsilon", dataset_fingerprint="fp", resolution=64, bucketing=False,
                world_size=1, mixed_precision="no")
    return run_identity(cfg, **{**base, **run})


def test_every_must_match_setting_is_refused_alone(tmp_path):
    """Each MUST_MATCH key, changed alone, is the one refusal; run_identity really takes it from its source."""
    import dataclasses

    from lora_trainer.config.config import parse_config
    from lora_trainer.training.resume import MUST_MATCH, compare_identity

    assert set(_OTHER) == set(MUST_MATCH)
    cfg, _ = parse_config({"dataset_path": "d", "base_model": "org/model", "output_path": "o",
                           "trigger_words": ["ohwx"], "lora_alpha": 16}, base_dir=tmp_path)  # alpha not = rank
    saved = _identity(cfg)
    from_trainer = {"family", "prediction_type", "dataset_fingerprint", "resolution", "bucketing", "world_size"}
    for key, value in _OTHER.items():
        if key in from_trainer:  # resolved by the trainer (resolution, prediction_type: not the config's "auto")
            now = _identity(cfg, **{key: value})
        else:
            now = _identity(dataclasses.replace(cfg, **{key: value}))
        assert compare_identity(saved, now) == ([key], {}), key


def test_recipe_changes_on_resume_are_listed_not_refused(tmp_path):
    """noise_offset, caption_dropout_rate and lora_dropout change what the next steps do, not what the checkpoint
    holds: allowed, like the learning rate, and listed in `resumed.changed` (they used to change silently)."""
    import dataclasses

    from lora_trainer.config.config import parse_config
    from lora_trainer.training.resume import compare_identity

    cfg, _ = parse_config({"dataset_path": "d", "base_model": "org/model", "output_path": "o",
                           "trigger_words": ["ohwx"]}, base_dir=tmp_path)
    saved = _identity(cfg)
    new = dict(noise_offset=0.1, caption_dropout_rate=0.5, lora_dropout=0.2, min_snr_gamma=5.0, keep_tokens=2)
    mismatched, changed = compare_identity(saved, _identity(dataclasses.replace(cfg, **new)))
    assert mismatched == [] and changed == {k: {"from": getattr(cfg, k), "to": v} for k, v in new.items()}
    # A checkpoint from before these were recorded lists nothing for them (no "from None").
    old = {k: v for k, v in saved.items() if k not in new}
    assert compare_identity(old, _identity(dataclasses.replace(cfg, **new))) == ([], {})


def test_resume_refuses_every_changed_setting_at_once_then_lists_recipe_changes(tmp_path, tiny_models, dataset):
    import shutil

    from PIL import Image

    common = dict(max_train_steps=2, checkpointing_steps=2, min_bucket_resolution=64)
    assert run_cli("--config", str(_config(tmp_path, tiny_models["sd15"], dataset, "run", **common))).returncode == 0
    # Another copy of the model, a dataset with one more image and eleven other settings: one refusal names all.
    model = tmp_path / "model_copy"
    shutil.copytree(tiny_models["sd15"], model)
    data = tmp_path / "data_more"
    shutil.copytree(dataset, data)
    Image.new("RGB", (64, 64), (200, 20, 20)).save(data / "extra.png")
    other = dict(seed=9, batch_size=1, gradient_accumulation_steps=2, resolution=128, optimizer="adafactor",
                 target_modules=["to_q", "to_v"], lora_alpha=2, use_dora=True, train_text_encoder=True,
                 cache_latents=False, enable_bucketing=True)
    res = run_cli("--config", str(_config(tmp_path, model, data, "run", **common, **other, resume="auto",
                                          overwrite_output=True)))
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.last("error")
    assert {p["path"] for p in err["details"]["problems"]} == {
        "base_model", "dataset_fingerprint", "seed", "batch_size", "gradient_accumulation_steps", "resolution",
        "optimizer", "target_modules", "lora_alpha", "use_dora", "train_text_encoder", "cache_latents", "bucketing"}
    assert not res.of_type("step")
    # The same run with only recipe settings changed continues, and says what changed.
    recipe = dict(noise_offset=0.1, caption_dropout_rate=0.5, lora_dropout=0.2)
    res = run_cli("--config", str(_config(tmp_path, tiny_models["sd15"], dataset, "run", **{**common, "max_train_steps": 3},
                                          **recipe, resume="auto", overwrite_output=True)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.last("resumed")["changed"] == {
        "max_train_steps": {"from": 2, "to": 3}, "noise_offset": {"from": 0.05, "to": 0.1},
        "caption_dropout_rate": {"from": 0.2, "to": 0.5}, "lora_dropout": {"from": 0.1, "to": 0.2}}
