"""Caches over the host-memory budget stay on disk and are read per step, and train the same LoRA."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from conftest import run_cli, write_config


def test_caches_over_the_budget_are_read_from_disk_and_train_the_same_lora(tmp_path, tiny_models, dataset):
    def run(name, **extra):
        cfg = write_config(tmp_path / f"{name}.json", dataset_path=str(dataset), base_model=str(tiny_models["sd15"]),
                           output_path=str(tmp_path / name), trigger_words=["ohwx"], resolution=64, lora_rank=4,
                           max_train_steps=3, log_every_n_steps=1, caption_dropout_rate=0.5, **extra)
        res = run_cli("--config", str(cfg))
        assert res.returncode == 0, res.stderr[-3000:]
        return res, load_file(tmp_path / name / "lora.safetensors")

    memory, ref = run("memory")
    plan = memory.last("run_started")["latent_cache"]
    assert plan["placement"] == "host" and plan["total_bytes"] == 4 * 4 * 8 * 8 * 4  # 4 images, 4x8x8 fp32
    disk, got = run("disk", cache_host_budget_gb=1e-9)
    started = disk.last("run_started")
    assert started["latent_cache"]["placement"] == "disk" and started["text_cache"]["placement"] == "disk"
    assert len(list((tmp_path / "disk" / "cache" / "latents").glob("*.safetensors"))) == 4
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_validate_only_plans_both_caches(tmp_path):
    import dataclasses

    from lora_trainer.preflight.run import run_preflight
    from tests.test_dataset_scan import cfg_for
    from tests.test_preflight import standin_model
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "data", n=5, sizes=[(96, 64), (64, 96)])
    model = standin_model(tmp_path / "model", family="sdxl")
    cfg = dataclasses.replace(cfg_for(tmp_path, data, resolution=64, caption_dropout_rate=0.1),
                              base_model=str(model))
    caches = run_preflight(cfg).summary["caches"]
    # 64 px buckets of 96x64 / 64x96 images: 64x64 (the only shape at that budget), 4 channels, fp32
    assert caches["latents"] == {"total_bytes": 5 * 4 * 8 * 8 * 4, "placement": "host"}
    text = caches["text"]
    assert text["entries"] == len({p.read_text() for p in data.glob("*.txt")}) + 1  # + "" for caption dropout
    assert text["bytes_per_entry"] == (77 * 2048 + 1280) * 2 and text["placement"] == "host"
    tiny = run_preflight(dataclasses.replace(cfg, cache_host_budget_gb=1e-9)).summary["caches"]
    assert tiny["latents"]["placement"] == "disk" and tiny["text"]["placement"] == "disk"
