"""Krea 2's quirks, each checked against diffusers' own Krea2Pipeline code on the tiny random pipeline: prompts
through the pipeline's encode_prompt (template, 34 dropped tokens, 5-token suffix, the taps), the denoiser call
(packing, position ids, sigma as the timestep, the velocity's sign) against the pipeline's own sampler step,
latents normalised as the pipeline decodes, the resolution shift with Krea's scheduler constants, Turbo's warning
and sampling defaults, the single-file layout and the native LoRA names against both diffusers converters, the
ComfyUI file through diffusers' converter, and the hub download filter."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fnmatch
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from lora_trainer.families import get_family, get_signature
from lora_trainer.families.krea2.adapter import pack, unpack
from lora_trainer.families.krea2.tiny import build

CAPTIONS = ["ohwx, a red circle", "ohwx, a small blue square on a green background, photo"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipe():
    return build(None, seed=0)


def _family(pipe, length=48, guidance=None):
    fam = get_family("krea2")
    fam.cfg = SimpleNamespace(max_sequence_length=length, validation_guidance_scale=guidance,
                              validation_inference_steps=None)
    fam.pipeline_config = {"text_encoder_select_layers": list(pipe.text_encoder_select_layers),
                           "is_distilled": pipe.config.is_distilled}
    comps = fam.components({"transformer": pipe.transformer}, pipe.vae, {"text_encoder": pipe.text_encoder},
                           {"text_encoder": pipe.tokenizer}, dict(pipe.scheduler.config))
    return fam, comps


def test_prompts_are_the_pipelines_encode_prompt(pipe):
    """The tiny tokenizer splits the template as the real one does (34 prefix tokens, 5 suffix tokens), so what
    is kept starts at the caption; the cache rows are the pipeline's encode_prompt output exactly."""
    fam, comps = _family(pipe)
    tok = pipe.tokenizer
    assert len(tok(pipe.prompt_template_encode_prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    assert len(tok(pipe.prompt_template_encode_suffix).input_ids) == pipe.prompt_template_encode_num_suffix_tokens == 5
    cond = fam.encode_text(comps, CAPTIONS, CPU)
    embeds, mask = pipe.encode_prompt(CAPTIONS, device=CPU, max_sequence_length=48)
    assert cond["prompt_embeds"].shape == (2, 48, 3, 16) and cond["prompt_embeds_mask"].dtype == torch.bool
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["prompt_embeds_mask"], mask)
    for i, caption in enumerate(CAPTIONS):
        assert int(mask[i].sum()) == len(tok(caption).input_ids) + 5
    # Row 0, tap 0 (the embeddings) is the caption's first token.
    first = tok(CAPTIONS[0]).input_ids[0]
    table = pipe.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(cond["prompt_embeds"][0, 0, 0], table[first])


def test_prediction_is_the_velocity_the_pipelines_sampler_steps_with(pipe):
    """One Euler step of the pipeline from sigma s to 0: its latents are x - s v, where v is what predict returns
    at sigma s. A timestep in [0, 1000], a flipped sign, other position ids or packing would differ."""
    fam, comps = _family(pipe)
    cond = fam.encode_text(comps, CAPTIONS[:1], CPU)
    x = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = pipe(prompt_embeds=cond["prompt_embeds"], prompt_embeds_mask=cond["prompt_embeds_mask"],
                   latents=pack(x), sigmas=[0.6], height=64, width=48, guidance_scale=0.0,
                   max_sequence_length=48, output_type="latent").images
        s = float(pipe.scheduler.sigmas[0])
        v = fam.predict(comps.denoisers, x, torch.tensor([s]), cond, None)
    assert 0.6 < s < 1 and v.abs().mean() > 1e-3  # the dynamic shift moved it
    torch.testing.assert_close(unpack(out, 8, 6), x - s * v, rtol=1e-4, atol=1e-5)


def test_packing_is_the_pipelines_and_round_trips(pipe):
    x = torch.randn(2, 16, 8, 6)
    packed = pack(x)
    assert torch.equal(packed, pipe._pack_latents(x, 2, 16, 8, 6)) and packed.shape == (2, 12, 64)
    assert torch.equal(unpack(packed, 8, 6), x)


def test_latents_are_normalised_as_the_pipeline_decodes(pipe):
    fam, _ = _family(pipe)
    pixels = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = fam.encode_latents(pipe.vae, pixels)
    assert latents.shape == (1, 16, 8, 6) and fam.latent_layout(dict(pipe.vae.config)) == (16, 8)
    cfg = pipe.vae.config
    raw = pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()
    # the pipeline's decode: latents / (1 / std) + mean
    std_inv = 1.0 / torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents[:, :, None] / std_inv + torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1),
                               raw, rtol=1e-5, atol=1e-5)


