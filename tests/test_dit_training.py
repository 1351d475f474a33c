"""What the transformer families (FLUX.1, SD3/3.5) do beyond the contract every family keeps
(tests/test_family_contract.py: events, NaN guard, SIGTERM -> resume, exports in diffusers, ComfyUI and Forge):
DoRA, learning, the text cache, samples from cached prompts, single-file transformers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, write_config

# fixture -> (family, variant, CLIP encoders trained with train_text_encoder: exercised on two of the three)
FAMILIES = {"flux1-dev": ("flux1", "dev", ("text_encoder",)), "flux1-schnell": ("flux1", "schnell", ()),
            "sd3": ("sd3", "sd3.5-medium", ("text_encoder", "text_encoder_2"))}
RANK, ALPHA = 4, 8


def _config(tmp_path: Path, model: Path, dataset: Path, name: str, **params) -> Path:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / name),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "max_train_steps": 4,
           "checkpointing_steps": 2, "log_every_n_steps": 1, "lora_rank": RANK, "lora_alpha": ALPHA,
           "learning_rate": 2e-3, "max_sequence_length": 32, **params}
    return write_config(tmp_path / f"{name}.json", **cfg)


def _trained(ckpt: Path, component: str = "transformer") -> dict[str, torch.Tensor]:
    state = load_file(ckpt / f"lora_{component}.safetensors")
    return {k[: -len(".lora_A.weight")]: (ALPHA / RANK) * (state[k.replace("lora_A", "lora_B")].float() @ a.float())
            for k, a in state.items() if k.endswith("lora_A.weight")}


def test_dit_dora_lora_continues_and_loads(tmp_path, tiny_models, dataset):
    """DoRA on FLUX.1: the PEFT file gives diffusers the trained magnitudes, the ComfyUI file carries them as
    output-axis dora_scale; init_lora from either file at a vanishing learning rate writes the same LoRA back."""
    from diffusers import DiffusionPipeline

    model = tiny_models["flux1-schnell"]
    src = run_cli("--config", str(_config(tmp_path, model, dataset, "src", use_dora=True, max_train_steps=3,
                                          checkpointing_steps=None, learning_rate=1e-2)))
    assert src.returncode == 0, src.stderr[-3000:]
    out = tmp_path / "src"
    lora = load_file(out / "lora.safetensors")
    scales = {k: v for k, v in lora.items() if k.endswith(".dora_scale")}
    assert scales and all(v.dtype == torch.float32 and v.shape[1:] == (1,) for v in scales.values())

    trained = load_file(out / "checkpoints" / "step-000003" / "lora_transformer.safetensors")
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    loaded = {f"{n}.lora_magnitude_vector": m.lora_magnitude_vector["default_0"].weight.detach()
              for n, m in pipe.transformer.named_modules() if getattr(m, "lora_magnitude_vector", None)}
    want = {k: v for k, v in trained.items() if k.endswith("lora_magnitude_vector")}
    assert loaded.keys() == want.keys() and want
    base_norms = {f"{n}.lora_magnitude_vector": m.get_base_layer().weight.detach().float().norm(dim=1)
                  for n, m in pipe.transformer.named_modules() if getattr(m, "lora_magnitude_vector", None)}
    for k, v in want.items():
        torch.testing.assert_close(loaded[k].float(), v.float(), msg=k)
        torch.testing.assert_close(scales[f"transformer.{k.removesuffix('.lora_magnitude_vector')}.dora_scale"]
                                   .flatten(), v.float(), msg=k)
    assert any(not torch.allclose(v.float(), base_norms[k]) for k, v in want.items()), "magnitudes were trained"

    frozen = dict(use_dora=True, learning_rate=1e-12, weight_decay=0.0, max_train_steps=1, checkpointing_steps=None)
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        res = run_cli("--config", str(_config(tmp_path, model, dataset, f"cont_{name[:4]}", init_lora=str(out / name),
                                              **frozen)))
        assert res.returncode == 0, res.stderr[-3000:]
        got = load_file(tmp_path / f"cont_{name[:4]}" / "lora.safetensors")
        assert got.keys() == lora.keys(), name
        for k in lora:
            # Bitwise, except that the PEFT file's lora_B was rounded to fp16 before alpha/rank (2) was folded in:
            # in fp16's subnormal range round(2b) and 2 round(b) may differ by one step (2**-24).
            tol = 2.0 ** -24 if name.startswith("pytorch") and k.endswith("lora_B.weight") else 0.0
            torch.testing.assert_close(got[k], lora[k], rtol=0, atol=tol, msg=f"{name} {k}")


def test_flux_lora_learns_the_image(tmp_path, tiny_models):
    """Overfit one image on FLUX.1: with the trained LoRA the velocity error on that image, at fixed noise and
    sigmas, is clearly below the base model's (computed here with diffusers directly, not the trainer). The embedder
    and output projection are trained too: on a random tiny model they carry most of what one image needs."""
    from diffusers import DiffusionPipeline

    from lora_trainer.data.images import TrainImage, load_pixels
    from lora_trainer.families import get_family
    from lora_trainer.families.flux1.adapter import image_ids, pack, unpack
    from lora_trainer.testing.tiny import make_dataset

    model = tiny_models["flux1-schnell"]
    data = make_dataset(tmp_path / "one", n=1, trigger="ohwx")
    res = run_cli("--config", str(_config(tmp_path, model, data, "fit", max_train_steps=200, learning_rate=1e-2,
                                          lora_rank=8, lora_alpha=8, log_every_n_steps=40, checkpointing_steps=None,
                                          target_modules=["transformer_blocks.*", "single_transformer_blocks.*",
                                                          "x_embedder", "proj_out"])))
    assert res.returncode == 0, res.stderr[-3000:]
    pipe = DiffusionPipeline.from_pretrained(model)
    img_path = next(p for p in Path(data).iterdir() if p.suffix in (".png", ".jpg"))
    pixels, _ = load_pixels(TrainImage(0, img_path, img_path.name, "", None, 1, (64, 64), (64, 64)),
                            random_crop=False, rng=None)
    x0 = get_family("flux1").encode_latents(pipe.vae, pixels[None]).expand(16, -1, -1, -1)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(img_path.with_suffix(".txt").read_text(), prompt_2=None,
                                               max_sequence_length=32)
    g = torch.Generator().manual_seed(123)
    # Sigmas as schnell trains them (sigmoid of a standard normal, unshifted: issue 21), where the LoRA learns.
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(torch.randn(16, generator=g)).clamp(0.05, 0.95)
    noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise

    def error() -> float:
        with torch.no_grad():
            out = pipe.transformer(hidden_states=pack(noisy), timestep=sigma, pooled_projections=pooled.expand(16, -1),
                                   encoder_hidden_states=embeds.expand(16, -1, -1), txt_ids=torch.zeros(32, 3),
                                   img_ids=image_ids(8, 8, "cpu", torch.float32), return_dict=False)[0]
        return float(torch.nn.functional.mse_loss(unpack(out, 16, 8, 8), noise - x0))

    base = error()
    pipe.load_lora_weights(str(tmp_path / "fit" / "lora.safetensors"))
    trained = error()
    assert trained < 0.5 * base, f"velocity error on the training image: base {base:.4f}, with LoRA {trained:.4f}"


def test_text_cache_with_caption_dropout_is_reused_from_disk(tmp_path, tiny_models, dataset):
    """T5 families: caption dropout keeps the text cache (the dataset's captions plus ""); with
    cache_text_embeddings_to_disk a rerun takes every entry from disk, runs no encoder, and trains the same."""
    cfg = _config(tmp_path, tiny_models["flux1-schnell"], dataset, "tc", max_train_steps=2, checkpointing_steps=None,
                  caption_dropout_rate=0.5, cache_text_embeddings_to_disk=True, overwrite_output=True)
    runs = [run_cli("--config", str(cfg)) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    plans = [r.last("run_started")["text_cache"] for r in runs]
    assert [(p["placement"], p["entries"], p["hits"], p["encoded"]) for p in plans] == \
        [("host", 5, 0, 5), ("host", 5, 5, 0)]
    status = [e for e in runs[1].events if e["type"] == "status" and e["phase"] == "text_cache"][-1]
    assert (status["reused"], status["encoded"]) == (5, 0)
    assert [e["loss"] for e in runs[0].of_type("step")] == [e["loss"] for e in runs[1].of_type("step")]
    assert len(list((tmp_path / "tc" / "cache" / "text_embeddings").rglob("*.safetensors"))) == 5


@pytest.mark.parametrize("fixture", ["flux1-dev", "sd3"])
def test_samples_from_cached_prompts_after_the_encoders_left(tmp_path, tiny_models, dataset, fixture):
    """Once every caption and validation prompt is cached the text encoders are dropped (T5-XXL: 9.5 GB), and the
    samples drawn from the cached embeddings (CFG's empty negative prompt too, for SD3) are the very images the
    pipeline draws when it encodes the prompts itself."""
    runs = {}
    for name, cache in (("cached", True), ("encoded", False)):
        cfg = _config(tmp_path, tiny_models[fixture], dataset, name, max_train_steps=1, checkpointing_steps=None,
                      validation_steps=1, validation_inference_steps=2, cache_text_embeddings=cache,
                      validation_prompts=["ohwx, a blue square"])
        runs[name] = run_cli("--config", str(cfg))
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert runs["cached"].last("run_started")["text_cache"]["text_encoders_released"] is True
    assert runs["encoded"].last("run_started")["text_cache"] is None
    import numpy as np
    from PIL import Image

    for step in ("step-000000", "step-000001"):
        a, b = (np.asarray(Image.open(tmp_path / n / "samples" / step / "p00_00_seed42.png"), dtype=np.int16)
                for n in ("cached", "encoded"))
        # The cache encodes captions in batches, the pipeline one prompt at a time: the same maths, but float
        # sums in another order, so allow one 8-bit level.
        assert np.abs(a - b).max() <= 1, (step, np.abs(a - b).max())


@pytest.mark.parametrize("fixture", ["flux1-dev", "sd3"])
def test_single_file_transformer_trains_like_the_folder(tmp_path, tiny_models, dataset, fixture):
    """A BFL / SAI single-file transformer (ComfyUI's model.diffusion_model. prefix) with base_model_config for
    the rest: --validate-only names the family and variant, and training gives the LoRA the diffusers
    folder gives (to the last bits, see below). Without base_model_config, offline and with nothing cached, preflight stops before loading."""
    from lora_trainer.testing.single_file import write_single_file

    family, variant, _ = FAMILIES[fixture]
    folder = tiny_models[fixture]
    single = write_single_file(folder, tmp_path / f"{fixture}.safetensors", prefix=True)
    base = dict(max_train_steps=2, checkpointing_steps=None)
    check = run_cli("--config", str(_config(tmp_path, single, dataset, "sf", base_model_config=str(folder), **base)),
                    "--validate-only")
    assert check.returncode == 0, check.stdout[-2000:]
    model = check.last("validation")["summary"]["model"]
    assert (model["kind"], model["family"], model["variant"]) == ("single_file", family, variant)
    runs = {}
    for name, src, extra in (("sf", single, {"base_model_config": str(folder)}), ("dir", folder, {})):
        runs[name] = run_cli("--config", str(_config(tmp_path, src, dataset, name, **base, **extra)))
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    a, b = (load_file(tmp_path / n / "checkpoints" / "step-000002" / "lora_transformer.safetensors") for n in runs)
    # The same weights (tests/test_dit_single_file.py: bitwise), but CPU BLAS results depend on the buffers'
    # memory alignment (mmap'd folder tensors vs converted ones), so the last bits of a step may differ.
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-6, msg=k)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k), "trained"
    bare = run_cli("--config", str(_config(tmp_path, single, dataset, "bare", **base)), "--validate-only",
                   env={"HF_HUB_CACHE": str(tmp_path / "empty_hub")})
    err = bare.last("validation")["errors"][0]
    assert bare.returncode != 0 and err["code"] == "model_config_missing" and "hf download" in err["hint"]
