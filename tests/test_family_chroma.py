"""Chroma's quirks (families/chroma/): the T5 mask (real tokens plus one pad) and the prediction against the
pipeline's own transformer call and sampler step, sampling from cached embeddings with CFG, packing and latent
normalisation, the BFL single-file converter (against diffusers' own at Chroma1's real widths), FLUX.1 and Chroma
files told apart, Chroma Radiance refused, Flash warned, the presets on the pruned module names, ComfyUI's map over
Chroma's weights, and the hub filter on Chroma1-HD's files. The trained-run checks are the contract suite's."""
from __future__ import annotations

import fnmatch
import json

import pytest
import torch

from lora_trainer.families import SPECS, get_family
from lora_trainer.families.chroma import convert
from lora_trainer.families.chroma.adapter import transformer_mask
from lora_trainer.families.flux1.adapter import image_ids, pack, unpack
from lora_trainer.families.signature import DistillFacts, FileKeys, Match, Refusal

CAPTIONS = ["a red circle", "ohwx, a blue square on a table"]
SPEC = SPECS["chroma"]


@pytest.fixture(scope="module")
def pipe():
    from lora_trainer.families.chroma.tiny import build

    p = build()
    for m in (p.text_encoder, p.transformer, p.vae):
        m.eval()  # as from_pretrained gives them (T5's dropout is live in a freshly built model)
    return p


@pytest.fixture(scope="module")
def family_and_comps(pipe):
    fam = get_family("chroma")
    comps = fam._from_pipe(pipe)
    fam.variant = comps.variant
    return fam, comps


def _encode(fam, comps, captions, length=32):
    fam.cfg = type("Cfg", (), {"max_sequence_length": length, "validation_guidance_scale": None})()
    with torch.no_grad():
        return fam.encode_text(comps, captions, torch.device("cpu"))


def test_mask_keeps_the_real_tokens_and_one_pad_as_the_pipeline(pipe, family_and_comps):
    fam, comps = family_and_comps
    cond = _encode(fam, comps, CAPTIONS)
    with torch.no_grad():
        embeds, _, mask, *_ = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=32)
    assert torch.equal(cond["attention_mask"], mask) and cond["attention_mask"].dtype == torch.float32
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=0)
    real = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=32, return_tensors="pt").attention_mask.sum(1)
    assert cond["attention_mask"].sum(1).tolist() == (real + 1).tolist()
    assert cond["attention_mask"].shape == (2, 32) and cond["prompt_embeds"].shape[:2] == (2, 32)
    # T5 ran with the mask: unmasked, the real tokens' states differ (what FLUX.1's unmasked encoding would give)
    ids = pipe.tokenizer(CAPTIONS[:1], padding="max_length", max_length=32, return_tensors="pt").input_ids
    with torch.no_grad():
        unmasked = pipe.text_encoder(ids)[0]
    assert not torch.allclose(unmasked[0, :3], cond["prompt_embeds"][0, :3], atol=1e-5)


