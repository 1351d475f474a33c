"""Validation loss (eval_*) through the real CLI on the tiny models: a DDPM run (sd15) with a held-out fraction,
interrupted by SIGTERM and resumed, gives the uninterrupted run's values bitwise; a flow run (FLUX.1-schnell) with a
held-out folder; --validate-only reports the held-out set; the plot, report and checkpoint keep the history."""
from __future__ import annotations

import json
import signal
from pathlib import Path

from conftest import run_cli, write_config


def _config(tmp_path: Path, model: Path, dataset: Path, out: str, **extra) -> Path:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / out),
           "trigger_words": ["ohwx"], "resolution": 64, "max_train_steps": 6, "log_every_n_steps": 1,
           "checkpointing_steps": 4, "lora_rank": 4, "learning_rate": 1e-3, "batch_size": 2,
           "caption_dropout_rate": 0.2, "lora_dropout": 0.1, "eval_split": 0.4, "eval_steps": 2, **extra}
    return write_config(tmp_path / f"{out}.json", **cfg)


def _evals(events) -> list[tuple]:
    return [(e["step"], e["loss"], tuple(e["losses"])) for e in events if e["type"] == "eval_loss"]


def test_ddpm_eval_loss_survives_sigterm_and_resume_bitwise(tmp_path, tiny_models):
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "data", n=5, trigger="ohwx")
    ref_cfg = _config(tmp_path, tiny_models["sd15"], data, "ref", noise_offset=0.05)

    pre = run_cli("--config", str(ref_cfg), "--validate-only")
    assert pre.returncode == 0, pre.stderr[-3000:]
    held = pre.last("validation")["summary"]["dataset"]["eval"]
    assert (held["source"], held["images"], held["training_images"]) == ("split", 2, 3)

    ref = run_cli("--config", str(ref_cfg))
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert ref.last("run_started")["num_images"] == 3  # the held-out images are not trained on
    ref_evals = _evals(ref.events)
    assert [e[0] for e in ref_evals] == [0, 2, 4, 6]  # the base model's, every 2 steps, the last
    assert {e["images"] for e in ref.of_type("eval_loss")} == {2}
    assert ref.last("eval_loss")["timesteps"] == [0.2, 0.4, 0.6, 0.8]
    assert len({e[1] for e in ref_evals}) == 4  # training moves it

    # SIGTERM during step 4 (an eval step and an interval checkpoint), then resume.
    cfg = _config(tmp_path, tiny_models["sd15"], data, "run", noise_offset=0.05, resume="auto")
    first = run_cli("--config", str(cfg), env={"TRAIN_LORA_TEST_SIGTERM_STEP": "4"})
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert first.last("interrupted")["step"] == 4
    second = run_cli("--config", str(cfg))
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.last("resumed")["step"] == 4
    # Bitwise the same values at every eval step, none measured twice, and the whole history in the outputs.
    assert _evals(first.events) + _evals(second.events) == ref_evals
    assert [e[0] for e in _evals(second.events)] == [6]
    ref_steps = {e["step"]: e["loss"] for e in ref.of_type("step")}
    assert all(e["loss"] == ref_steps[e["step"]] for e in second.of_type("step"))
    out = tmp_path / "run"
    history = json.loads((out / "checkpoints" / "step-000006" / "history.json").read_text())["eval"]
    assert [(h[0], h[1], tuple(h[2])) for h in history] == ref_evals
    report = (out / "report.html").read_text()
    table = report[report.index('id="eval-loss"'):]
    assert [f"<tr><td>{s}</td><td>{v:.5f}</td>" in table for s, v, _ in ref_evals] == [True] * 4
    assert second.last("completed")["outputs"]["loss_curve"].endswith("loss_curve.png")


def test_flow_eval_loss_on_a_held_out_folder(tmp_path, tiny_models):
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "data", n=4, trigger="ohwx")
    held = make_dataset(tmp_path / "held", n=3, trigger="ohwx", seed=1)
    cfg = _config(tmp_path, tiny_models["flux1-schnell"], data, "flow", max_train_steps=3, checkpointing_steps=None,
                  eval_split=0, eval_dataset_path=str(held), eval_max_images=2, eval_timesteps=[0.9, 0.3],
                  cache_latents_to_disk=True, caption_dropout_rate=0.0)
    res = run_cli("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.last("run_started")["num_images"] == 4
    evals = res.of_type("eval_loss")
    assert [e["step"] for e in evals] == [0, 2, 3]
    assert all(e["images"] == 2 and e["timesteps"] == [0.9, 0.3] and len(e["losses"]) == 2 for e in evals)
    assert all(e["loss"] == sum(e["losses"]) / 2 for e in evals)
    # The held-out latents are cached like the training ones (here on disk): 4 training + 2 held-out entries.
    assert len(list((tmp_path / "flow" / "cache" / "latents").glob("*.safetensors"))) == 6
    assert 'id="eval-loss"' in (tmp_path / "flow" / "report.html").read_text()
