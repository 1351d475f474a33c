"""The memory plan from weight headers alone: close to published figures for the real FLUX.1-dev and SDXL
architectures (header-only files, no weights), a refusal with settings that fit on a card that is too small (a
stand-in nvidia-smi reports the card), an override, and the drift warning's rule."""
from __future__ import annotations

import math
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
    for q in ("fp8", "int8", "nf4"):  # only the frozen weights, their upcast copies (and the slack) change
        rest = ("denoiser_weights", "weight_copies", "fixed")
        same = {k: v for k, v in plans[q]["parts_gib"].items() if k not in rest}
        assert same == {k: v for k, v in plans["none"]["parts_gib"].items() if k not in rest}
    # with checkpointing fp8 / int8 hold the bf16 copies of the block being recomputed (a double block's Linears
    # but its adaLN modulation: 24 d^2), NF4 none
    copies = {q: plans[q]["parts_gib"]["weight_copies"] for q in plans}
    assert copies == {"none": 0, "fp8": round(24 * 3072 ** 2 * 2 / 2 ** 30, 2), "int8": copies["fp8"], "nf4": 0}
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
    """offload_blocks moves the last blocks' frozen weights to host memory and keeps two of them on the card (the
    streamer's slots: the block running and the next being copied in): for
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
    assert drop == pytest.approx(27 * single, rel=0.01)
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


# ------------------------------------------------------------------------- what each part counts (issue 21)
def _header_params(folder, comp, keep=lambda name: True) -> int:
    from lora_trainer.preflight.probe import weight_shapes

    files = [p.name for p in (folder / comp).glob("*.safetensors")]
    return sum(math.prod(s) for k, s in weight_shapes(folder / comp, files).items() if keep(k))


def test_activations_follow_the_resolved_targets(full_size):
    """FLUX.1's default targets ("auto" = attention_mlp) and any list with feed-forward layers save the larger
    activations; only attention-only selections the smaller ones (23 vs 13 x L x d x 2 bytes per block)."""
    kw = dict(resolution=1024, optimizer="adamw8bit")
    attention = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    acts = {name: _plan(full_size, "flux1", target_modules=t, **kw)["parts_gib"]["activations"] for name, t in (
        ("auto", "auto"), ("preset", "attention_mlp"), ("list_ff", [*attention, "ff.net.0.proj", "ff.net.2"]),
        ("list_single_mlp", ["to_q", "proj_mlp"]), ("attention", "attention"), ("list_attention", attention))}
    tokens, d, blocks = 4096 + 512, 3072, 57
    assert acts["auto"] == pytest.approx(blocks * 23 * tokens * d * 2 / memory_plan.GIB, abs=0.01)  # 34.6 GiB
    assert acts["auto"] == acts["preset"] == acts["list_ff"] == acts["list_single_mlp"]
    assert acts["attention"] == acts["list_attention"] == pytest.approx(acts["auto"] * 13 / 23, abs=0.01)
    # the UNet families too: SDXL with its feed-forward layers saves more than attention only (x1.2, measured)
    sdxl = {t: _plan(full_size, "sdxl", target_modules=t, **kw)["parts_gib"]["activations"]
            for t in ("auto", "attention_mlp")}
    assert sdxl["attention_mlp"] == pytest.approx(1.2 * sdxl["auto"], abs=0.01)


def test_text_length_follows_max_sequence_length(full_size):
    """The text tokens in the transformer's sequence are the run's T5 length (max_sequence_length, else the
    variant's default: 512 for dev, 256 for schnell), not a fixed 512."""
    import dataclasses

    kw = dict(resolution=1024, optimizer="adamw8bit", target_modules="attention")
    dev = _plan(full_size, "flux1", **kw)["parts_gib"]["activations"]
    short = _plan(full_size, "flux1", max_sequence_length=128, **kw)["parts_gib"]["activations"]
    assert short == pytest.approx(dev * (4096 + 128) / (4096 + 512), abs=0.01)
    cfg, _ = parse_config({"dataset_path": str(full_size["data"]), "base_model": str(full_size["flux1"]),
                           "output_path": str(full_size["root"] / "out"), "trigger_words": ["ohwx"],
                           "mixed_precision": "bf16", **kw})
    probe = dataclasses.replace(probe_model(str(full_size["flux1"]), full_size["root"]), variant="schnell")
    schnell = memory_plan.plan_memory(cfg, probe, "flux1", 1024, gpu=None)["parts_gib"]["activations"]
    assert schnell == pytest.approx(dev * (4096 + 256) / (4096 + 512), abs=0.01)


def test_uncached_parts_each_cost_what_they_hold(full_size):
    """Each cache setting changes only its own part: the VAE at fp32 (it is loaded in fp32) when latents are not
    cached, the text encoders at the compute precision when their outputs are not."""
    kw = dict(resolution=512, lora_rank=4, optimizer="adamw8bit", gradient_checkpointing=True)
    cached = _plan(full_size, "flux1", **kw)
    no_latents = _plan(full_size, "flux1", cache_latents=False, **kw)
    no_text = _plan(full_size, "flux1", cache_text_embeddings=False, **kw)
    assert cached["parts_gib"]["vae"] == cached["parts_gib"]["text_encoders"] == 0
    vae = _header_params(full_size["flux1"], "vae")
    assert vae == pytest.approx(83.8e6, rel=0.01)
    assert no_latents["parts_gib"]["vae"] == round(4 * vae / memory_plan.GIB, 2) > 0
    te = _header_params(full_size["flux1"], "text_encoder") + _header_params(full_size["flux1"], "text_encoder_2")
    assert te == pytest.approx(0.123e9 + 4.762e9, rel=0.01)  # CLIP-L + T5-XXL's encoder
    assert no_text["parts_gib"]["text_encoders"] == round(2 * te / memory_plan.GIB, 2)
    for plan, part in ((no_latents, "vae"), (no_text, "text_encoders")):
        assert plan["total_bytes"] > cached["total_bytes"]
        assert {k: v for k, v in plan["parts_gib"].items() if k not in (part, "activations", "fixed")} == \
            {k: v for k, v in cached["parts_gib"].items() if k not in (part, "activations", "fixed")}


def test_vae_encode_is_planned_when_latents_are_not_cached(full_size):
    """Without a latent cache each step encodes its batch: the encoder's scratch (measured here on the CPU with the
    full-size FLUX.1 VAE) is planned, and where it is larger than the denoiser's activations (SDXL with
    checkpointing at 1024 px) it sets the activation part."""
    import torch
    from diffusers import AutoencoderKL

    from bench.models import FLUX_VAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**FLUX_VAE).eval().requires_grad_(False)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad(), _LivePeak() as peak:
        vae.encode(x).latent_dist.mode()
    planned = memory_plan._vae_encode_bytes(dict(vae.config), 128, 1)
    assert abs(peak.peak - planned) <= memory_plan.DRIFT * planned, (peak.peak, planned)
    kw = dict(resolution=1024, optimizer="adamw8bit", gradient_checkpointing=True)
    cached, uncached = _plan(full_size, "sdxl", **kw), _plan(full_size, "sdxl", cache_latents=False, **kw)
    encode = memory_plan._vae_encode_bytes({"block_out_channels": [128]}, 1024, 1)
    assert uncached["parts_gib"]["activations"] == round(encode / memory_plan.GIB, 2) > \
        cached["parts_gib"]["activations"]


