"""The memory plan judges the card the run will use, counts what the run puts on it, and offers only settings that
work (issue 21, items 5, 6, 7 and 10): the GPU named by CUDA_VISIBLE_DEVICES / LOCAL_RANK and its free memory (a
stand-in nvidia-smi on PATH prints what the real one prints), a warning instead of a verdict where the device cannot
be known, device-resident caches as a part of the plan, headroom in every hint, every hint a valid config, and the
streamed blocks' pinned memory counted once per process on the machine. Header-only full-size FLUX.1-dev files."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT
from lora_trainer.config.config import parse_config
from lora_trainer.contract.errors import ConfigError
from lora_trainer.preflight import memory_plan
from lora_trainer.preflight.probe import probe_model

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import fake_smi  # noqa: E402
from bench.bench_memory_plan import make_folder  # noqa: E402

MIB, GIB = 2 ** 20, 2 ** 30
ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
# bf16 FLUX.1-dev at 1024 px with checkpointing and 8-bit AdamW: ~28 GiB, between a 24 GB and a 48 GB card
MID = {"gradient_checkpointing": True, "optimizer": "adamw8bit"}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    from lora_trainer.testing.tiny import make_dataset

    root = tmp_path_factory.mktemp("hints")
    folder = make_folder(root / "flux1", "flux1")
    return {"flux1": folder, "data": make_dataset(root / "data", n=2, trigger="ohwx"), "root": root,
            "probe": probe_model(str(folder), root)}


@pytest.fixture
def clean_env(monkeypatch):
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def _raw(full, **kw) -> dict:
    return {"dataset_path": str(full["data"]), "base_model": str(full["flux1"]), "output_path": str(full["root"] / "out"),
            "trigger_words": ["ohwx"], "mixed_precision": "bf16", "resolution": 1024, **kw}


def _preflight(full, mp, tmp_path, gpus=None, *, failure=None, **kw):
    """run_preflight on the FLUX.1-dev headers with the stand-in nvidia-smi for ``gpus`` and ``env`` set."""
    from lora_trainer.preflight.run import run_preflight

    for key, value in {**fake_smi.install(tmp_path / "bin", gpus, failure=failure), **kw.pop("env", {})}.items():
        mp.setenv(key, value)
    cfg, warnings = parse_config(_raw(full, **kw))
    return run_preflight(cfg, warnings)


def _exceeds(report) -> list[dict]:
    return [e for e in report.errors if e["code"] == "memory_plan_exceeds"]


def _unknown(report) -> list[dict]:
    return [w for w in report.warnings if w["code"] == "memory_plan_gpu_unknown"]


# ------------------------------------------------------------------------------------------ item 7: which card
@pytest.mark.parametrize("env", [{"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
                                 {"CUDA_VISIBLE_DEVICES": fake_smi.A6000["uuid"]},
                                 {"CUDA_VISIBLE_DEVICES": fake_smi.A6000["uuid"][:12]},  # CUDA takes a UUID prefix
                                 {"CUDA_VISIBLE_DEVICES": "0,1", "LOCAL_RANK": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}])
def test_the_plan_judges_the_visible_card_by_its_free_memory(full, clean_env, tmp_path, env):
    """GPU 0 is a 24 GB card, GPU 1 a 48 GB one: a run sent to GPU 1 fits (nvidia-smi's first line is GPU 0)."""
    report = _preflight(full, clean_env, tmp_path, [fake_smi.RTX4090, fake_smi.A6000], env=env, **MID)
    gpu = report.summary["memory"]["gpu"]
    assert gpu["name"] == "NVIDIA RTX A6000" and gpu["index"] == 1 and gpu["uuid"] == fake_smi.A6000["uuid"]
    assert gpu["total_bytes"] == 49140 * MIB and gpu["free_bytes"] == gpu["memory_bytes"] == 48669 * MIB
    assert report.summary["memory"]["fits"] is True and not _exceeds(report) and not _unknown(report)


def test_the_card_of_this_process_and_its_free_memory_decide(full, clean_env, tmp_path):
    """Rank 1 of "1,0" gets GPU 0 (24 GB): refused; an 80 GB card with 20 GB free is refused too (it was judged by
    its total before), and the message gives free and total."""
    env = {"CUDA_VISIBLE_DEVICES": "1,0", "LOCAL_RANK": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    report = _preflight(full, clean_env, tmp_path, [fake_smi.RTX4090, fake_smi.A6000], env=env, **MID)
    (err,) = _exceeds(report)
    assert "RTX 4090" in err["message"] and report.summary["memory"]["gpu"]["index"] == 0
    shared = fake_smi.card("NVIDIA H100 80GB HBM3", 81559, 20480)
    clean_env.delenv("LOCAL_RANK")
    report = _preflight(full, clean_env, tmp_path, [shared], env={"CUDA_VISIBLE_DEVICES": "0"}, **MID)
    (err,) = _exceeds(report)
    assert "20.0 GiB free of 79.6 GiB" in err["message"], err["message"]
    assert report.summary["memory"]["gpu"]["free_bytes"] == 20480 * MIB


@pytest.mark.parametrize("case", ["mixed_cards_fastest_first", "mig", "mig_uuid", "failing", "unparsable",
                                  "rank_beyond_visible"])
def test_an_unknown_device_is_a_warning_not_a_verdict(full, clean_env, tmp_path, case):
    """Where nvidia-smi cannot say which card (or how much of it) the run gets, nothing is refused: a 12 GB card
    among them would refuse the ~28 GiB plan if it were judged."""
    small = fake_smi.card("NVIDIA GeForce RTX 3060", 12288, index=0)
    kw: dict = {"gpus": [small, fake_smi.A6000]}
    env = {}
    if case == "mixed_cards_fastest_first":  # CUDA numbers the fastest first; nvidia-smi by PCI bus
        env = {"CUDA_VISIBLE_DEVICES": "0"}
    elif case == "mig":  # the whole GPU's memory, not the instance's
        kw = {"gpus": [fake_smi.card("NVIDIA A100-SXM4-80GB", 81920, 12000, mig="Enabled")]}
    elif case == "mig_uuid":
        kw = {"gpus": [fake_smi.card("NVIDIA A100-SXM4-80GB", 81920, mig="Enabled")]}
        env = {"CUDA_VISIBLE_DEVICES": "MIG-0d6b5c2e-8a7f-5e1d-9c3b-2a4f6e8d0b1c"}
    elif case == "failing":
        kw = {"failure": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure "
                         "that the latest NVIDIA driver is installed and running."}
    elif case == "unparsable":
        kw = {"gpus": [{**small, "memory.free": "[N/A]"}]}
    else:
        env = {"CUDA_VISIBLE_DEVICES": "1", "LOCAL_RANK": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    report = _preflight(full, clean_env, tmp_path, env=env, **kw, **MID)
    (warning,) = _unknown(report)
    assert warning["path"] == "device" and "GiB" in warning["message"]
    memory = report.summary["memory"]
    assert memory["fits"] is None and memory["gpu"]["known"] is False and memory["gpu"]["reason"]
    assert memory["precision"] == "bf16" and not _exceeds(report) and report.ok, report.errors


@pytest.mark.parametrize("visible", ["", "-1", "2"])
def test_no_visible_gpu_plans_the_cpu(full, clean_env, tmp_path, visible):
    """CUDA_VISIBLE_DEVICES that hides every GPU (empty, -1, an index nvidia-smi does not list): torch sees none
    and the run trains on the CPU, so nothing is judged against the card nvidia-smi lists."""
    report = _preflight(full, clean_env, tmp_path, [fake_smi.card("NVIDIA GeForce RTX 3060", 12288)],
                        env={"CUDA_VISIBLE_DEVICES": visible, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
                        **{**MID, "mixed_precision": "auto"})
    memory = report.summary["memory"]
    assert memory["gpu"] is None and memory["fits"] is None and memory["precision"] == "no"
    assert not _exceeds(report) and not _unknown(report)


def test_where_torch_is_loaded_it_measures_the_device_itself(full, clean_env, tmp_path):
    """In the trainer (torch loaded, CUDA available) the device LOCAL_RANK is measured by torch's mem_get_info, which
    sees a MIG instance as the device it is; nvidia-smi is not asked. Torch's CUDA calls are stood in for here."""
    import types

    import torch

    calls = []
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    clean_env.setattr(torch.cuda, "mem_get_info", lambda i: calls.append(i) or (9 * GIB, 40 * GIB))
    clean_env.setattr(torch.cuda, "get_device_properties",
                      lambda i: types.SimpleNamespace(name="NVIDIA A100-SXM4-80GB MIG 3g.40gb", uuid="MIG-1234"))
    report = _preflight(full, clean_env, tmp_path, [fake_smi.card("NVIDIA A100-SXM4-80GB", 81920, mig="Enabled")],
                        env={"LOCAL_RANK": "1"}, **MID)
    gpu = report.summary["memory"]["gpu"]
    assert calls and set(calls) == {1} and gpu["source"] == "torch" and gpu["known"] is True
    assert (gpu["index"], gpu["total_bytes"], gpu["free_bytes"]) == (1, 40 * GIB, 9 * GIB)
    # the measurement lacks this process's own CUDA context, which the plan counts: it is added back
    assert gpu["memory_bytes"] == 9 * GIB + memory_plan.CONTEXT_BYTES
    (err,) = _exceeds(report)
    assert "MIG 3g.40gb" in err["message"] and not _unknown(report)


# --------------------------------------------------------------------------------- item 5: caches, headroom
def test_device_resident_caches_are_a_part_of_the_plan(full, clean_env, tmp_path):
    """Caches that fit a tenth of the free memory go to the GPU (before the denoiser): the plan counts them."""
    report = _preflight(full, clean_env, tmp_path, [{**fake_smi.A6000, "index": 0}], **MID)
    caches, memory = report.summary["caches"], report.summary["memory"]
    assert caches["latents"]["placement"] == caches["text"]["placement"] == "device"
    on_device = caches["latents"]["total_bytes"] + caches["text"]["total_bytes"]
    assert memory["caches"]["device_bytes"] == on_device > 0
    assert caches["device_budget_bytes"] == int(48669 * MIB * 0.1)
    # A card whose tenth cannot hold them: the caches stay on the host and the part is 0.
    tiny = fake_smi.card("small", 12288, max(1, on_device // MIB // 2))
    report = _preflight(full, clean_env, tmp_path, [tiny], **MID)
    assert report.summary["caches"]["latents"]["placement"] == "host"
    assert report.summary["memory"]["caches"]["device_bytes"] == 0


def _cfg(full, **kw):
    return parse_config(_raw(full, **kw))[0]


def _many_images(cfg, count: int, free: int):
    from lora_trainer.preflight.cache_plan import plan_caches

    return plan_caches(cfg, "flux1", [(1024, 1024)] * count, [f"ohwx {i}" for i in range(count)],
                       device_free_bytes=free)


def test_every_hint_leaves_headroom_and_counts_the_caches(full):
    """A 12 GB card with ~1 GiB of latents on it: every hint that says it fits still fits when the run needs DRIFT
    (15%) more than planned, the streamed-blocks hint is the fewest blocks that do, and its plan has the caches."""
    card = {"name": "12 GB", "memory_bytes": 12 * GIB}
    cfg = _cfg(full, **MID)
    caches = _many_images(cfg, 1000, card["memory_bytes"])
    assert caches["latents"]["placement"] == "device"
    plain = memory_plan.plan_memory(cfg, full["probe"], "flux1", 1024, gpu=card, caches=caches)
    assert plain["caches"]["device_bytes"] >= caches["latents"]["total_bytes"] > 0.9 * GIB
    hints = memory_plan.cheaper_settings(cfg, full["probe"], "flux1", 1024, card, caches=caches)
    fitting = [h for h in hints if h["fits"]]
    assert fitting
    for hint in fitting:
        again = memory_plan.plan_memory(_cfg(full, **{**MID, **hint["settings"]}), full["probe"], "flux1",
                                        hint["settings"].get("resolution", 1024), gpu=card, caches=caches)
        assert again["caches"]["device_bytes"] > 0
        assert again["total_bytes"] * (1 + memory_plan.DRIFT) <= card["memory_bytes"], hint
    (streamed,) = [h for h in hints if "offload_blocks" in h["settings"]]
    count = streamed["settings"]["offload_blocks"]
    fewer = memory_plan.plan_memory(_cfg(full, **MID, offload_blocks=count - 1), full["probe"], "flux1", 1024,
                                    gpu=card, caches=caches)
    assert fewer["total_bytes"] * (1 + memory_plan.DRIFT) > card["memory_bytes"], "the fewest blocks that fit"
    without = memory_plan.cheaper_settings(cfg, full["probe"], "flux1", 1024, card)
    (alone,) = [h for h in without if "offload_blocks" in h["settings"]]
    assert alone["settings"]["offload_blocks"] < count, "the caches on the card cost streamed blocks"


# ---------------------------------------------------------------------------------- item 6: valid hints only
def _valid(raw: dict, settings: dict) -> list:
    """The config's rules on ``raw`` with ``settings``: parse_config and preflight's family rules."""
    from lora_trainer.preflight.model_checks import _check_family_keys

    try:
        cfg, _ = parse_config({**raw, **settings})
    except ConfigError as exc:
        return exc.problems
    errors: list = []
    _check_family_keys(cfg, "flux1", None, errors)
    return errors


@pytest.mark.parametrize("extra,processes,gib", [
    ({"shard_base": True}, 2, 12),
    ({"shard_base": True, "gradient_checkpointing": True}, 2, 10),
    ({"offload_blocks": 0.5, "gradient_checkpointing": True}, 1, 8),
    ({"use_dora": True}, 1, 16),
    ({"base_quantization": "fp8"}, 1, 8),
    ({"enable_bucketing": True, "min_bucket_resolution": 1024}, 1, 16),  # a lower resolution is outside the buckets
    ({"train_text_encoder": True, "cache_text_embeddings": False}, 2, 16),
])
def test_every_hint_is_a_valid_config(full, extra, processes, gib):
    raw = _raw(full, **extra)
    assert _valid(raw, {}) == []
    card = {"name": f"{gib} GB", "memory_bytes": gib * GIB}
    hints = memory_plan.cheaper_settings(parse_config(raw)[0], full["probe"], "flux1", 1024, card, processes=processes)
    assert hints, "something is still offered"
    for hint in hints:
        assert _valid(raw, hint["settings"]) == [], hint["settings"]


def test_the_refusal_names_a_key_of_a_valid_hint(full, clean_env, tmp_path):
    """Two processes sharding on 12 GB cards: the error's path is the key the first fitting hint changes, and the
    error's options are all valid configs."""
    report = _preflight(full, clean_env, tmp_path, [fake_smi.card("NVIDIA GeForce RTX 3060", 12288)],
                        env={"WORLD_SIZE": "2"}, shard_base=True)
    (err,) = _exceeds(report)
    raw = _raw(full, shard_base=True)
    assert err["options"] and all(_valid(raw, o["settings"]) == [] for o in err["options"])
    first = next((o for o in err["options"] if o["fits"]), err["options"][0])
    assert err["path"] in first["settings"]


# ------------------------------------------------------------------------------ item 10: every local rank pins
def test_streamed_blocks_are_pinned_once_per_local_process(full, clean_env):
    from lora_trainer.preflight import cache_plan
    from lora_trainer.preflight.run import run_preflight

    cfg, warnings = parse_config(_raw(full, device="cpu", offload_blocks=0.5, gradient_checkpointing=True))
    host = run_preflight(cfg, warnings).summary["memory"]["offload"]["host_bytes"]
    clean_env.setattr(cache_plan, "available_host_bytes", lambda: 3 * host)

    def warned() -> list[dict]:
        return [w for w in run_preflight(cfg, warnings).warnings if w["code"] == "offload_host_memory"]

    assert not warned()
    clean_env.setenv("WORLD_SIZE", "4")  # four processes on this machine pin four copies
    (warning,) = warned()
    assert "4 processes" in warning["message"] and warning["path"] == "offload_blocks"
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")  # eight over four machines: two copies here
    assert not warned()


def test_the_cache_plan_shares_host_memory_between_local_processes(full, clean_env):
    """The trainer gives each of the machine's processes its share of the host budget; the plan does the same."""
    from lora_trainer.preflight import cache_plan
    from lora_trainer.preflight.run import run_preflight

    clean_env.setattr(cache_plan, "available_host_bytes", lambda: 32 * GIB)
    cfg, warnings = parse_config(_raw(full, device="cpu"))
    alone = run_preflight(cfg, warnings).summary["caches"]["host_budget_bytes"]
    clean_env.setenv("WORLD_SIZE", "4")
    assert run_preflight(cfg, warnings).summary["caches"]["host_budget_bytes"] == alone // 4