def test_resolution_shift_uses_krea_scheduler_constants(pipe):
    from diffusers.pipelines.krea2.pipeline_krea2 import calculate_shift

    from lora_trainer.objectives.flow import calculate_shift as ours

    fam, comps = _family(pipe)
    s = fam.objective(comps).settings
    assert (s.sigma_sampling, s.shift) == ("sigmoid", "resolution")
    assert (s.base_shift, s.max_shift, s.base_seq_len, s.max_seq_len) == (0.5, 1.15, 256, 6400)
    tokens = (1024 // 16) ** 2
    want = calculate_shift(tokens, 256, 6400, 0.5, 1.15)
    assert ours(tokens, s.base_seq_len, s.max_seq_len, s.base_shift, s.max_shift) == pytest.approx(want)


def test_turbo_warns_naming_raw_and_samples_in_8_steps_without_cfg(tmp_path, tiny_models):
    from lora_trainer.families.signature import DistillFacts
    from lora_trainer.preflight.probe import probe_model

    sig = get_signature("krea2")
    assert sig.distilled(DistillFacts("x", {"is_distilled": False}, {}, {})) is None
    assert sig.distilled(DistillFacts("krea/Krea-2-Raw", {}, {}, {})) is None
    for name in ("krea/Krea-2-Turbo", "/m/krea2_turbo_bf16.safetensors"):
        assert sig.distilled(DistillFacts(name, {}, {}, {})).base == "krea/Krea-2-Raw"
    model = tmp_path / "turbo"
    shutil.copytree(tiny_models["krea2"], model)
    index = json.loads((model / "model_index.json").read_text())
    assert index["is_distilled"] is False and index["text_encoder_select_layers"] == [0, 1, 2]
    assert not [w for w in probe_model(str(tiny_models["krea2"])).warnings if w["code"] == "model_distilled"]
    (model / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    (warn,) = [w for w in probe_model(str(model)).warnings if w["code"] == "model_distilled"]
    assert "krea/Krea-2-Raw" in json.dumps(warn)

    fam = get_family("krea2")
    fam.cfg = SimpleNamespace(validation_guidance_scale=None, validation_inference_steps=None,
                              max_sequence_length=None)
    fam._load_folder(model, dtype=torch.float32, progress=None)
    assert fam.is_distilled and fam.sample_steps() == 8 and fam.sample_kwargs()["guidance_scale"] == 0.0
    assert fam.prompt_kwargs({"prompt_embeds": 1, "prompt_embeds_mask": torch.ones(1)},
                             {"prompt_embeds": 2, "prompt_embeds_mask": torch.ones(1)}).keys() == \
        {"prompt_embeds", "prompt_embeds_mask"}
    fam.pipeline_config = {}
    assert fam.sample_steps() == 28 and fam.sample_kwargs()["guidance_scale"] == 4.5


def test_single_file_layout_round_trips_through_diffusers_converter(pipe):
    from lora_trainer.families.krea2.convert import config_checks, from_diffusers, to_diffusers

    sd = pipe.transformer.state_dict()
    cfg = dict(pipe.transformer.config)
    native = from_diffusers(sd, cfg)
    for key in ("first.weight", "txtfusion.projector.weight", "blocks.0.attn.wq.weight", "blocks.1.mod.lin",
                "last.modulation.lin", "txtmlp.0.scale", "blocks.0.attn.qknorm.qnorm.scale", "last.linear.bias"):
        assert key in native, key
    assert native["blocks.1.mod.lin"].ndim == 1
    back = to_diffusers({f"model.diffusion_model.{k}": v for k, v in native.items()}, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    refusal, checks = config_checks({k: list(v.shape) for k, v in native.items()}, cfg, "config.json")
    assert refusal is None and all(a == b for _, a, b in checks), checks


def test_native_lora_names_are_what_diffusers_converter_reads(pipe):
    """Every Linear (all_linear) named natively, then read back by diffusers' Krea 2 LoRA converter: the same
    module, with the file's deltas at alpha / rank (folded, no .alpha tensor)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_krea2_lora_to_diffusers

    from lora_trainer.families.krea2.export import comfy_state_dict

    g = torch.Generator().manual_seed(0)
    linears = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 2 * 8 + 2 * 8 + 1 + 7  # blocks, text-fusion blocks, projector, the rest
    state = {}
    for n, m in linears.items():
        state[f"{n}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g)
        state[f"{n}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g)
    sd = comfy_state_dict({"transformer": state}, alpha=8.0, rank=4, dtype=torch.float32)
    assert all(k.startswith("diffusion_model.") and ".alpha" not in k for k in sd)
    assert "diffusion_model.blocks.0.attn.wq.lora_A.weight" in sd
    converted = _convert_non_diffusers_krea2_lora_to_diffusers(dict(sd))
    assert set(converted) == {f"transformer.{k}" for k in state}
    for n in linears:
        got = converted[f"transformer.{n}.lora_B.weight"] @ converted[f"transformer.{n}.lora_A.weight"]
        want = 2.0 * state[f"{n}.lora_B.weight"] @ state[f"{n}.lora_A.weight"]
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError):  # why the file carries no alpha
        _convert_non_diffusers_krea2_lora_to_diffusers({**sd, "diffusion_model.first.alpha": torch.tensor(8.0)})


def test_presets_select_the_documented_layers(pipe):
    from lora_trainer.families.spec import peft_targets

    spec = get_family("krea2").spec
    modules = {n: m.weight.dim() for n, m in pipe.transformer.named_modules() if hasattr(m, "weight")
               and isinstance(getattr(m, "weight"), torch.Tensor)}
    every = peft_targets(spec.presets["all_linear"], modules)
    linears = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(every) >= linears - {"img_in", "txt_in.linear_1", "txt_in.linear_2", "time_embed.linear_1",
                                    "time_embed.linear_2", "time_mod_proj", "final_layer.linear"}
    assert not {n for n in every if "norm" in n.rsplit(".", 1)[-1]}
    assert spec.targets("auto") == ("to_q", "to_k", "to_v", "to_out.0", "to_gate")


# Krea-2-Raw beside its pipeline: root single files, other precisions and pickles must not come along.
KREA_DECOYS = {
    "krea2_raw_bf16.safetensors": b"decoy root single-file transformer" * 64,
    "transformer/diffusion_pytorch_model.bf16-00001-of-00002.safetensors": b"decoy bf16 shard" * 64,
    "text_encoder/pytorch_model.bin": b"\x80\x04decoy pickle" * 64,
}


def test_hub_patterns_take_the_sharded_pipeline_and_tokenizer_only(tiny_models):
    from lora_trainer.runtime.loading import HUB_IGNORE_PATTERNS, HUB_PATTERNS

    files = {p.relative_to(tiny_models["krea2"]).as_posix() for p in tiny_models["krea2"].rglob("*") if p.is_file()}
    files |= {"transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
              "transformer/diffusion_pytorch_model.safetensors.index.json",
              "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
              "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/chat_template.jinja"}

    def wanted(f):
        return any(fnmatch.fnmatch(f, p) for p in HUB_PATTERNS) and not any(
            fnmatch.fnmatch(f, p) for p in HUB_IGNORE_PATTERNS)

    missed = {f for f in files if not wanted(f) and not f.endswith("generation_config.json")}
    assert missed == set() and not {f for f in KREA_DECOYS if wanted(f)}


def _turbo_folder(tmp_path, raw):
    """Krea-2-Turbo as its files differ from Raw's: other transformer weights, is_distilled in model_index.json."""
    model = tmp_path / "turbo"
    shutil.copytree(raw, model)
    build(None, seed=1).transformer.save_pretrained(model / "transformer")
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    return model


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "single_file"])
def test_validation_base_model_samples_with_turbo_and_the_current_lora(tmp_path, tiny_models, dataset, as_file):
    """Train on Raw, sample on Turbo (validation_base_model, its folder or its single file, Turbo by its name):
    the sample is what diffusers' Turbo pipeline draws with the run's final LoRA loaded, at Turbo's own defaults
    (8 steps, no CFG, mu 1.15)."""
    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    from conftest import run_cli, write_config
    from lora_trainer.testing.single_file import write_single_file

    turbo = _turbo_folder(tmp_path, tiny_models["krea2"])
    source = write_single_file(turbo, tmp_path / "krea2_turbo_bf16.safetensors") if as_file else turbo
    cfg = write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models["krea2"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64,
                       min_bucket_resolution=64, max_train_steps=2, validation_steps=2, lora_rank=4, lora_alpha=8,
                       learning_rate=1e-1, target_modules="all_linear", validation_prompts=["ohwx, a red circle"], save_precision="fp32",
                       validation_base_model=str(source))
    res = run_cli("--config", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    (sample,) = [e for e in res.of_type("sample") if e["step"] == 2]
    got = np.asarray(Image.open(sample["path"])).astype(int)

    def draw(folder, lora=True, **kwargs):
        pipe = DiffusionPipeline.from_pretrained(folder)
        if lora:
            pipe.load_lora_weights(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
        return np.asarray(pipe(prompt="ohwx, a red circle", height=64, width=64, output_type="pil",
                               generator=torch.Generator().manual_seed(sample["seed"]), **kwargs).images[0]).astype(int)

    want = draw(turbo, num_inference_steps=8, guidance_scale=0.0)
    assert np.abs(got - want).max() <= 1, np.abs(got - want).max()
    raw = draw(tiny_models["krea2"], num_inference_steps=8, guidance_scale=0.0)
    assert np.abs(got - raw).max() > 8, "the samples must come from the validation model"
    bare = draw(turbo, lora=False, num_inference_steps=8, guidance_scale=0.0)
    assert np.abs(got - bare).max() > 8, "the samples must carry the current LoRA"


def test_validation_base_model_is_checked_by_validate_only(tmp_path, tiny_models, dataset):
    from conftest import run_cli, write_config

    common = dict(dataset_path=str(dataset), base_model=str(tiny_models["krea2"]), output_path=str(tmp_path / "out"),
                  trigger_words=["ohwx"], resolution=64)
    res = run_cli("--config", str(write_config(tmp_path / "a.json", **common,
                                               validation_base_model=str(tmp_path / "missing"))), "--validate-only")
    assert res.returncode != 0
    assert [e["path"] for e in res.last("validation")["errors"]] == ["validation_base_model"]
    turbo = _turbo_folder(tmp_path, tiny_models["krea2"])
    ok = run_cli("--config", str(write_config(tmp_path / "b.json", **common, validation_base_model=str(turbo))),
                 "--validate-only")
    assert ok.returncode == 0, ok.last("validation")