class _LivePeak:
    """The peak of the bytes held by tensors made inside the block (a dispatch mode: each op's outputs counted
    until their storage is freed)."""

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        outer = self
        self.peak = self.live = 0
        seen: set[int] = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if hasattr(t, "untyped_storage") and id(t.untyped_storage()) not in seen:
                        st = t.untyped_storage()
                        key, n = id(st), st.nbytes()
                        seen.add(key)
                        outer.live += n
                        outer.peak = max(outer.peak, outer.live)
                        weakref.finalize(st, outer._free, key, n, seen)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def _free(self, key, n, seen):
        seen.discard(key)
        self.live -= n

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_text_encoders_keep_wo_at_full_precision(full_size):
    """T5's wo is never quantised (its class pins it to fp32, quantize.py leaves it alone): a quantised text encoder
    is planned with wo at the load precision (bf16 here, fp32 when loading at fp16), not at 1 byte."""
    import diffusers
    import transformers

    from lora_trainer.families import SPECS
    from lora_trainer.preflight.probe import weight_shapes
    from lora_trainer.runtime import quantize

    kw = dict(resolution=512, optimizer="adamw8bit", gradient_checkpointing=True, cache_text_embeddings=False)
    te = {q: _plan(full_size, "flux1", text_encoder_quantization=q, **kw)["parts_gib"]["text_encoders"]
          for q in ("none", "int8")}
    folder = full_size["flux1"]
    wo = _header_params(folder, "text_encoder_2", lambda k: k.endswith("DenseReluDense.wo.weight"))
    assert wo == 24 * 4096 * 10240  # 1.0 B weights

    def small(k, s):
        return k.endswith(".weight") and quantize.quantizable(k[:-7], s) and ".wo." not in k

    quantised = sum(math.prod(s) for comp in ("text_encoder", "text_encoder_2")
                    for k, s in weight_shapes(folder / comp, [p.name for p in (folder / comp).glob("*.safetensors")]
                                              ).items() if small(k, s))
    params = _header_params(folder, "text_encoder") + _header_params(folder, "text_encoder_2")
    assert te["none"] == round(2 * params / memory_plan.GIB, 2)
    assert te["int8"] == round((2 * params - quantised) / memory_plan.GIB, 2)  # wo among the 2-byte weights
    fp16 = _plan(full_size, "flux1", **{**kw, "mixed_precision": "fp16"})["parts_gib"]["text_encoders"]
    assert fp16 == round((2 * params + 2 * wo) / memory_plan.GIB, 2)  # wo upcast to fp32 when loading at fp16
    for spec in SPECS.values():  # the torch-free table is what the classes say
        for comp in (*spec.denoisers, *spec.text_encoders):
            name = spec.component_classes[comp]
            cls = getattr(transformers, name, None) or getattr(diffusers, name)
            assert tuple(getattr(cls, "_keep_in_fp32_modules", None) or ()) == quantize.KEEP_IN_FP32.get(name, ()), name


