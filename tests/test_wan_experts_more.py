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
