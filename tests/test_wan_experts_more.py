"""Wan 2.2 T2V-A14B's two experts beyond tests/test_wan_experts.py: the memory plan streams both experts' blocks,
init_lora takes the per-expert file pair our export writes, validation_base_model loads both experts of the other
release, and the tool file's metadata names Wan 2.2 (and which expert)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli, write_config
from lora_trainer.families.wan.experts import EXPERTS

HIGH, LOW = (comp for _, comp in EXPERTS.groups)


def test_memory_plan_streams_and_shards_both_experts(tmp_path, tiny_models, dataset, monkeypatch):
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight import memory_plan
    from lora_trainer.preflight.memory_plan import plan_memory
    from lora_trainer.preflight.probe import probe_model

    model = tiny_models["wan22-a14b"]
    probe = probe_model(str(model))

    def plan(processes=1, **kw):
        cfg, _ = parse_config({"dataset_path": str(dataset), "base_model": str(model), "trigger_words": ["ohwx"],
                               "output_path": str(tmp_path / "out"), "gradient_checkpointing": True, **kw})
        return plan_memory(cfg, probe, "wan", 64, gpu=None, processes=processes)

    # The tiny transformer has two blocks: with the streamer's two slots nothing would be saved; one slot saves one.
    monkeypatch.setattr(memory_plan, "SLOTS", 1)
    for key, kw, processes in (("offload", {"offload_blocks": 2}, 1), ("shard", {"shard_base": True}, 2)):
        both, high = plan(processes, **kw), plan(processes, train_experts="high_noise", **kw)
        plain_both, plain_high = plan(processes), plan(processes, train_experts="high_noise")
        for field in ("device_bytes", "host_bytes", "block_bytes"):
            if field in high[key]:
                assert both[key][field] == 2 * high[key][field] > 0, (key, field)
        # what streaming / sharding saves on the device: each expert's, both counted (the plan's total includes a
        # slack proportional to its parts, so the savings compare as a ratio)
        saved_high = plain_high["total_bytes"] - high["total_bytes"]
        saved_both = plain_both["total_bytes"] - both["total_bytes"]
        assert saved_high > 0 and saved_both == pytest.approx(2 * saved_high, rel=1e-4), key


def test_routed_denoisers_reduce_without_ddp_and_refuse_sharding():
    """Which denoisers distributed/routed.py takes from DDP: both experts of a two-process A14B run, nothing for one
    process, one expert or another family; shard_base with them is a config error naming the key."""
    from types import SimpleNamespace

    from lora_trainer.contract.errors import ConfigError
    from lora_trainer.distributed.routed import refuse_sharding, routed_denoisers
    from lora_trainer.families.wan.adapter import Wan

    fam, one = Wan(), Wan()
    fam.boundary = one.boundary = 0.875
    both = SimpleNamespace(denoisers={HIGH: None, LOW: None})
    alone = SimpleNamespace(denoisers={HIGH: None})
    assert routed_denoisers(fam, both, 2) == (HIGH, LOW)
    assert routed_denoisers(fam, both, 1) == () and routed_denoisers(one, alone, 2) == ()
    assert routed_denoisers(Wan(), SimpleNamespace(denoisers={HIGH: None}), 2) == ()  # Wan 2.1: one transformer
    with pytest.raises(ConfigError) as err:
        refuse_sharding(SimpleNamespace(shard_base=True), fam, both, 2)
    assert [p["path"] for p in err.value.problems] == ["shard_base"]
    refuse_sharding(SimpleNamespace(shard_base=True), one, alone, 2)
    refuse_sharding(SimpleNamespace(shard_base=False), fam, both, 2)


# ------------------------------------------------------------------------------------------------- init_lora
FROZEN = dict(learning_rate=1e-12, weight_decay=0.0, max_train_steps=1, checkpointing_steps=None)


def _config(tmp_path: Path, model: Path, dataset: Path, name: str, **params) -> Path:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / name),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "log_every_n_steps": 1,
           "lora_rank": 4, "lora_alpha": 8, "max_sequence_length": 32, "batch_size": 4, **params}
    return write_config(tmp_path / f"{name}.json", **cfg)


def test_init_lora_starts_each_expert_from_its_own_file(tmp_path, tiny_models, dataset):
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tiny_models["wan22-a14b"]
    src = run_cli("--config", str(_config(tmp_path, model, dataset, "src", max_train_steps=2, learning_rate=2e-3,
                                          checkpointing_steps=None)))
    assert src.returncode == 0, src.stderr[-3000:]
    peft = {name: load_file(tmp_path / "src" / f"pytorch_lora_weights_{name}.safetensors") for name in EXPERTS.names}
    assert any(not torch.equal(peft["high_noise"][k], peft["low_noise"][k]) for k in peft["high_noise"])

    # The low-noise ComfyUI file named: each expert starts from its own file of the pair (no swap, nothing partial).
    res = run_cli("--config", str(_config(tmp_path, model, dataset, "cont", **FROZEN,
                                          init_lora=str(tmp_path / "src" / "lora_low_noise.safetensors"))))
    assert res.returncode == 0, res.stderr[-3000:]
    started = [e["message"] for e in res.of_type("status") if e.get("phase") == "init_lora"]
    assert sorted(m.split(":")[0] for m in started) == ["starting from lora_high_noise.safetensors",
                                                        "starting from lora_low_noise.safetensors"], started
    assert not [e for e in res.of_type("warning") if e["code"] == "init_lora_partial"]
    for name in EXPERTS.names:
        got = load_file(tmp_path / "cont" / f"pytorch_lora_weights_{name}.safetensors")
        assert got.keys() == peft[name].keys() and all(torch.equal(got[k], peft[name][k]) for k in got), name

    # --validate-only refuses a file that is not one of a pair, and a pair without this run's expert.
    plain = tmp_path / "plain.safetensors"
    shutil.copy(tmp_path / "src" / "lora_high_noise.safetensors", plain)
    solo = tmp_path / "solo"
    solo.mkdir()
    shutil.copy(tmp_path / "src" / "lora_high_noise.safetensors", solo / "mine_high_noise.safetensors")
    for init, extra, bad in ((plain, {}, str(plain)), (solo / "mine_high_noise.safetensors", {},
                                                         str(solo / "mine_low_noise.safetensors")),
                             (solo / "mine_high_noise.safetensors", {"train_experts": "high_noise"}, None)):
        out = run_cli("--config", str(_config(tmp_path, model, dataset, "check", init_lora=str(init), **extra)),
                      "--validate-only")
        errors = out.last("validation")["errors"]
        assert [(e["path"], e["value"]) for e in errors] == ([("init_lora", bad)] if bad else []), errors
        assert (out.returncode == 0) == (bad is None)


# ------------------------------------------------------------------------------------- validation_base_model
def test_validation_base_model_samples_with_both_of_its_experts(tmp_path, tiny_models, dataset):
    """Samples on another A14B release take both of its experts, each with the run's LoRA for it: a release equal to
    the base samples exactly what the base does; one whose low-noise expert differs samples differently (a
    validation model that kept the run's own transformer_2 would not). A release without experts is refused by
    --validate-only."""
    import shutil

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file, save_file

    model = tiny_models["wan22-a14b"]
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(model, same)
    shutil.copytree(model, other)
    weights = next((other / LOW).glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v * 1.5 if v.is_floating_point() and v.ndim == 2 else v for k, v in state.items()}, weights)

    def samples(name: str, **extra) -> list[np.ndarray]:
        res = run_cli("--config", str(_config(tmp_path, model, dataset, name, max_train_steps=2, learning_rate=5e-3,
                                              checkpointing_steps=None, validation_steps=2,
                                              validation_inference_steps=2, validation_frames=1, **extra)))
        assert res.returncode == 0, res.stderr[-3000:]
        paths = [e["path"] for e in res.of_type("sample") if e["step"] == 2]
        assert paths, "no samples at step 2"
        return [np.asarray(Image.open(p)) for p in paths]

    base = samples("base")
    assert all(np.array_equal(a, b) for a, b in zip(base, samples("same", validation_base_model=str(same))))
    assert not all(np.array_equal(a, b) for a, b in zip(base, samples("other", validation_base_model=str(other))))
    # one expert trained: the release's other expert samples frozen in place of the run's
    assert samples("one", validation_base_model=str(other), train_experts="high_noise")

    bad = run_cli("--config", str(_config(tmp_path, model, dataset, "bad", validation_steps=2,
                                          validation_base_model=str(tiny_models["wan21"]))), "--validate-only")
    assert bad.returncode != 0
    errors = bad.last("validation")["errors"]
    assert [e["path"] for e in errors] == ["validation_base_model"], errors
    assert "transformer_2" in errors[0]["message"]


def test_validate_only_refuses_sharding_both_experts(tmp_path, tiny_models, dataset):
    """shard_base with both experts training is found before a run starts (a process whose samples all went to one
    expert would never join the other's sharded passes); with one expert trained it is allowed."""
    base = {"dataset_path": str(dataset), "base_model": str(tiny_models["wan22-a14b"]), "trigger_words": ["ohwx"],
            "output_path": str(tmp_path / "out"), "resolution": 64, "shard_base": True}
    both = run_cli("--config", str(write_config(tmp_path / "both.json", **base)), "--validate-only")
    assert both.returncode == 2
    assert [e["path"] for e in both.last("validation")["errors"]] == ["shard_base"]
    one = run_cli("--config", str(write_config(tmp_path / "one.json", **base, train_experts="low_noise")),
                  "--validate-only")
    assert one.returncode == 0, one.last("validation")["errors"]