def test_predict_is_the_pipelines_transformer_call_and_euler_step(pipe, family_and_comps):
    """One step of ChromaPipeline (no CFG) given the cached prompt as the trainer's samples give it: the transformer's
    inputs (timestep sigma, text and image ids, the mask _prepare_attention_mask builds) and the Euler step
    x + (sigma_next - sigma) * v equal predict's; a flipped sign, sigma given as 1 - sigma, or no mask are caught."""
    fam, comps = family_and_comps
    cond = _encode(fam, comps, CAPTIONS[:1])
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}

    def grab(p, i, t, kw):
        if i == 0:
            seen["after"] = kw["latents"].clone()
            seen["sigmas"] = p.scheduler.sigmas[:2].clone()
        return kw

    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    try:
        pipe(**fam.prompt_kwargs(cond, None), guidance_scale=1.0, num_inference_steps=3, height=64, width=64,
             latents=pack(latents), output_type="latent", callback_on_step_end=grab)
    finally:
        hook.remove()
    s0, s1 = seen["sigmas"]
    assert 0 < s1 < s0 <= 1
    mask = transformer_mask(cond["attention_mask"], 16)
    assert mask.dtype == torch.bool and mask.shape == (1, 32 + 16) and torch.equal(calls[0]["attention_mask"], mask)
    with torch.no_grad():
        v = fam.predict(comps.denoisers, latents, s0.reshape(1), cond, None)
        wrong_t = fam.predict(comps.denoisers, latents, (1 - s0).reshape(1), cond, None)
        unmasked = unpack(pipe.transformer(hidden_states=pack(latents), timestep=s0.reshape(1),
                                           encoder_hidden_states=cond["prompt_embeds"], txt_ids=calls[0]["txt_ids"],
                                           img_ids=calls[0]["img_ids"], return_dict=False)[0], 16, 8, 8)
    after = unpack(seen["after"], 16, 8, 8)
    torch.testing.assert_close(latents + (s1 - s0) * v, after, rtol=1e-4, atol=1e-5)
    for wrong in (-v, wrong_t, unmasked):
        assert not torch.allclose(latents + (s1 - s0) * wrong, after, rtol=1e-3, atol=1e-4)


def test_masked_tokens_are_invisible(pipe, family_and_comps):
    """The padding past the first pad token changes nothing predict computes; with the 0./1. float mask diffusers'
    pipeline passes (diffusers #12116) it does: the reason the mask is boolean."""
    fam, comps = family_and_comps
    cond = _encode(fam, comps, CAPTIONS[:1])
    n = int(cond["attention_mask"].sum())
    noisy = {**cond, "prompt_embeds": cond["prompt_embeds"].clone()}
    noisy["prompt_embeds"][:, n:] += 5.0
    latents, sigma = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.6])

    def as_floats(c):
        return pipe.transformer(hidden_states=pack(latents), timestep=sigma, encoder_hidden_states=c["prompt_embeds"],
                                txt_ids=torch.zeros(32, 3), img_ids=image_ids(8, 8, "cpu", torch.float32),
                                attention_mask=transformer_mask(c["attention_mask"], 16).float(), return_dict=False)[0]

    with torch.no_grad():
        a, b = (fam.predict(comps.denoisers, latents, sigma, c, None) for c in (cond, noisy))
        fa, fb = as_floats(cond), as_floats(noisy)
    assert torch.equal(a, b)
    assert not torch.allclose(fa, fb, atol=1e-4)


def test_samples_from_cached_embeddings_equal_the_pipelines_own_encoding(pipe, family_and_comps):
    """CFG (the pipeline's default 5.0) against the cached "": the image the pipeline gives from its own
    encode_prompt for the prompt and "" (masks as booleans, as the trainer passes them)."""
    fam, comps = family_and_comps
    cond, negative = _encode(fam, comps, CAPTIONS[:1]), _encode(fam, comps, [""])
    assert fam.sample_negative_prompt and fam.guidance_scale == 5.0 and fam.train_guidance is None

    def run(**kw):
        return pipe(num_inference_steps=2, height=64, width=64, output_type="np", max_sequence_length=32,
                    generator=torch.Generator().manual_seed(0), **kw).images[0]

    with torch.no_grad():
        embeds, _, mask, neg, _, neg_mask = pipe.encode_prompt(CAPTIONS[:1], negative_prompt="", max_sequence_length=32)
    own = run(prompt_embeds=embeds, prompt_attention_mask=mask.bool(), negative_prompt_embeds=neg,
              negative_prompt_attention_mask=neg_mask.bool(), guidance_scale=fam.guidance_scale)
    cached = run(**fam.prompt_kwargs(cond, negative), guidance_scale=fam.guidance_scale)
    assert abs(cached - own).max() < 1e-5
    assert abs(run(**fam.prompt_kwargs(cond, None), guidance_scale=1.0) - own).max() > 1e-4  # CFG mattered


