"""shard_base: the frozen denoiser sharded across two CPU processes (gloo) with FSDP2. Each process really holds half
of the frozen weights; the LoRA it trains is the one plain data parallelism trains; SIGTERM saves a checkpoint
(a collective: whole tensors gathered, rank 0 writes) and the resumed run ends bitwise on the uninterrupted sharded
run's LoRA; samples are generated with every process taking part; the memory plan divides the blocks by the
process count; the combinations it cannot serve are config errors naming shard_base."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, parse_events, write_config
from lora_trainer.config.config import ConfigError, parse_config

sys.path.insert(0, str(ROOT))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _two_processes(cfg: str, **env) -> tuple[int, list[dict], str]:
    proc = subprocess.run([*TORCHRUN, str(ROOT / "train_lora.py"), "--config", cfg], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                                            "OMP_NUM_THREADS": "1", **env})
    return proc.returncode, parse_events(proc.stdout), proc.stderr  # parse_events: one stream, seq without gaps


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """FLUX.1-dev, 6 steps of 2 accumulated micro-batches per process, samples at steps 3 and 6: plain data
    parallel, sharded, and sharded stopped by SIGTERM after step 3 then resumed."""
    from lora_trainer.testing.tiny import make_dataset

    tmp = tmp_path_factory.mktemp("shard")
    data = Path(make_dataset(tmp / "data", n=4, trigger="ohwx"))

    def cfg(name, **extra):
        return str(write_config(
            tmp / f"{name}.json", dataset_path=str(data), base_model=str(tiny_models["flux1-dev"]),
            output_path=str(tmp / name), trigger_words=["ohwx"], resolution=64, max_train_steps=6,
            gradient_accumulation_steps=2, checkpointing_steps=3, log_every_n_steps=1, lora_rank=4, lora_alpha=8,
            learning_rate=3e-3, gradient_checkpointing=True, max_sequence_length=32, validation_steps=3,
            validation_inference_steps=2, **extra))

    stopped_cfg = cfg("stopped", shard_base=True)
    return {"tmp": tmp, "model": tiny_models["flux1-dev"], "ddp": _two_processes(cfg("ddp")),
            "sharded": _two_processes(cfg("sharded", shard_base=True)),
            "stopped": _two_processes(stopped_cfg, TRAIN_LORA_TEST_SIGTERM_STEP="3"),
            "resumed": _two_processes(_with_resume(stopped_cfg))}  # in this order: it resumes what "stopped" saved


def _with_resume(path: str) -> str:
    data = json.loads(Path(path).read_text())
    return str(write_config(Path(path).with_name("resume.json"), **{**data, "resume": "auto"}))


def _of(events, kind):
    return [e for e in events if e["type"] == kind]


def test_each_process_holds_half_and_trains_the_data_parallel_lora(runs):
    tmp = runs["tmp"]
    for name in ("ddp", "sharded"):
        assert runs[name][0] == 0, runs[name][2][-3000:]
    (ddp_started,), (started,) = _of(runs["ddp"][1], "run_started"), _of(runs["sharded"][1], "run_started")
    assert ddp_started["shard"] is None
    shard = started["shard"]
    assert shard["processes"] == 2 and shard["units"] == 5  # 2 double + 2 single blocks, and the root
    held = {int(r): (int(a), int(b)) for r, a, b in re.findall(r"rank (\d) holds (\d+) of (\d+) frozen bytes",
                                                               runs["sharded"][2])}
    assert sorted(held) == [0, 1] and held[0][1] == held[1][1] == shard["frozen_bytes"] > 0
    assert held[0][0] + held[1][0] == shard["frozen_bytes"] and held[0][0] == shard["local_bytes"]
    assert held[0][0] <= 0.55 * shard["frozen_bytes"], "each process holds about half the frozen weights"
    # The same training as plain data parallelism, up to float rounding: gradients are reduce-scattered instead of
    # all-reduced and computed with gathered weights (bitwise equal here; ~1e-6 for the UNet, bench/RESULTS.md).
    ref = load_file(tmp / "ddp" / "checkpoints" / "step-000006" / "lora_transformer.safetensors")
    got = load_file(tmp / "sharded" / "checkpoints" / "step-000006" / "lora_transformer.safetensors")
    assert ref.keys() == got.keys() and all(v.dtype == torch.float32 for v in got.values())
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    first = load_file(tmp / "sharded" / "checkpoints" / "step-000003" / "lora_transformer.safetensors")
    assert any(not first[k].equal(got[k]) for k in got), "the LoRA trained between the checkpoints"
    losses = [[e["loss"] for e in _of(runs[n][1], "step")] for n in ("ddp", "sharded")]
    assert len(losses[1]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    # The exported LoRA (whole tensors, written by rank 0) is the plain run's, bitwise for FLUX.1 (README), in both
    # files; and diffusers loads the sharded run's with the plain run's deltas on every module.
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(tmp / "ddp" / name), load_file(tmp / "sharded" / name)
        assert a.keys() == b.keys(), name
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], f"{name}: tensors differ from the plain run's"
    _loads_in_diffusers_with(runs["model"], tmp / "sharded" / "pytorch_lora_weights.safetensors",
                             load_file(tmp / "ddp" / "pytorch_lora_weights.safetensors"), ddp_started["config"])
    # Sampling ran on both processes (a sharded block needs both) and only rank 0 wrote images and events.
    assert {e["step"] for e in _of(runs["sharded"][1], "sample")} == {0, 3, 6}
    assert sorted(p.name for p in (tmp / "sharded" / "samples").glob("step-*")) == [
        "step-000000", "step-000003", "step-000006"]


def _loads_in_diffusers_with(model: Path, path: Path, want_file: dict, config: dict) -> None:
    """diffusers' load_lora_weights puts ``path`` on the transformer with the deltas (scale * B @ A) of
    ``want_file`` (a PEFT file: "transformer.<module>.lora_A.weight"), on every module and no other."""
    from diffusers import DiffusionPipeline

    from conftest import lora_deltas

    scale = config["lora_alpha"] / config["lora_rank"]  # 2: a loader that ignored alpha would be caught
    want = {k[len("transformer."):-len(".lora_A.weight")]: scale * (want_file[k.replace("lora_A", "lora_B")].float()
                                                                   @ a.float())
            for k, a in want_file.items() if k.endswith(".lora_A.weight")}
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(path))
    loaded = lora_deltas(pipe.transformer)
    assert want and set(loaded) == set(want), sorted(set(loaded) ^ set(want))[:5]
    for name, delta in want.items():
        torch.testing.assert_close(loaded[name], delta, msg=name)
    assert any(d.abs().max() > 0 for d in want.values()), "the LoRA learned something"


def test_sigterm_saves_and_the_resumed_sharded_run_is_bitwise_the_uninterrupted_one(runs):
    tmp = runs["tmp"]
    rc, events, stderr = runs["stopped"]
    assert rc != 0, "torch.distributed.run reports a signalled worker as a failure"
    (inter,) = _of(events, "interrupted")
    assert inter["step"] == 3 and Path(inter["checkpoint"]).is_dir()
    assert re.findall(r"rank (\d) stopped after step (\d+)", stderr) in ([("0", "3"), ("1", "3")],
                                                                        [("1", "3"), ("0", "3")])
    rc, events, stderr = runs["resumed"]
    assert rc == 0, stderr[-3000:]
    assert [e["step"] for e in _of(events, "resumed")] == [3]
    a = load_file(tmp / "sharded" / "checkpoints" / "step-000006" / "lora_transformer.safetensors")
    b = load_file(tmp / "stopped" / "checkpoints" / "step-000006" / "lora_transformer.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "resume changed the sharded LoRA"
    opt_a = load_file(tmp / "sharded" / "checkpoints" / "step-000006" / "optimizer.safetensors")
    opt_b = load_file(tmp / "stopped" / "checkpoints" / "step-000006" / "optimizer.safetensors")
    moments = [k for k in opt_a if "exp_avg" in k]
    assert moments and all(opt_a[k].equal(opt_b[k]) for k in moments), "the optimizer state was restored whole"
    assert [e["loss"] for e in _of(events, "step")] == [e["loss"] for e in _of(runs["sharded"][1], "step")][3:]


@pytest.mark.parametrize("tiny", ["zimage", "flux2-klein-4b", "qwen-image", "qwen-image-2.1"])
def test_the_newer_transformer_families_train_sharded(tmp_path, tiny_models, dataset, tiny):
    """Z-Image (list inputs, refiners), FLUX.2 (patchified latents, fused single blocks), Qwen-Image (masked text
    stream) and Qwen-Image 2.1 (one block-causal joint sequence) through shard_base on two processes: an interval checkpoint (a collective) and a sample (every process
    takes part), with gradient checkpointing; both processes hold the blocks' shards, not whole blocks."""
    cfg = write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models[tiny]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64,
                       min_bucket_resolution=64, max_train_steps=3, checkpointing_steps=2, log_every_n_steps=1,
                       lora_rank=4, shard_base=True, gradient_checkpointing=True, validation_steps=3,
                       validation_inference_steps=2)
    rc, events, stderr = _two_processes(str(cfg))
    assert rc == 0, stderr[-3000:]
    shard = _of(events, "run_started")[0]["shard"]
    assert shard["processes"] == 2 and shard["units"] > 2, shard
    held = {int(r): int(a) for r, a, b in re.findall(r"rank (\d) holds (\d+) of (\d+) frozen bytes", stderr)}
    assert sorted(held) == [0, 1] and sum(held.values()) == shard["frozen_bytes"]
    assert max(held.values()) <= 0.75 * shard["frozen_bytes"], "each process holds a share, not the whole"
    assert [e["step"] for e in _of(events, "checkpoint")][:1] == [2] and _of(events, "sample")
    assert _of(events, "completed")[0]["steps"] == 3


