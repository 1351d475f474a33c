"""The memory plan from weight headers alone: close to published figures for the real FLUX.1-dev and SDXL
architectures (header-only files, no weights), a refusal with settings that fit on a card that is too small (a
stand-in nvidia-smi reports the card), an override, and the drift warning's rule."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT, run_cli, write_config
from lora_trainer.preflight import memory_plan
from lora_trainer.config.config import parse_config
from lora_trainer.preflight.probe import probe_model

sys.path.insert(0, str(ROOT))
from bench.bench_memory_plan import make_folder  # noqa: E402


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    from lora_trainer.testing.tiny import make_dataset

    root = tmp_path_factory.mktemp("full")
    return {"flux1": make_folder(root / "flux1", "flux1"), "sdxl": make_folder(root / "sdxl", "sdxl"),
            "data": make_dataset(root / "data", n=2, trigger="ohwx"), "root": root}


def _plan(full_size, family, gpu=None, **kw):
    cfg, _ = parse_config({"dataset_path": str(full_size["data"]), "base_model": str(full_size[family]),
                           "output_path": str(full_size["root"] / "out"), "trigger_words": ["ohwx"],
                           "mixed_precision": "bf16", **kw})
    probe = probe_model(str(full_size[family]), full_size["root"])
    return memory_plan.plan_memory(cfg, probe, probe.family, kw.get("resolution", 1024), gpu=gpu)


def test_plan_matches_published_figures(full_size):
    card = {"name": "24 GB", "memory_bytes": 24 * 2 ** 30}
    # huggingface/blog flux-qlora.md: bf16 FLUX.1-dev, r4 attention LoRA, 8-bit Adam, GC, cached: 26 GB peak
    flux = _plan(full_size, "flux1", card, resolution=512, lora_rank=4,
                 target_modules=["to_k", "to_q", "to_v", "to_out.0"], optimizer="adamw8bit", gradient_checkpointing=True)
    assert flux["denoiser_params"] == pytest.approx(11.9e9, rel=0.01)
    assert flux["lora_params"] == 4_669_440  # the blog's count for its r4 targets, exactly
    assert 26 * 0.85 <= flux["total_gib"] <= 26 * 1.15 and flux["fits"] is False
    # sd-scripts docs/train_SDXL-en.md: an SDXL LoRA fits 8 GB (GC, 8-bit Adam, cached), 10 GB advised
    sdxl = _plan(full_size, "sdxl", card, resolution=1024, optimizer="adamw8bit", gradient_checkpointing=True)
    assert sdxl["denoiser_params"] == pytest.approx(2.567e9, rel=0.01) and 6 <= sdxl["total_gib"] <= 10
    # each saving does what it says, in the direction it says
    no_gc = _plan(full_size, "sdxl", card, resolution=1024, optimizer="adamw8bit")
    adamw = _plan(full_size, "sdxl", card, resolution=1024, gradient_checkpointing=True)
    assert no_gc["parts_gib"]["activations"] > 3 * sdxl["parts_gib"]["activations"]
    assert adamw["parts_gib"]["lora"] > sdxl["parts_gib"]["lora"]
    uncached = _plan(full_size, "flux1", card, resolution=512, cache_latents=False, cache_text_embeddings=False)
    assert uncached["parts_gib"]["vae"] >= 0 and uncached["total_gib"] > flux["total_gib"]


def test_quantised_base_in_the_plan_and_the_hints(full_size):
    """Frozen Linear weights at 1 byte (fp8, int8) or 0.5625 (NF4), everything else as before; the reference's
    FLUX.1-dev worked example (section 7): 22.2 / 11.1 / 5.7-6.2 GiB of weights, ~16 / ~11 GiB at 1024 px with
    checkpointing, 8-bit AdamW and r16 on all block Linears."""
    card = {"name": "16 GB", "memory_bytes": 16 * 2 ** 30}
    kw = dict(resolution=1024, target_modules="all_linear", optimizer="adamw8bit", gradient_checkpointing=True)
    plans = {q: _plan(full_size, "flux1", card, base_quantization=q, **kw) for q in ("none", "fp8", "int8", "nf4")}
    weights = {q: p["parts_gib"]["denoiser_weights"] for q, p in plans.items()}
    assert weights["none"] == pytest.approx(22.2, rel=0.02)
    assert weights["fp8"] == weights["int8"] == pytest.approx(11.1, rel=0.02)
    assert 5.7 <= weights["nf4"] <= 6.4
    assert plans["int8"]["total_gib"] == pytest.approx(16, rel=0.1)
    assert plans["nf4"]["total_gib"] == pytest.approx(11, rel=0.1)
    for q in ("fp8", "int8", "nf4"):  # only the frozen weights (and the slack on them) change
        same = {k: v for k, v in plans[q]["parts_gib"].items() if k not in ("denoiser_weights", "fixed")}
        assert same == {k: v for k, v in plans["none"]["parts_gib"].items() if k not in ("denoiser_weights", "fixed")}
    assert [plans[q]["fits"] for q in ("none", "int8", "nf4")] == [False, False, True]  # a 16 GB card needs NF4
    # the rule per weight (text encoders too): block Linears small, embeddings / norms / tiny layers at 2 bytes
    t5 = {"encoder.block.0.layer.0.SelfAttention.q.weight": [4096, 4096], "shared.weight": [32128, 4096],
          "encoder.final_layer_norm.weight": [4096], "encoder.block.0.layer.1.tiny.weight": [8, 4096]}
    rest = 32128 * 4096 + 4096 + 8 * 4096
    assert memory_plan._weight_bytes(t5, "none", 2) == 2 * (4096 * 4096 + rest)
    assert memory_plan._weight_bytes(t5, "int8", 2) == 4096 * 4096 + 2 * rest
    assert memory_plan._weight_bytes(t5, "nf4", 2) == int(4096 * 4096 * 0.5625) + 2 * rest
    # the hints offer only formats smaller than the configured one
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight.probe import probe_model

    probe = probe_model(str(full_size["flux1"]), full_size["root"])
    for current, offered in (("none", ["int8", "nf4"]), ("fp8", ["nf4"]), ("nf4", [])):
        cfg, _ = parse_config({"dataset_path": str(full_size["data"]), "base_model": str(full_size["flux1"]),
                               "output_path": str(full_size["root"] / "out"), "trigger_words": ["ohwx"],
                               "mixed_precision": "bf16", "base_quantization": current, **kw})
        options = memory_plan.cheaper_settings(cfg, probe, "flux1", 1024, card)
        assert [o["settings"]["base_quantization"] for o in options if "base_quantization" in o["settings"]] == offered
        if offered:
            assert [o["fits"] for o in options if o["settings"].get("base_quantization") == "nf4"] == [True]


def _fake_nvidia_smi(folder, name, mib):
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_smi  # answers nvidia-smi's queries as the real one does (tests/fake_smi.py)

    return fake_smi.install(folder, [fake_smi.card(name, mib)])


def test_validate_only_refuses_a_card_too_small_and_says_what_fits(full_size, tmp_path):
    cfg = write_config(tmp_path / "c.json", dataset_path=str(full_size["data"]), base_model=str(full_size["flux1"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=1024,
                       mixed_precision="bf16", device="auto")
    env = _fake_nvidia_smi(tmp_path / "bin", "NVIDIA GeForce RTX 4090", 24564)
    res = run_cli("--config", str(cfg), "--validate-only", env=env)
    assert res.returncode == 2
    v = res.last("validation")
    (err,) = [e for e in v["errors"] if e["code"] == "memory_plan_exceeds"]
    assert "RTX 4090" in err["message"] and "24.0 GiB" in err["message"]
    options = err["options"]
    assert options[0]["settings"] == {"gradient_checkpointing": True}  # the cheapest change comes first
    assert all(o["total_gib"] < v["summary"]["memory"]["total_gib"] for o in options)
    assert "gradient_checkpointing: true -> about" in err["hint"] and "ignore_memory_plan" in err["hint"]
    # a quantised base is offered, and at 8 bit FLUX.1-dev fits a 24 GB card at 1024 px (reference: ~16 GiB)
    assert [o["fits"] for o in options if o["settings"].get("base_quantization") == "int8"] == [True]
    assert 'base_quantization: "int8" -> about' in err["hint"]
    # an explicit override trains anyway; a big card needs none
    ok = run_cli("--config", str(write_config(tmp_path / "o.json", **{**__import__("json").loads(cfg.read_text()),
                                                                       "ignore_memory_plan": True})),
                 "--validate-only", env=env)
    assert ok.returncode == 0 and ok.last("validation")["summary"]["memory"]["fits"] is False
    big = run_cli("--config", str(cfg), "--validate-only",
                  env=_fake_nvidia_smi(tmp_path / "bin80", "NVIDIA H100 80GB HBM3", 81559))
    assert big.returncode == 0 and big.last("validation")["summary"]["memory"]["fits"] is True


def test_without_a_gpu_the_plan_is_a_summary(full_size, tmp_path):
    cfg = write_config(tmp_path / "c.json", dataset_path=str(full_size["data"]), base_model=str(full_size["flux1"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=1024, device="cpu")
    res = run_cli("--config", str(cfg), "--validate-only")
    assert res.returncode == 0
    memory = res.last("validation")["summary"]["memory"]
    assert memory["gpu"] is None and memory["fits"] is None and memory["precision"] == "no"  # fp32 on the CPU
    assert not [w for w in res.last("validation")["warnings"] if "memory" in w["code"]]


def test_drift_warning_rule():
    plan = {"total_gib": 10.0, "parts_gib": {}}
    ctx = memory_plan.CONTEXT_BYTES / memory_plan.GIB
    assert memory_plan.drift_warning(plan, {"gpu_reserved_peak_gb": 10.0 - ctx}) is None
    assert memory_plan.drift_warning(plan, {"gpu_reserved_peak_gb": 11.4 - ctx}) is None  # +14%
    assert "+20%" in memory_plan.drift_warning(plan, {"gpu_reserved_peak_gb": 12.0 - ctx})
    assert "-30%" in memory_plan.drift_warning(plan, {"gpu_reserved_peak_gb": 7.0 - ctx})
    assert memory_plan.drift_warning(plan, {"rss_peak_gb": 30.0}) is None  # CPU: RSS is not comparable


def test_streamed_blocks_in_the_plan_and_the_hints(full_size):
    """offload_blocks moves the last blocks' frozen weights to host memory and keeps one of them on the card: for
    FLUX.1-dev half the blocks (29 of 57) are single blocks of 141.6 M parameters, 0.26 GiB each in bf16; on a
    12 GB card the hint names the fewest streamed blocks that fit."""
    kw = dict(resolution=1024, optimizer="adamw8bit", gradient_checkpointing=True)
    plain = _plan(full_size, "flux1", **kw)
    half = _plan(full_size, "flux1", offload_blocks=0.5, **kw)
    single = 141.6e6 * 2 / 2 ** 30
    assert plain["offload"] is None
    assert (half["offload"]["blocks"], half["offload"]["of"]) == (29, 57)
    assert half["offload"]["host_gib"] == pytest.approx(29 * single, rel=0.01)
    drop = plain["parts_gib"]["denoiser_weights"] - half["parts_gib"]["denoiser_weights"]
    assert drop == pytest.approx(28 * single, rel=0.01)
    card = {"name": "12 GB", "memory_bytes": 12 * 2 ** 30}
    cfg, _ = parse_config({"dataset_path": str(full_size["data"]), "base_model": str(full_size["flux1"]),
                           "output_path": str(full_size["root"] / "out"), "trigger_words": ["ohwx"],
                           "mixed_precision": "bf16", **kw})
    probe = probe_model(str(full_size["flux1"]), full_size["root"])
    (hint,) = [o for o in memory_plan.cheaper_settings(cfg, probe, "flux1", 1024, card)
               if "offload_blocks" in o["settings"]]
    count = hint["settings"]["offload_blocks"]
    assert hint["fits"] and 1 < count < 57
    fewer = _plan(full_size, "flux1", card, offload_blocks=count - 1, **kw)
    # a hint leaves HINT_HEADROOM free (tests/test_memory_hints.py)
    assert fewer["total_bytes"] * (1 + memory_plan.HINT_HEADROOM) > card["memory_bytes"] and hint["total_gib"] <= 12, \
        "the fewest blocks that fit"