def test_packing_and_latent_normalisation_are_the_pipelines(pipe, family_and_comps):
    from diffusers import ChromaPipeline

    fam, _ = family_and_comps
    x = torch.randn(2, 16, 8, 6)
    assert torch.equal(pack(x), ChromaPipeline._pack_latents(x, 2, 16, 8, 6))
    assert torch.equal(unpack(pack(x), 16, 8, 6), x)
    assert torch.equal(ChromaPipeline._unpack_latents(pack(x), 64, 48, 8), x)  # pixels, vae_scale_factor 8
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    z = fam.encode_latents(pipe.vae, pixels)
    with torch.no_grad():
        mode = pipe.vae.encode(pixels).latent_dist.mode()
    # the pipeline decodes latents / scaling_factor + shift_factor
    torch.testing.assert_close(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor, mode)
    assert fam.latent_layout(dict(pipe.vae.config)) == (16, 8)


def test_single_file_has_bfl_names(tiny_models):
    """The tiny single file's names (loading it back: tests/test_dit_single_file.py, which covers every family)."""
    from safetensors.torch import load_file

    model = tiny_models["chroma"]
    config = json.loads((model / "transformer" / "config.json").read_text())
    bfl = convert.from_diffusers(load_file(model / "transformer" / "diffusion_pytorch_model.safetensors"), config)
    assert {"distilled_guidance_layer.layers.0.in_layer.weight", "distilled_guidance_layer.norms.0.scale",
            "double_blocks.0.txt_attn.qkv.bias", "single_blocks.0.linear2.weight",
            "final_layer.linear.weight"} <= set(bfl)
    assert not any(k.startswith(("time_in.", "vector_in.", "guidance_in.")) or "_mod." in k or "modulation" in k
                   for k in bfl)


