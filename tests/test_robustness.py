"""Failure paths through the real CLI: non-finite steps, undecodable images, signals before training,
unreachable hub models, single-file checkpoints, SD2 v-prediction, and samples that do not disturb training."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _helpers import probe_env, probe_records
from conftest import ROOT, parse_events, run_cli, write_config


def _cfg(tmp_path: Path, model, dataset: Path, name: str = "c", **extra) -> Path:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / f"out_{name}"),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "max_train_steps": 4,
           "log_every_n_steps": 1, "lora_rank": 4, "learning_rate": 1e-3, **extra}
    return write_config(tmp_path / f"{name}.json", **cfg)


def test_isolated_nan_step_is_skipped_with_a_warning(tmp_path, tiny_models, dataset):
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset)),
                  env={"TRAIN_LORA_TEST_NAN_STEPS": "2"})
    assert res.returncode == 0, res.stderr[-3000:]
    warn = [w for w in res.of_type("warning") if w["code"] == "nonfinite_step_skipped"]
    assert len(warn) == 1 and warn[0]["details"]["step"] == 2
    lora = load_file(tmp_path / "out_c" / "lora.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in lora.values())


def test_diverged_run_fails_without_writing_a_broken_lora(tmp_path, tiny_models, dataset):
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, max_train_steps=8, checkpointing_steps=2)),
                  env={"TRAIN_LORA_TEST_NAN_STEPS": "4,5,6,7"})
    assert res.returncode == 5, res.stderr[-3000:]
    err = res.last("error")
    assert err["code"] == "training_failed" and err["hint"]
    assert not (tmp_path / "out_c" / "lora.safetensors").exists()
    assert "Traceback" not in res.stderr
    for ckpt in (tmp_path / "out_c" / "checkpoints").glob("step-*"):
        for t in load_file(ckpt / "lora_unet.safetensors").values():
            assert torch.isfinite(t).all()


def test_image_that_fails_to_decode_is_skipped(tmp_path, tiny_models, dataset):
    victim = sorted(p for p in dataset.iterdir() if p.suffix == ".png")[0]
    raw = bytearray(victim.read_bytes())
    start = raw.index(b"IDAT") + 8
    raw[start:start + 40] = b"\x00" * 40  # damage the compressed pixels but keep every chunk boundary
    victim.write_bytes(bytes(raw))
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, max_train_steps=2)))
    assert res.returncode == 0, res.stderr[-3000:]
    skipped = [w for w in res.of_type("warning") if w["code"] == "images_skipped"]
    assert skipped and any(victim.name in f for f in skipped[-1]["files"])
    assert res.last("run_started")["num_images"] == 3


def test_sigterm_during_model_loading_exits_cleanly(tmp_path, tiny_models, dataset):
    """A signal while the model loads exits at once with no checkpoint. The process holds inside the loading phase
    until the signal comes (TRAIN_LORA_TEST_HOLD): a tiny model loads faster than a test can react to the phase
    event, and a signal that lands after the first step is a different case."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRAIN_LORA_TEST_HOLD": "loading_model"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config",
                             str(_cfg(tmp_path, tiny_models["sd15"], dataset))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr = []
    for line in proc.stderr:
        stderr.append(line)
        if line.strip() == "train_lora test hold: loading_model":
            proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    stderr = "".join(stderr)
    events = parse_events(proc.stdout.read())
    assert rc == 143, stderr[-2000:]
    assert "train_lora test hold: loading_model" in stderr
    assert any(e.get("phase") == "loading_model" for e in events)
    inter = [e for e in events if e["type"] == "interrupted"]
    assert inter and inter[-1]["signal"] == "SIGTERM" and inter[-1]["checkpoint"] is None
    assert inter[-1]["step"] is None and not any(e["type"] == "step" for e in events)
    assert "Traceback" not in stderr
    assert not (tmp_path / "out_c" / "lora.safetensors").exists()
    assert not (tmp_path / "out_c" / "checkpoints").exists() or not any((tmp_path / "out_c" / "checkpoints").iterdir())