def test_fp8_and_int8_without_checkpointing_cost_more_than_bf16(full_size):
    """fp8 and int8 Linears upcast their weight for each matmul and autograd keeps that copy for the backward: without
    checkpointing FLUX.1-dev holds a bf16 copy of every block Linear but the adaLN modulation ones (912 of its
    1254 d^2 block weights), more than the bf16 base saves; NF4 keeps none. With checkpointing only the block
    being recomputed holds its copies (a double block's 24 d^2)."""
    kw = dict(resolution=1024, optimizer="adamw8bit", target_modules="attention")
    plans = {q: _plan(full_size, "flux1", base_quantization=q, **kw) for q in ("none", "fp8", "int8", "nf4")}
    d2 = 3072 ** 2
    for q in ("fp8", "int8"):
        assert plans[q]["total_bytes"] > plans["none"]["total_bytes"], q
        assert plans[q]["parts_gib"]["weight_copies"] == round(912 * d2 * 2 / memory_plan.GIB, 2)
    assert plans["nf4"]["total_bytes"] < plans["none"]["total_bytes"]
    assert plans["nf4"]["parts_gib"]["weight_copies"] == 0
    gc = _plan(full_size, "flux1", base_quantization="fp8", gradient_checkpointing=True, **kw)
    assert gc["parts_gib"]["weight_copies"] == round(24 * d2 * 2 / memory_plan.GIB, 2)