@pytest.mark.parametrize("extra,words", [
    ({"base_quantization": "fp8"}, "base_quantization"),
    ({"offload_blocks": 2}, "offload_blocks"),
    ({"use_dora": True}, "use_dora"),
    ({"train_text_encoder": True}, "train_text_encoder"),
    ({"optimizer": "adafactor"}, "adafactor"),
])
def test_what_sharding_cannot_serve_is_a_config_error(tmp_path, extra, words):
    base = {"dataset_path": str(tmp_path / "data"), "base_model": str(tmp_path), "output_path": str(tmp_path / "out"),
            "trigger_words": ["ohwx"], "gradient_checkpointing": True, "shard_base": True}
    assert parse_config(base)[0].shard_base is True
    with pytest.raises(ConfigError) as err:
        parse_config({**base, **extra})
    problems = [p for p in err.value.problems if p["path"] == "shard_base"]
    assert len(problems) == 1 and words in problems[0]["message"], err.value.problems


def test_the_plan_divides_the_blocks_by_the_process_count(tmp_path_factory, monkeypatch):
    """Full-size FLUX.1-dev headers (no weights): over N processes each keeps 1/N of the 57 blocks plus the two
    largest whole (the running block and the prefetched one); bf16 FLUX.1-dev without quantisation then fits two
    24 GB cards, and a 24 GB card's hint names shard_base when several processes train."""
    from bench.bench_memory_plan import make_folder
    from lora_trainer.preflight import memory_plan
    from lora_trainer.preflight.probe import probe_model
    from lora_trainer.preflight.run import run_preflight
    from lora_trainer.testing.tiny import make_dataset

    root = tmp_path_factory.mktemp("shard_plan")
    folder, data = make_folder(root / "flux1", "flux1"), make_dataset(root / "data", n=2, trigger="ohwx")
    raw = {"dataset_path": str(data), "base_model": str(folder), "output_path": str(root / "out"),
           "trigger_words": ["ohwx"], "mixed_precision": "bf16", "resolution": 1024, "gradient_checkpointing": True}
    probe = probe_model(str(folder), root)
    card = {"name": "24 GB", "memory_bytes": 24 * 2 ** 30}

    def plan(processes, **kw):
        return memory_plan.plan_memory(parse_config({**raw, **kw})[0], probe, "flux1", 1024, gpu=card,
                                       processes=processes)

    plain, one, four = plan(4), plan(1, shard_base=True), plan(4, shard_base=True)
    every = plan(1, offload_blocks=57, gradient_checkpointing=True)  # an independent sum of the block bytes
    assert plain["shard"] is None and one["shard"] is None and one["total_gib"] == plain["total_gib"]
    blocks = four["shard"]["block_bytes"]
    assert blocks == every["offload"]["host_bytes"] and four["shard"]["units"] == 58
    double = 339.8e6 * 2  # a FLUX.1-dev double block's bf16 bytes: the largest block
    assert four["shard"]["device_bytes"] == pytest.approx(blocks / 4 + 2 * double, rel=0.01)
    drop = (plain["parts_gib"]["denoiser_weights"] - four["parts_gib"]["denoiser_weights"]) * 2 ** 30
    assert drop == pytest.approx(blocks - four["shard"]["device_bytes"], rel=0.01)
    assert four["parts_gib"]["lora"] == pytest.approx(plain["parts_gib"]["lora"] / 4, abs=0.01)
    assert plan(1)["fits"] is False and plan(2, shard_base=True)["fits"] is True
    hints = memory_plan.cheaper_settings(parse_config(raw)[0], probe, "flux1", 1024, card, processes=2)
    (hint,) = [h for h in hints if h["settings"].get("shard_base")]
    assert hint["fits"] and hint["total_gib"] == plan(2, shard_base=True)["total_gib"]
    assert not [h for h in memory_plan.cheaper_settings(parse_config(raw)[0], probe, "flux1", 1024, card)
                if h["settings"].get("shard_base")], "one process: nothing to shard across"
    # --validate-only reads the process count from WORLD_SIZE, and says when shard_base has nothing to shard.
    cfg, warnings = parse_config({**raw, "shard_base": True, "device": "cpu"})
    monkeypatch.setenv("WORLD_SIZE", "1")
    report = run_preflight(cfg, warnings)
    assert [w["path"] for w in report.warnings if w["code"] == "shard_base_single_process"] == ["shard_base"]
    assert report.summary["memory"]["shard"] is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    report = run_preflight(cfg, warnings)
    assert not [w for w in report.warnings if w["code"] == "shard_base_single_process"]
    assert report.summary["memory"]["processes"] == 2 and report.summary["memory"]["shard"]["processes"] == 2
