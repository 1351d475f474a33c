"""End-to-end training through the real CLI on tiny random pipelines (CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _helpers import assert_report, probe_env, probe_records
from conftest import run_cli, write_config


def _train(tmp_path: Path, model: Path, dataset: Path, **params):
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / "out"),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "max_train_steps": 4,
           "log_every_n_steps": 1, "lora_rank": 4, "lora_alpha": 8, "learning_rate": 1e-3, **params}
    res = run_cli("--config", str(write_config(tmp_path / "config.json", **cfg)), timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return res, tmp_path / "out"


def _trained_deltas(ckpt_dir: Path, alpha: float, rank: int) -> dict[str, torch.Tensor]:
    state = load_file(ckpt_dir / "lora_unet.safetensors")
    out = {}
    for key, a in state.items():
        if key.endswith("lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            b = state[f"{path}.lora_B.weight"]
            out[path] = (alpha / rank) * (b.float() @ a.float())
    return out


def test_lora_learns_the_image(tmp_path, tiny_models):
    """Overfit one image: the trained LoRA predicts that image's noise clearly better than the base model."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from lora_trainer.data.images import TrainImage, load_pixels
    from lora_trainer.families import get_family
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "one", n=1, trigger="ohwx")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2"]
    _, out = _train(tmp_path, tiny_models["sd15"], data, max_train_steps=60, learning_rate=3e-3, lora_rank=8,
                    lora_alpha=8, log_every_n_steps=20, checkpointing_steps=None, target_modules=targets)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd15"])
    img_path = next(p for p in Path(data).iterdir() if p.suffix in (".png", ".jpg"))
    img = TrainImage(0, img_path, img_path.name, "", None, 1, (64, 64), (64, 64))
    pixels, _ = load_pixels(img, random_crop=False, rng=None)
    latents = get_family("sd15").encode_latents(pipe.vae, pixels[None])
    caption = (img_path.with_suffix(".txt")).read_text()
    ids = pipe.tokenizer(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    cond = pipe.text_encoder(ids)[0]
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(123)
    noise = torch.randn((16, *latents.shape[1:]), generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    noisy = sched.add_noise(latents.expand(16, -1, -1, -1), noise, t)

    def loss() -> float:
        with torch.no_grad():
            pred = pipe.unet(noisy, t, encoder_hidden_states=cond.expand(16, -1, -1)).sample
        return float(torch.nn.functional.mse_loss(pred, noise))

    base = loss()
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    trained = loss()
    assert trained < 0.5 * base, f"loss on the training image: base {base:.4f}, with LoRA {trained:.4f}"


def test_latent_cache_reused_and_invalidated(tmp_path, tiny_models, dataset):
    import shutil

    from PIL import Image
    from safetensors.torch import save_file

    model = tmp_path / "model"  # a copy: its VAE is replaced below
    shutil.copytree(tiny_models["sd15"], model)
    params = dict(cache_latents_to_disk=True, max_train_steps=1, overwrite_output=True)

    def cache_use(res):
        cache = [e for e in res.events if e["type"] == "status" and e["phase"] == "latent_cache"][-1]
        return cache["reused"], cache["encoded"]

    first, _ = _train(tmp_path, model, dataset, **params)
    assert cache_use(first) == (0, 4)
    second, _ = _train(tmp_path, model, dataset, **params)
    assert cache_use(second) == (4, 0)
    img = next(p for p in sorted(dataset.iterdir()) if p.suffix == ".png")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(img)
    third, _ = _train(tmp_path, model, dataset, **params)
    assert cache_use(third) == (3, 1)
    # A different VAE in the same folder (users swap in e.g. a fixed fp16 SDXL VAE): same config, tensor names,
    # shapes, dtypes and file size, other values. Every latent is stale and must be encoded again.
    vae_file = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(vae_file)
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in weights.items()}, str(vae_file))
    fourth, _ = _train(tmp_path, model, dataset, **params)
    assert cache_use(fourth) == (0, 4)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_text_encoder_lora_exported_and_loadable(tmp_path, tiny_models, dataset, family):
    from diffusers import DiffusionPipeline

    res, out = _train(tmp_path, tiny_models[family], dataset, max_train_steps=2, train_text_encoder=True,
                      text_encoder_lr=5e-4)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
    prefixes = {"sd15": ("lora_te_text_model_encoder_layers_",), "sdxl": ("lora_te1_text_model_encoder_layers_",
                                                                          "lora_te2_text_model_encoder_layers_")}[family]
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), f"no {prefix}* keys"
    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    n_te = sum(1 for n, _ in pipe.text_encoder.named_modules() if n.endswith("lora_A"))
    assert n_te > 0, "text-encoder LoRA layers must be injected by diffusers"