def test_upcast_copies_match_what_autograd_holds(tiny_models):
    """The plan's weight_copies part against what autograd keeps, measured with saved_tensors_hooks on the tiny
    FLUX.1 through the trainer's own quantize + LoRA path (lora_trainer/testing/memory.py): without checkpointing
    the whole model's copies, with it the largest block's (each block measured as its recompute keeps it). fp8 and
    int8 hold copies, NF4 none."""
    from lora_trainer.testing.memory import copies_against_plan

    for row in copies_against_plan(tiny_models["flux1-dev"] / "transformer"):
        print(row)
        # NF4 plans none: what it adds must stay within the tolerance of what fp8 holds
        assert abs(row["measured"] - row["planned"]) <= memory_plan.DRIFT * row["fp8_planned"], row
        assert (row["planned"] > 0) == (row["format"] != "nf4")


def test_qwen_image_plan_is_near_musubi_tuners_figures(full_size):
    """musubi-tuner docs/qwen_image.md (1024 px, gradient checkpointing, cached latents and text, LoRA on the
    blocks' attention and MLP): 42 GB with a bf16 base, 30 GB with fp8, 24 / 12 GB with fp8 and 16 / 45 blocks
    swapped. The plan: +18% for bf16 (its 42 GB leaves ~1 GB beside the 38 GiB of bf16 weights, less than any run
    holds), within 10% below for the fp8 ones (musubi's swap keeps less resident than offload_blocks' one block)."""
    folder = make_folder(full_size["root"] / "qwen_image", "qwen_image")
    full_size["qwen_image"] = folder
    kw = dict(lora_rank=16, optimizer="adamw8bit", gradient_checkpointing=True, target_modules="attention_mlp")
    bf16 = _plan(full_size, "qwen_image", **kw)
    assert bf16["denoiser_params"] == pytest.approx(20.43e9, rel=0.001)
    for settings, published_gb in (({}, 42), ({"base_quantization": "fp8"}, 30),
                                   ({"base_quantization": "fp8", "offload_blocks": 16}, 24),
                                   ({"base_quantization": "fp8", "offload_blocks": 45}, 12)):
        plan = _plan(full_size, "qwen_image", **kw, **settings)
        published = published_gb * 1e9 / 2 ** 30
        assert 0.85 * published <= plan["total_gib"] <= 1.2 * published, (settings, plan["total_gib"], published)
    # The text cache holds Qwen2.5-VL's 3584-wide rows at the run's max_sequence_length (512 by default).
    from lora_trainer.families import SPECS

    assert SPECS["qwen_image"].text_length(None) == 512
    assert SPECS["qwen_image"].text_entry.elements(512) * 2 == 512 * 3584 * 2


def test_qwen_image_21_plan_counts_its_16px_tokens(full_size):
    """Qwen-Image 2.1 (no published training figure exists: no peer trains it): the real 7.115 B transformer from
    header-only files; image sides are multiples of 32 but a token is 16 px (Activations.token_pixels), so 1024 px
    is 4096 image tokens beside the 512 text rows, and the text cache holds Qwen3-VL's 4096-wide rows."""
    from bench.qwen_image21_check import plan_folder
    from lora_trainer.families import SPECS

    full_size["qwen_image21"] = plan_folder(full_size["root"] / "qwen_image21")
    kw = dict(resolution=1024, lora_rank=16, optimizer="adamw8bit", gradient_checkpointing=True)
    plan = _plan(full_size, "qwen_image21", **kw)
    assert plan["denoiser_params"] == pytest.approx(7.115e9, rel=0.001)
    tokens, d = 4096 + 512, 32 * 128
    per_block = memory_plan._BLOCK_FACTOR["attention"] * tokens * d * 2
    assert plan["parts_gib"]["activations"] == round((32 * int(1.1 * tokens * d * 2) + per_block) / memory_plan.GIB, 2)
    assert 14 < plan["total_gib"] < 20  # 13.25 GiB of bf16 weights + activations + fixed
    assert _plan(full_size, "qwen_image21", **kw, base_quantization="fp8")["total_gib"] < plan["total_gib"]
    assert SPECS["qwen_image21"].text_entry.elements(512) == 512 * 4096