def test_converter_matches_diffusers_at_chroma1_widths():
    """diffusers' convert_chroma_transformer_checkpoint_to_diffusers hard-codes 3072: at Chroma1's real widths (one
    block of each kind, meta tensors) it and ours take the same BFL file to the same names and shapes."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = ChromaTransformer2DModel(num_layers=1, num_single_layers=1, approximator_layers=2)
    config = dict(model.config)
    sd = model.state_dict()
    bfl = convert.from_diffusers(sd, config)
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = convert.to_diffusers(dict(bfl), config)
    assert ours.keys() == theirs.keys() == sd.keys()
    assert all(ours[k].shape == theirs[k].shape == sd[k].shape for k in sd)
    refusal, figures = convert.config_checks({k: list(v.shape) for k, v in bfl.items()}, config, "config.json")
    assert refusal is None and all(a == b for _, a, b in figures), figures


def test_converter_values_match_diffusers(tiny_models):
    """Value for value on the tiny model's tensors. diffusers splits the single blocks' linear1 at 3 x 3072 + 12288
    rows: it gets a numbered 21504-row stand-in, which ours cuts with a 3072-wide config (double blocks left out)."""
    from safetensors.torch import load_file
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    model = tiny_models["chroma"]
    config = json.loads((model / "transformer" / "config.json").read_text())
    bfl = convert.from_diffusers(load_file(model / "transformer" / "diffusion_pytorch_model.safetensors"), config)
    stand_in = {**bfl, "single_blocks.0.linear1.weight": torch.arange(21504 * 2.0).reshape(21504, 2),
                "single_blocks.0.linear1.bias": -torch.arange(21504.0)}
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(
        {"model.diffusion_model." + k: v for k, v in stand_in.items()})
    ours = convert.to_diffusers(dict(bfl), config)
    assert ours.keys() == theirs.keys()
    split = [f"single_transformer_blocks.0.{m}.{k}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
             for k in ("weight", "bias")]
    assert [k for k in ours if k not in split and not torch.equal(ours[k], theirs[k])] == []
    wide = convert.to_diffusers(dict(stand_in), {**config, "num_layers": 0, "num_attention_heads": 24,
                                                 "attention_head_dim": 128})
    assert [k for k in split if not torch.equal(wide[k], theirs[k])] == []


def _keys(names, prefix=""):
    return FileKeys(frozenset(prefix + n for n in names), {prefix + n: {"shape": [4, 4]} for n in names})


def _flux1_names():
    return ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
            "guidance_in.in_layer.weight", "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mod.lin.weight",
            "single_blocks.0.linear1.weight", "single_blocks.0.modulation.lin.weight", "final_layer.linear.weight"]


def _chroma_names():
    return ["img_in.weight", "txt_in.weight", "distilled_guidance_layer.in_proj.weight",
            "distilled_guidance_layer.layers.0.in_layer.weight", "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.0.linear1.weight", "final_layer.linear.weight"]


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux1_and_chroma_files_are_told_apart(prefix):
    from lora_trainer.families import get_signature

    flux1, chroma = get_signature("flux1"), get_signature("chroma")
    c, f = _keys(_chroma_names(), prefix), _keys(_flux1_names(), prefix)
    assert isinstance(chroma.match_file(c), Match) and flux1.match_file(c) is None
    assert isinstance(flux1.match_file(f), Match) and chroma.match_file(f) is None
    radiance = _keys([n for n in _chroma_names() if n != "img_in.weight"]
                     + ["img_in_patch.weight", "nerf_blocks.0.norm.scale"], prefix)
    r = chroma.match_file(radiance)
    assert isinstance(r, Refusal) and r.model == "Chroma Radiance" and flux1.match_file(radiance) is None


def test_flash_is_a_distilled_release():
    from lora_trainer.families import get_signature

    sig = get_signature("chroma")
    facts = dict(pipeline_config={}, denoiser_config={}, metadata={})
    flash = sig.distilled(DistillFacts(name="lodestones/Chroma1-Flash", **facts))
    assert flash is not None and flash.base == "lodestones/Chroma1-HD"
    assert sig.distilled(DistillFacts(name="/models/Chroma1-Flash.safetensors", **facts)) is not None
    for name in ("lodestones/Chroma1-HD", "lodestones/Chroma1-Base", "/m/flash-attn/Chroma1-HD"):
        assert sig.distilled(DistillFacts(name=name, **facts)) is None, name


def _linear_names(**config) -> dict[str, int]:
    from diffusers import ChromaTransformer2DModel

    with torch.device("meta"):
        model = ChromaTransformer2DModel(**config)
    return {n: 2 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("config", [{"num_layers": 2, "num_single_layers": 2}, "tiny"], ids=["full-width", "tiny"])
def test_presets_resolve_on_the_pruned_modules(pipe, config):
    from lora_trainer.families.spec import peft_targets

    modules = ({n: 2 for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
               if config == "tiny" else _linear_names(**config))
    for name, patterns in SPEC.presets.items():
        hits = [n for n in modules for t in peft_targets(patterns, modules) if n == t or n.endswith("." + t)]
        assert hits, name
        assert not any("distilled_guidance_layer" in n or n in ("proj_out", "x_embedder", "context_embedder")
                       for n in hits), (name, hits)
    every = set(peft_targets(SPEC.presets["all_linear"], modules))
    blocks = {n for n in modules if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert every == blocks, sorted(every ^ blocks)[:5]
    assert not any(n.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")) for n in modules)


def test_comfyui_maps_chromas_own_weights():
    """ComfyUI's FLUX map over Chroma: q/k/v and the MLP land (by offset) on Chroma's BFL weights; FLUX.1's
    modulation Linears, which Chroma lacks, land nowhere."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from comfy_dit_rules import comfy_model_keys, missing_targets, unloaded_keys

    cfg = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
           "in_channels": 64, "joint_attention_dim": 32, "axes_dims_rope": [4, 6, 6], "approximator_num_channels": 16,
           "approximator_hidden_dim": 32, "approximator_layers": 1}
    model = comfy_model_keys("chroma", cfg)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.weight" in model
    assert not any(".img_mod." in k or "modulation.lin" in k for k in model)
    good = [f"transformer.{m}.lora_{ab}.weight" for m in ("transformer_blocks.0.attn.to_k",
                                                          "single_transformer_blocks.0.proj_mlp",
                                                          "single_transformer_blocks.0.proj_out") for ab in "AB"]
    assert unloaded_keys(good, "chroma", cfg) == [] and missing_targets(good, "chroma", cfg) == []
    pruned = [f"transformer.transformer_blocks.0.norm1.linear.lora_{ab}.weight" for ab in "AB"]
    assert unloaded_keys(pruned, "chroma", cfg) or missing_targets(pruned, "chroma", cfg)


