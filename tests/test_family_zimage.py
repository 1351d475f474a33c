"""Z-Image's quirks (families/zimage/): the timestep and output sign against the pipeline's own sampler step, the
prompt template and unpadding against the pipeline's encode_prompt, latent normalisation, the single-file
converter round trip, Turbo detection, and the ComfyUI file through diffusers' Z-Image LoRA converter."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lora_trainer.families import get_family
from lora_trainer.families.zimage.adapter import unpadded

CAPTIONS = ["a red circle", "ohwx, a blue square on a table"]


@pytest.fixture(scope="module")
def pipe():
    from lora_trainer.families.zimage.tiny import build

    return build()


@pytest.fixture(scope="module")
def family_and_comps(pipe):
    fam = get_family("zimage")
    comps = fam._from_pipe(pipe)
    fam.variant = comps.variant
    return fam, comps


def test_predict_matches_the_pipelines_euler_step(pipe, family_and_comps):
    """One denoising step of ZImagePipeline (its 1 - t/1000 timestep, its negation, its scheduler) equals one Euler
    step x + (sigma_next - sigma) * predict(x, sigma); negating predict (the transformer's raw sign) fails it."""
    fam, comps = family_and_comps
    with torch.no_grad():
        cond = fam.encode_text(comps, CAPTIONS[:1], torch.device("cpu"))
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}

    def grab(p, i, t, kw):
        if i == 0:
            seen["after"] = kw["latents"].clone()
            seen["sigmas"] = p.scheduler.sigmas[:2].clone()
        return kw

    pipe(prompt_embeds=unpadded(cond), guidance_scale=0.0, num_inference_steps=3, height=64, width=64,
         latents=latents.clone(), output_type="latent", callback_on_step_end=grab)
    s0, s1 = seen["sigmas"]
    assert 0 < s1 < s0 <= 1
    with torch.no_grad():
        v = fam.predict(comps.denoisers, latents, s0.reshape(1), cond, None)
    torch.testing.assert_close(latents + (s1 - s0) * v, seen["after"], rtol=1e-4, atol=1e-5)
    flipped = latents + (s1 - s0) * -v
    assert not torch.allclose(flipped, seen["after"], rtol=1e-3, atol=1e-4)
    with torch.no_grad():  # sigma passed where the model wants 1 - sigma: also caught
        wrong_t = fam.predict(comps.denoisers, latents, (1 - s0).reshape(1), cond, None)
    assert not torch.allclose(latents + (s1 - s0) * wrong_t, seen["after"], rtol=1e-3, atol=1e-4)