def test_sigterm_during_latent_caching_exits_at_once(tmp_path, tiny_models, dataset):
    """Caching writes nothing that a stop could break (entries are renamed into place): a signal there exits at
    once, without a checkpoint, and the entries already written are complete."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **probe_env(tmp_path / "probe"), "TRAIN_LORA_PROBE_HOLD_CACHING": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config",
                             str(_cfg(tmp_path, tiny_models["sd15"], dataset, cache_latents_to_disk=True,
                                      batch_size=1))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr = []
    for line in proc.stderr:
        stderr.append(line)
        if line.strip() == "probe hold: caching_latents":
            proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    events = parse_events(proc.stdout.read())
    stderr = "".join(stderr)
    assert "probe hold: caching_latents" in stderr and rc == 143, stderr[-2000:]
    assert events[-1]["type"] == "interrupted" and events[-1]["checkpoint"] is None and events[-1]["step"] is None
    progress = [e for e in events if e["type"] == "progress" and e["phase"] == "caching_latents"]
    assert progress[-1]["current"] < progress[-1]["total"], "the signal came mid-caching"
    assert not [e for e in events if e["type"] in ("run_started", "checkpoint")]
    cache = tmp_path / "out_c" / "cache" / "latents"
    entries = sorted(cache.iterdir())
    assert entries and all(p.suffix == ".safetensors" and not p.name.startswith(".") for p in entries), entries
    assert all(load_file(p)["latents"].ndim == 3 for p in entries)
    assert "Traceback" not in stderr


def test_uncached_hub_model_offline_is_a_model_load_error(tmp_path, dataset):
    res = run_cli("--config", str(_cfg(tmp_path, "someorg/some-model", dataset)),
                  env={"HF_HUB_CACHE": str(tmp_path / "empty_cache")})
    assert res.returncode == 4, res.stderr[-2000:]
    err = res.last("error")
    assert err["code"] == "model_load_failed" and err["hint"]


def test_single_file_checkpoint_trains(tmp_path, tiny_models, dataset):
    from lora_trainer.testing.tiny import make_single_file_checkpoint

    ckpt = make_single_file_checkpoint(tiny_models["sd15"], tmp_path / "tiny_sd15.safetensors")
    res = run_cli("--config", str(_cfg(tmp_path, ckpt, dataset, max_train_steps=2,
                                       base_model_config=str(tiny_models["sd15"]))))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.last("run_started")["family"] == "sd15"
    assert (tmp_path / "out_c" / "lora.safetensors").is_file()


def test_single_file_without_base_model_config_uses_the_cached_default_repo(tmp_path, tiny_models, dataset):
    """No base_model_config: diffusers takes configs and tokenizers from its default repo for the family. Offline and
    not cached, preflight says so before any weights load (naming base_model_config); once that repo's configs
    are in the HF cache (what `hf download ... --include '*.json' '*.txt'` leaves), the same config trains."""
    import shutil

    from lora_trainer.families import SPECS
    from lora_trainer.testing.tiny import make_single_file_checkpoint

    ckpt = make_single_file_checkpoint(tiny_models["sd15"], tmp_path / "tiny_sd15.safetensors")
    cfg = _cfg(tmp_path, ckpt, dataset, max_train_steps=2)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    check = run_cli("--config", str(cfg), "--validate-only", env=env)
    assert check.returncode == 2, check.stdout[-2000:]  # --validate-only: 2 for any error (README)
    err = check.last("validation")["errors"][0]
    repo = SPECS["sd15"].single_file_config_repo[None]
    assert err["code"] == "model_config_missing" and err["path"] == "base_model_config" and repo in err["message"]
    assert "hf download" in err["hint"]
    failed = run_cli("--config", str(cfg), env=env)  # training stops at preflight, before loading any weights
    assert failed.returncode == 4 and failed.last("error")["code"] == "model_load_failed", failed.stdout[-2000:]
    assert not failed.of_type("run_started") and "Traceback" not in failed.stderr

    snapshot = tmp_path / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
    for f in Path(tiny_models["sd15"]).rglob("*"):
        if f.is_file() and f.suffix in (".json", ".txt"):  # configs and tokenizer files, no weights
            (snapshot / f.relative_to(tiny_models["sd15"])).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, snapshot / f.relative_to(tiny_models["sd15"]))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    check = run_cli("--config", str(cfg), "--validate-only", env=env)
    assert check.returncode == 0, check.stdout[-2000:]
    assert check.last("validation")["summary"]["model"]["config"] == {"source": repo, "kind": "hub", "in_cache": True}
    res = run_cli("--config", str(cfg), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.last("run_started")["family"] == "sd15" and (tmp_path / "out_c" / "lora.safetensors").is_file()


def test_sd2_v_prediction_metadata(tmp_path, tiny_models, dataset):
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd2-v"], dataset, max_train_steps=2)))
    assert res.returncode == 0, res.stderr[-3000:]
    started = res.last("run_started")
    assert started["family"] == "sd2" and started["prediction_type"] == "v_prediction"
    with safe_open(str(tmp_path / "out_c" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"].startswith("sd_v2") and meta["ss_v2"] == "True"
    assert meta["modelspec.prediction_type"] == "v"


def test_prediction_type_override_trains_reports_and_is_kept_on_resume(tmp_path, tiny_models, dataset):
    cfg = _cfg(tmp_path, tiny_models["sd2-v"], dataset, max_train_steps=2, prediction_type="epsilon",
               checkpointing_steps=1)
    res = run_cli("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.last("run_started")["prediction_type"] == "epsilon"
    assert "prediction_type_override" in {w["code"] for w in res.of_type("warning")}
    with safe_open(str(tmp_path / "out_c" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_v_parameterization"] == "False" and meta["modelspec.prediction_type"] == "epsilon"
    # Continuing with the model's own (v) objective would be another run: refused, naming the setting.
    again = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd2-v"], dataset, max_train_steps=3,
                                         checkpointing_steps=1, resume="auto")))
    assert again.returncode == 2 and "prediction_type" in again.last("error")["message"], again.stdout[-2000:]


def test_samples_are_saved_and_do_not_change_training(tmp_path, tiny_models, dataset):
    common = dict(max_train_steps=4, lora_dropout=0.1, caption_dropout_rate=0.3, shuffle_tags=True)
    plain = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, "plain", **common)))
    sampled = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, "sampled", validation_steps=2,
                                            validation_inference_steps=2, num_validation_images=2,
                                            validation_prompts=["ohwx, a red circle"], **common)))
    assert plain.returncode == 0 and sampled.returncode == 0, sampled.stderr[-3000:]
    samples = sampled.of_type("sample")
    assert sorted({s["step"] for s in samples}) == [0, 2, 4] and len(samples) == 6
    for s in samples:
        assert Path(s["path"]).is_file() and s["prompt"] == "ohwx, a red circle"
    assert (tmp_path / "out_sampled" / "samples" / "step-000004" / "grid.png").is_file()
    a = load_file(tmp_path / "out_plain" / "lora.safetensors")
    b = load_file(tmp_path / "out_sampled" / "lora.safetensors")
    assert all(a[k].equal(b[k]) for k in a), "sampling changed the trained weights"


def test_adafactor_is_the_optimizer_used(tmp_path, tiny_models, dataset):
    probe = tmp_path / "probe"
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, "ada", optimizer="adafactor",
                                       max_train_steps=2)), env=probe_env(probe))
    assert res.returncode == 0, res.stderr[-2000:]
    (rec,) = probe_records(probe)
    assert [o["class"] for o in rec["optimizers"]] == ["transformers.optimization.Adafactor"]
    assert rec["optimizers"][0]["lrs"] == [1e-3]  # the configured lr, not Adafactor's relative step
    # Its state, as the checkpoint keeps it, is Adafactor's factored second moment, not AdamW's exp_avg.
    from lora_trainer.training.checkpoint import load_checkpoint

    _, js = load_checkpoint(tmp_path / "out_ada" / "checkpoints" / "step-000002")
    state_keys = json.dumps(js["state"]["optimizer"])
    assert "exp_avg_sq_row" in state_keys and "exp_avg_sq_col" in state_keys and '"exp_avg"' not in state_keys


def test_missing_prodigy_is_a_clear_config_error(tmp_path, tiny_models, dataset):
    try:
        import prodigyopt  # noqa: F401
    except ImportError:
        pass
    else:  # the refusal cannot happen here: say so instead of passing silently
        pytest.skip("prodigyopt is installed")
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, "prod", optimizer="prodigy",
                                       learning_rate=1.0, max_train_steps=2)))
    assert res.returncode == 2
    err = res.last("error")
    assert "prodigyopt" in err["message"] and "pip install prodigyopt" in err["hint"]
    assert not res.of_type("step")


def test_out_of_memory_is_classified_and_keeps_the_last_checkpoint(tmp_path, tiny_models, dataset):
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, max_train_steps=6, checkpointing_steps=2)),
                  env={"TRAIN_LORA_TEST_OOM_STEP": "4"})
    assert res.returncode == 6, res.stderr[-2000:]
    err = res.last("error")
    assert err["code"] == "out_of_memory" and err["details"]["step"] == 4 and err["details"]["where"] == "gpu"
    for word in ("batch_size", "gradient_checkpointing", "adamw8bit", "resolution"):
        assert word in err["hint"]
    assert "Traceback" not in res.stderr
    from lora_trainer.training.checkpoint import find_latest_checkpoint, verify_checkpoint

    latest = find_latest_checkpoint(tmp_path / "out_c" / "checkpoints")
    assert latest is not None and latest.name == "step-000002" and verify_checkpoint(latest)[0]


@pytest.mark.parametrize("inject", ["TRAIN_LORA_PROBE_HOST_OOM_STEP", "TRAIN_LORA_PROBE_MEMORYERROR_STEP"])
def test_host_out_of_memory_is_exit_6_with_a_host_hint(tmp_path, tiny_models, dataset, inject):
    """Host RAM, not the GPU's: torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory") and Python's
    MemoryError, raised for real inside step 3 by the probe, are out_of_memory (exit 6), not internal errors."""
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, max_train_steps=4, checkpointing_steps=2)),
                  env={**probe_env(tmp_path / "probe"), inject: "3"})
    assert res.returncode == 6, res.stderr[-2000:]
    err = res.last("error")
    assert err["code"] == "out_of_memory" and err["exit_code"] == 6 and err["details"]["step"] == 3
    assert err["details"]["where"] == "host" and "host memory" in err["message"]
    assert "cache_latents_to_disk" in err["hint"] and "RAM" in err["hint"]
    assert "Traceback" not in res.stderr
    assert [e["step"] for e in res.of_type("checkpoint")] == [2]


def test_gradient_checkpointing_accumulation_and_text_encoder_lr(tmp_path, tiny_models, dataset):
    probe = tmp_path / "probe"
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sdxl"], dataset, max_train_steps=2,
                                       gradient_checkpointing=True, gradient_accumulation_steps=2, batch_size=2,
                                       train_text_encoder=True, text_encoder_lr=2e-4)), env=probe_env(probe))
    assert res.returncode == 0, res.stderr[-2000:]
    started = res.last("run_started")
    assert started["effective_batch_size"] == 4
    assert res.last("completed")["steps"] == 2
    (rec,) = probe_records(probe)
    # Checkpointing is on for the UNet, and its blocks really ran through torch.utils.checkpoint.
    assert rec["gradient_checkpointing"] == {"unet": True} and rec["checkpoint_calls"] > 0
    # Accumulation: 2 steps x 2 micro-batches of 2 images (4 images: one epoch per step).
    assert [len(b["batch"]) for b in rec["batches"]] == [2, 2, 2, 2]
    assert [o["class"] for o in rec["optimizers"]] == ["torch.optim.adamw.AdamW"]
    # One group per learning rate: the UNet's LoRA at learning_rate, the text encoders' at text_encoder_lr.
    assert rec["optimizers"][0]["lrs"] == [1e-3, 2e-4] and all(n > 0 for n in rec["optimizers"][0]["sizes"])


def test_unreadable_image_is_reported_once_and_skipped(tmp_path, tiny_models, dataset):
    (dataset / "empty.png").write_bytes(b"")
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, max_train_steps=1)))
    assert res.returncode == 0, res.stderr[-2000:]
    mentions = [w for w in res.of_type("warning") if any("empty.png" in f for f in w.get("files", []))]
    assert len(mentions) == 1, mentions
    assert res.last("run_started")["num_images"] == 4