def test_report_samples_and_tensorboard(tmp_path, tiny_models, dataset):
    # The report and loss curve themselves are checked without TensorBoard (test_train_export_and_load_in_diffusers,
    # and on interruption in test_safety); this needs its logs.
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res, out = _train(tmp_path, tiny_models["sd15"], dataset, max_train_steps=3, report_to="tensorboard",
                      validation_steps=3, validation_inference_steps=2)
    assert_report(out, status="completed", step=3, total_steps=3)
    text = (out / "report.html").read_text()
    assert "lora.safetensors" in text
    samples = Path(res.last("completed")["outputs"]["samples_over_steps"])  # the samples figure, in the report
    assert samples.is_file() and f'alt="{samples.name}"' in text
    runs = list((out / "logs").rglob("events.out.tfevents.*"))
    assert runs, "no TensorBoard event file"
    acc = EventAccumulator(str(runs[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert "samples" in acc.Tags()["images"]


def test_bf16_on_the_cpu_trains_and_warns(tmp_path, tiny_models, dataset):
    res, out = _train(tmp_path, tiny_models["sd15"], dataset, mixed_precision="bf16", max_train_steps=2,
                      gradient_checkpointing=True)
    assert res.last("run_started")["mixed_precision"] == "bf16"
    assert "cpu_bf16_slow" in {w["code"] for w in res.of_type("warning")}
    assert all(e["loss"] is not None for e in res.of_type("step"))
    lora = load_file(out / "lora.safetensors")
    assert lora and all(torch.isfinite(t.float()).all() for t in lora.values())


def test_uncached_multi_bucket_run_with_augmentations_and_a_schedule(tmp_path, tiny_models):
    """One run with what the cached runs never use: latents encoded per step (cache_latents false), several
    aspect-ratio buckets in batches of two, flips, random crops, caption dropout, tag shuffling, warm-up and a
    cosine schedule. The probe (tests/_helpers.py) records what each step really got."""
    import math

    from lora_trainer.testing.tiny import make_dataset

    # 2 images each: exactly a 128x128, 192x64 or 64x192 bucket, or 160x128 (bucket 128x128, 32 px to crop).
    data = Path(make_dataset(tmp_path / "data", n=8, sizes=[(128, 128), (192, 64), (64, 192), (160, 128)]))
    for i, caption in enumerate(sorted(data.glob("*.txt"))):
        caption.write_text(f"ohwx, shape {i}, red, blue background, soft light")
    probe = tmp_path / "probe"
    cfg = {"dataset_path": str(data), "base_model": str(tiny_models["sd15"]), "output_path": str(tmp_path / "out"),
           "trigger_words": ["ohwx"], "resolution": 128, "enable_bucketing": True, "min_bucket_resolution": 64,
           "batch_size": 2, "max_train_steps": 8, "log_every_n_steps": 1, "lora_rank": 4, "learning_rate": 1e-3,
           "cache_latents": False, "flip_aug": True, "random_crop": True, "caption_dropout_rate": 0.3,
           "shuffle_tags": True, "keep_tokens": 1, "lr_scheduler": "cosine", "lr_warmup_steps": 3}
    res = run_cli("--config", str(write_config(tmp_path / "c.json", **cfg)), env=probe_env(probe))
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.last("run_started")["bucketing"] is True and res.last("completed")["steps"] == 8
    (rec,) = probe_records(probe)

    # Buckets: each batch is one bucket (the tensors stack), three buckets, batches of two.
    assert all(len({tuple(b) for b in batch["buckets"]}) == 1 for batch in rec["batches"])
    assert {tuple(batch["buckets"][0]) for batch in rec["batches"]} == {(128, 128), (192, 64), (64, 192)}
    assert {len(batch["batch"]) for batch in rec["batches"]} == {2}
    assert {tuple(p["shape"]) for p in rec["pixels"]} == {(3, 128, 128), (3, 64, 192), (3, 192, 64)}

    # Flips happen, for real: a flipped exact-fit image's left column is its unflipped right column.
    by_image: dict[str, list[dict]] = {}
    for p in rec["pixels"]:
        by_image.setdefault(p["rel"], []).append(p)
    flips = [p["flip"] for p in rec["pixels"]]
    assert any(flips) and not all(flips)
    mirrored = [(a, b) for loads in by_image.values() for a in loads for b in loads
                if a["flip"] and not b["flip"] and a["crop"] == b["crop"]]
    assert mirrored and all(abs(a["left"] - b["right"]) < 1e-3 * max(1.0, abs(b["right"])) for a, b in mirrored)
    # Random crops: the 160x128 images are cropped at more than one offset; exact fits never are.
    wide = [p for p in rec["pixels"] if p["rel"].startswith(("img_0003", "img_0007"))]
    assert len({tuple(p["crop"]) for p in wide}) > 1, wide
    assert all(p["crop"] == [0, 0] for p in rec["pixels"] if p not in wide)

    # Caption dropout and tag shuffling: some captions are empty; the same tags come in more than one order,
    # the trigger (keep_tokens 1) always first.
    captions = rec["captions"]
    assert "" in captions and any(captions)
    kept = [c for c in captions if c]
    assert all(c.startswith("ohwx, ") for c in kept)
    orders: dict[tuple, set] = {}
    for c in kept:
        orders.setdefault(tuple(sorted(c.split(", "))), set()).add(c)
    assert any(len(o) > 1 for o in orders.values()), kept

    # Warm-up then cosine decay, as diffusers' schedule defines it, step by step.
    def factor(s: int) -> float:
        return s / 3 if s < 3 else 0.5 * (1 + math.cos(math.pi * (s - 3) / (8 - 3)))

    lrs = [(e["step"], e["lr"]) for e in res.of_type("step")]
    assert [s for s, _ in lrs] == list(range(1, 9))
    for s, lr in lrs:
        assert lr == pytest.approx(1e-3 * factor(s), rel=1e-6, abs=1e-12), (s, lr)