def test_text_cache_rows_are_the_pipelines_prompt_embeds(pipe, family_and_comps):
    """Padded rows + mask give back exactly the pipeline's list (chat template with enable_thinking=True, padding
    removed); a template without thinking (the empty think block) would differ."""
    fam, comps = family_and_comps
    with torch.no_grad():
        cond = fam.encode_text(comps, CAPTIONS, torch.device("cpu"))
        want = pipe._encode_prompt(list(CAPTIONS), device="cpu", max_sequence_length=fam.max_sequence_length)
    assert cond["prompt_embeds"].shape == (2, 512, 16) and cond["prompt_mask"].dtype == torch.bool
    got = unpadded(cond)
    assert [g.shape for g in got] == [w.shape for w in want] and all(torch.equal(g, w) for g, w in zip(got, want))
    assert not cond["prompt_embeds"][~cond["prompt_mask"]].any()  # padding rows stored as zeros
    tok = comps.tokenizers["text_encoder"]
    text = tok.apply_chat_template([{"role": "user", "content": CAPTIONS[0]}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)
    assert text.endswith("<|im_start|>assistant\n") and "<think>" not in text
    no_think = tok.apply_chat_template([{"role": "user", "content": CAPTIONS[0]}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
    assert len(tok(no_think).input_ids) != got[0].shape[0]


def test_prompt_kwargs_sample_like_the_prompt(pipe, family_and_comps):
    fam, comps = family_and_comps
    with torch.no_grad():
        cond = fam.encode_text(comps, CAPTIONS[:1], torch.device("cpu"))
        neg = fam.encode_text(comps, [""], torch.device("cpu"))

    def run(**kw):
        return pipe(**kw, guidance_scale=4.0, num_inference_steps=2, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    torch.testing.assert_close(run(**fam.prompt_kwargs(cond, neg)), run(prompt=CAPTIONS[0], negative_prompt=""))


def test_latents_normalised_as_the_pipeline_decodes(family_and_comps):
    fam, comps = family_and_comps
    vae = comps.vae
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lat = fam.encode_latents(vae, pixels)
    raw = vae.encode(pixels).latent_dist.mode()
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    torch.testing.assert_close(lat / vae.config.scaling_factor + vae.config.shift_factor, raw)  # pipeline's decode
    assert fam.latent_layout(dict(vae.config)) == (16, 8)


def test_single_file_layout_round_trips(pipe):
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    from lora_trainer.families.zimage.convert import from_diffusers, to_diffusers

    sd = pipe.transformer.state_dict()
    native = from_diffusers(sd, dict(pipe.transformer.config))
    assert "layers.0.attention.qkv.weight" in native and "layers.0.attention.out.weight" in native
    assert "x_embedder.weight" in native and "final_layer.linear.weight" in native
    assert not any(".to_q." in k or "all_x_embedder" in k for k in native)
    assert CHECKPOINT_KEY_NAMES["z-image-turbo"][1] in native  # what diffusers detects the layout by
    back = to_diffusers(dict(native), dict(pipe.transformer.config))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_single_file_is_zimage_and_lumina2_stays_refused(tmp_path, pipe):
    from safetensors.torch import save_file

    from lora_trainer.families.zimage.convert import from_diffusers
    from lora_trainer.preflight.probe import probe_model

    native = from_diffusers(pipe.transformer.state_dict(), dict(pipe.transformer.config))
    save_file({k: v.contiguous() for k, v in native.items()}, tmp_path / "z_image_turbo_bf16.safetensors")
    p = probe_model(str(tmp_path / "z_image_turbo_bf16.safetensors"))
    assert p.ok and p.family == "zimage" and "Z-Image layout" in p.family_evidence
    assert [w["code"] for w in p.warnings] == ["model_distilled"]  # by its name
    # Lumina 2's NextDiT shares the names but modulates with adaLN_modulation.1 (behind a SiLU)
    lumina = {k.replace("adaLN_modulation.0", "adaLN_modulation.1"): v.contiguous() for k, v in native.items()}
    save_file(lumina, tmp_path / "lumina.safetensors")
    p = probe_model(str(tmp_path / "lumina.safetensors"))
    assert p.family is None and "Lumina 2" in p.problems[0]["message"]


def _folder_with_scheduler(tmp_path, tiny_models, shift: float) -> Path:
    folder = tmp_path / f"zimage-{shift}"
    shutil.copytree(tiny_models["zimage"], folder)
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "shift": shift}))
    return folder


def test_turbo_is_told_by_its_scheduler_and_name(tmp_path, tiny_models):
    from lora_trainer.families.signature import DistillFacts
    from lora_trainer.families.zimage.signature import SIGNATURE
    from lora_trainer.preflight.probe import probe_model

    base = probe_model(str(tiny_models["zimage"]))
    assert base.ok and base.warnings == ()
    turbo = probe_model(str(_folder_with_scheduler(tmp_path, tiny_models, 3.0)))
    (warning,) = turbo.warnings
    assert warning["code"] == "model_distilled" and "Z-Image-Turbo" in warning["message"]
    assert "shift 3.0" in warning["message"] and warning["hint"] == "train on Tongyi-MAI/Z-Image"
    assert SIGNATURE.distilled(DistillFacts("Tongyi-MAI/Z-Image-Turbo", {}, {}, {})) is not None
    assert SIGNATURE.distilled(DistillFacts("Tongyi-MAI/Z-Image", {}, {}, {}, {"shift": 6.0})) is None


def test_turbo_samples_without_cfg(tmp_path, tiny_models):
    fam = get_family("zimage")
    fam.load(_folder_with_scheduler(tmp_path, tiny_models, 3.0), single_file=False, dtype=torch.float32)
    assert fam.turbo and fam.sample_kwargs()["guidance_scale"] == 0.0
    fam = get_family("zimage")
    fam.load(tiny_models["zimage"], single_file=False, dtype=torch.float32)
    assert not fam.turbo and fam.sample_kwargs()["guidance_scale"] == 4.0


def test_comfy_file_through_diffusers_converter(pipe):
    """diffusion_model. + .alpha (ai-toolkit's layout) -> diffusers' Z-Image converter: diffusers' module names,
    alpha / rank baked in, nothing left over."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    from lora_trainer.outputs.lora_files import alpha_state_dict

    rank, alpha = 4, 8.0
    g = torch.Generator().manual_seed(0)
    names = ["layers.0.attention.to_q", "noise_refiner.0.attention.to_out.0", "context_refiner.0.feed_forward.w2",
             "layers.1.adaLN_modulation.0"]
    mods = dict(pipe.transformer.named_modules())
    states = {"transformer": {}}
    for n in names:
        m = mods[n]
        states["transformer"][f"{n}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g)
        states["transformer"][f"{n}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g)
    sd = alpha_state_dict("Z-Image", states, alpha=alpha, rank=rank, dtype=torch.float32)
    assert set(sd) == {f"diffusion_model.{n}.{p}" for n in names for p in ("lora_A.weight", "lora_B.weight", "alpha")}
    out = _convert_non_diffusers_z_image_lora_to_diffusers(dict(sd))
    assert set(out) == {f"transformer.{n}.{p}" for n in names for p in ("lora_A.weight", "lora_B.weight")}
    for n in names:
        want = (alpha / rank) * states["transformer"][f"{n}.lora_B.weight"] @ states["transformer"][f"{n}.lora_A.weight"]
        got = out[f"transformer.{n}.lora_B.weight"] @ out[f"transformer.{n}.lora_A.weight"]
        torch.testing.assert_close(got, want)


def test_train_text_encoder_is_refused(tmp_path, tiny_models, dataset):
    from conftest import run_cli, write_config

    cfg = write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models["zimage"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64,
                       train_text_encoder=True)
    res = run_cli("--config", str(cfg), "--validate-only")
    assert res.returncode != 0
    assert any(e["path"] == "train_text_encoder" for e in res.last("validation")["errors"])