CHROMA1_HD_FILES = [  # lodestones/Chroma1-HD (diffusers folder + the root single file)
    "model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "text_encoder/config.json",
    "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
    "text_encoder/model.safetensors.index.json", "tokenizer/spiece.model", "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json", "tokenizer/added_tokens.json",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
CHROMA1_HD_DECOYS = ["Chroma1-HD.safetensors", "text_encoder/pytorch_model.bin", "images/sample.png", "README.md"]


def test_hub_filter_takes_chroma1_hd_pipeline_only():
    from lora_trainer.runtime.loading import HUB_IGNORE_PATTERNS, HUB_PATTERNS

    def fetched(name):  # huggingface_hub filter_repo_objects: fnmatch on allow, then on ignore
        return (any(fnmatch.fnmatch(name, p) for p in HUB_PATTERNS)
                and not any(fnmatch.fnmatch(name, p) for p in HUB_IGNORE_PATTERNS))

    assert [f for f in CHROMA1_HD_FILES if not fetched(f)] == []
    assert [f for f in CHROMA1_HD_DECOYS if fetched(f)] == []


def test_memory_plan_is_flux1_devs_less_the_pruned_weights(tmp_path):
    """No published Chroma LoRA memory figure was found; FLUX.1-dev's plan is calibrated against published ones
    (tests/test_memory_plan.py) and Chroma has its blocks and token counts: at the same settings its plan is FLUX's
    less the 3.0 B parameters Chroma prunes (bf16: 5.6 GiB), the text cache's entries are T5's alone."""
    import sys

    from conftest import ROOT
    from lora_trainer.config.config import parse_config
    from lora_trainer.preflight import memory_plan
    from lora_trainer.preflight.probe import probe_model
    from lora_trainer.testing.tiny import make_dataset

    sys.path.insert(0, str(ROOT))
    from bench.bench_memory_plan import make_folder
    from bench.chroma_check import FULL_SIZE, make_plan_folder

    data = make_dataset(tmp_path / "data", n=2, trigger="ohwx")
    folders = {"chroma": make_plan_folder(tmp_path / "chroma"), "flux1": make_folder(tmp_path / "flux1", "flux1")}

    def plan(family):
        cfg, _ = parse_config({"dataset_path": str(data), "base_model": str(folders[family]), "lora_rank": 16,
                               "output_path": str(tmp_path / "out"), "trigger_words": ["ohwx"],
                               "mixed_precision": "bf16", "optimizer": "adamw8bit", "gradient_checkpointing": True})
        probe = probe_model(str(folders[family]), tmp_path)
        assert probe.family == family, probe.problems
        return memory_plan.plan_memory(cfg, probe, family, 1024, gpu=None)

    chroma, flux = plan("chroma"), plan("flux1")
    print({k: (chroma[k], flux[k]) for k in ("denoiser_params", "total_gib", "parts_gib")})
    assert chroma["denoiser_params"] == pytest.approx(FULL_SIZE[0], rel=0.001)
    pruned_gib = (flux["denoiser_params"] - chroma["denoiser_params"]) * 2 / 2 ** 30
    assert 5.0 < pruned_gib < 6.0
    assert chroma["total_gib"] == pytest.approx(flux["total_gib"] - pruned_gib, abs=1.0), (chroma, flux)
    assert chroma["parts_gib"]["activations"] == pytest.approx(flux["parts_gib"]["activations"], rel=0.05)
