"""What is FLUX.2-specific (families/_flux2, flux2 = dev, flux2_klein), against the diffusers pipelines' own code on
the tiny pipelines: latent normalisation by the VAE's BatchNorm statistics (non-trivial in the tiny VAE), packing
and 4-axis ids, the timestep convention and output sign (one step of the pipeline's own sampler), the prompt
template and text_encoder_out_layers (the pipeline's encode_prompt), variant detection on the published configs and
BFL key sets, the distilled-release warning, the single-file converters, and the kohya tool file read back through
diffusers' FLUX.2 converter."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

import comfy_dit_rules as rules  # tests/ is on sys.path
from lora_trainer.families import get_family, get_signature
from lora_trainer.families._flux2 import adapter as f2
from lora_trainer.families._flux2.convert import from_diffusers, to_diffusers
from lora_trainer.families._flux2.export import flux2_kohya_state_dict
from lora_trainer.families.signature import DistillFacts, FileKeys

# Published transformer configs (reference dit-families.md §3; diffusers' class defaults are dev's).
DEV = {"num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48, "attention_head_dim": 128,
       "joint_attention_dim": 15360, "in_channels": 128, "guidance_embeds": True}
KLEIN_9B = {**DEV, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32, "joint_attention_dim": 12288,
            "guidance_embeds": False}
KLEIN_4B = {**DEV, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680,
            "guidance_embeds": False}


@pytest.fixture(scope="module")
def klein():
    from lora_trainer.families.flux2_klein.tiny import build

    return build("klein-4b")


@pytest.fixture(scope="module")
def dev():
    from lora_trainer.families.flux2.tiny import build

    return build("dev")


def _family(name, pipe):
    family = get_family(name)
    comps = family._from_pipe(pipe)
    family.variant = comps.variant
    return family, comps


def _pixels(seed=0):
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tiny_vae_has_nontrivial_batchnorm_statistics(klein):
    # At 0 / 1 a trainer that skipped the normalisation would match the pipeline (trap 12).
    assert klein.vae.bn.running_mean.abs().min() > 0 and (klein.vae.bn.running_var - 1).abs().max() > 0.05


def test_latents_are_the_pipelines_and_round_trip(klein):
    family, _ = _family("flux2_klein", klein)
    pixels = _pixels()
    latents = family.encode_latents(klein.vae, pixels)
    assert latents.shape == (2, 4 * klein.vae.config.latent_channels, 4, 4)
    assert family.latent_layout(dict(klein.vae.config)) == (latents.shape[1], 16)
    torch.testing.assert_close(latents, klein._encode_vae_image(pixels, generator=None))
    # the sampler's end: denormalise, unpatchify -> the VAE's own latent (what it decodes)
    mean, std = f2.bn_stats(klein.vae)
    raw = klein._unpatchify_latents(latents * std + mean)
    torch.testing.assert_close(raw, klein.vae.encode(pixels).latent_dist.mode(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f2.unpatchify(f2.patchify(raw)), raw)
    torch.testing.assert_close(f2.patchify(raw), klein._patchify_latents(raw))


def test_ids_and_packing_are_the_pipelines(klein):
    x = torch.randn(2, 32, 3, 5)
    packed = klein._pack_latents(x)
    ids = klein._prepare_latent_ids(x)
    assert torch.equal(f2.latent_ids(2, 3, 5, "cpu"), ids)
    assert torch.equal(f2.text_ids(2, 7, "cpu"), klein._prepare_text_ids(torch.zeros(2, 7, 4)))
    # predict's unpacking (a permute) is _unpack_latents_with_ids for that grid
    assert torch.equal(packed.permute(0, 2, 1).reshape(x.shape), klein._unpack_latents_with_ids(packed, ids, 3, 5))


@pytest.mark.parametrize("name", ["flux2_klein", "flux2"])
def test_one_sampler_step_is_predict(request, name):
    """The pipeline's own Euler step from sigma 1 (one step: sigma 1 -> 0) lands on x - v with v = predict(x, 1):
    timestep as sigma (not 1000 sigma), velocity sign, packing, ids and (dev) guidance as the sampler feeds them."""
    pipe = request.getfixturevalue("klein" if name == "flux2_klein" else "dev")
    family, comps = _family(name, pipe)
    cond = family.encode_text(comps, ["ohwx, a red circle"], "cpu")
    x = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if name == "flux2":  # the sampler feeds its guidance_scale to the embedder; training feeds train_guidance
            family.cfg = type("C", (), {"train_guidance_scale": 2.5})()
        v = family.predict(comps.denoisers, x, torch.ones(1), cond, None)
        out = pipe(prompt_embeds=cond["prompt_embeds"], latents=x, num_inference_steps=1,
                   guidance_scale=2.5 if name == "flux2" else 1.0, height=64, width=64, output_type="latent").images
    if name == "flux2":  # Flux2Pipeline's "latent" output is the packed, still normalised latents
        torch.testing.assert_close(out, pipe._pack_latents(x - v), rtol=1e-4, atol=1e-5)
        return
    mean, std = f2.bn_stats(pipe.vae)
    torch.testing.assert_close(out, f2.unpatchify((x - v) * std + mean), rtol=1e-4, atol=1e-5)


def test_klein_prompt_is_the_pipelines(klein):
    family, comps = _family("flux2_klein", klein)
    family.cfg = type("C", (), {"max_sequence_length": 40})()
    captions = ["ohwx, a red circle", "a blue square on a white background"]
    mine = family.encode_text(comps, captions, "cpu")["prompt_embeds"]
    theirs, _ = klein.encode_prompt(prompt=captions, max_sequence_length=40)
    assert family.text_encoder_out_layers == (9, 18, 27) and mine.shape == (2, 40, 48)
    torch.testing.assert_close(mine, theirs)
    text = klein.tokenizer.apply_chat_template([{"role": "user", "content": captions[0]}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # other layers give other embeddings: the default is what decides
    other, _ = klein.encode_prompt(prompt=captions, max_sequence_length=40, text_encoder_out_layers=(10, 19, 28))
    assert not torch.allclose(mine, other)


def test_dev_prompt_is_the_pipelines_with_its_system_message(dev):
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    family, comps = _family("flux2", dev)
    family.cfg = type("C", (), {"max_sequence_length": 96})()
    mine = family.encode_text(comps, ["ohwx, a red circle"], "cpu")["prompt_embeds"]
    theirs, _ = dev.encode_prompt(prompt=["ohwx, a red circle"], max_sequence_length=96)
    assert family.text_encoder_out_layers == (10, 20, 30) and mine.shape == (1, 96, 48)
    torch.testing.assert_close(mine, theirs)
    ids = dev.tokenizer.apply_chat_template(
        [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
          {"role": "user", "content": [{"type": "text", "text": "ohwx"}]}]], tokenize=True, return_dict=True)
    text = dev.tokenizer.decode(ids["input_ids"][0])
    assert text.startswith("<s>[SYSTEM_PROMPT]You are an AI") and text.endswith("[INST]ohwx[/INST]")


@pytest.mark.parametrize("config,family,variant", [(DEV, "flux2", "dev"), (KLEIN_9B, "flux2_klein", "klein-9b"),
                                                   (KLEIN_4B, "flux2_klein", "klein-4b")])
def test_variants_of_the_published_configs_and_files(config, family, variant):
    assert get_signature(family).variant(config)[0] == variant
    other = "flux2_klein" if family == "flux2" else "flux2"
    assert get_signature(other).variant(config)[2] is not None, "the other FLUX.2 family refuses it, naming this one"
    names = rules.flux2_bfl_keys(config)
    for prefix in ("", "model.diffusion_model."):
        keys = FileKeys(frozenset(prefix + k for k in names), {})
        assert get_signature(family).match_file(keys).variant == variant
        assert get_signature(other).match_file(keys) is None
        assert get_signature("flux1").match_file(keys) is None, "FLUX.1's rule must not claim FLUX.2 files"


def test_flux2_rules_do_not_claim_flux1_files(tmp_path):
    from lora_trainer.families.flux1.tiny import build
    from lora_trainer.families.flux1.convert import from_diffusers as flux1_from_diffusers

    t = build("dev").transformer
    keys = FileKeys(frozenset(flux1_from_diffusers(t.state_dict(), dict(t.config))), {})
    assert get_signature("flux1").match_file(keys).variant == "dev"
    assert get_signature("flux2").match_file(keys) is None and get_signature("flux2_klein").match_file(keys) is None


def test_distilled_klein_is_warned_with_its_base(tmp_path, klein):
    from lora_trainer.preflight.probe import probe_model

    rule = get_signature("flux2_klein").distilled
    facts = lambda name, index, cfg: DistillFacts(name, index, cfg, {})  # noqa: E731
    found = rule(facts("x", {"is_distilled": True}, KLEIN_9B))
    assert found.base == "black-forest-labs/FLUX.2-klein-base-9B" and "9B" in found.model
    assert rule(facts("x", {"is_distilled": False}, KLEIN_9B)) is None
    assert rule(facts("black-forest-labs/FLUX.2-klein-4B", {}, {})).base == "black-forest-labs/FLUX.2-klein-base-4B"
    assert rule(facts("black-forest-labs/FLUX.2-klein-base-4B", {}, {})) is None
    assert rule(facts("/models/flux-2-klein-9b.safetensors", {}, {})).base.endswith("base-9B")
    assert rule(facts("/models/my-klein9b-merge.safetensors", {}, {})) is None, "only BFL's release names"
    folder = tmp_path / "klein"
    klein.save_pretrained(folder)
    assert not [w for w in probe_model(str(folder)).warnings if w["code"] == "model_distilled"]
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    (warning,) = [w for w in probe_model(str(folder)).warnings if w["code"] == "model_distilled"]
    assert "FLUX.2-klein-base-4B" in warning["hint"]


def test_distilled_klein_samples_without_cfg(klein):
    family, _ = _family("flux2_klein", klein)
    family.cfg = type("C", (), {"validation_guidance_scale": None, "max_sequence_length": None})()
    assert family.sample_kwargs()["guidance_scale"] == 4.0
    family.is_distilled = True
    assert family.sample_kwargs()["guidance_scale"] == 1.0
    assert family._pipeline_extra_kwargs() == {"is_distilled": True}


def test_single_file_round_trip_through_diffusers_converter(klein):
    t = klein.transformer
    sd = {k: v.clone() for k, v in t.state_dict().items()}
    bfl = from_diffusers(sd, dict(t.config))
    assert set(bfl) == set(rules.flux2_bfl_keys(dict(t.config))), "BFL's names, as ComfyUI's FLUX.2 model has them"
    back = to_diffusers(dict(bfl), dict(t.config))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def _peft_states(transformer, targets, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            state[f"{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g)
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g)
    return {"transformer": state}


def test_tool_file_reads_back_through_diffusers_flux2_converter(klein):
    from diffusers import Flux2KleinPipeline

    t = klein.transformer
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "to_qkv_mlp_proj", "attn.to_out", "ff.linear_in", "ff_context.linear_out")
    states = _peft_states(t, targets)
    rank, alpha = 4, 8.0  # alpha != rank: a writer or loader that drops alpha is off by 2x
    sd = flux2_kohya_state_dict(states, dict(t.config), alpha=alpha, rank=rank, dtype=torch.float32)
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 3 * rank
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3 * rank
    assert rules.unloaded_keys(list(sd), "flux2", dict(t.config)) == []
    assert rules.missing_targets(list(sd), "flux2", dict(t.config)) == []
    loaded = Flux2KleinPipeline.lora_state_dict(dict(sd))
    want = {k[: -len(".lora_A.weight")]: (alpha / rank) * states["transformer"][k.replace("lora_A", "lora_B")] @ a
            for k, a in states["transformer"].items() if k.endswith("lora_A.weight")}
    got = {k[len("transformer."): -len(".lora_A.weight")]: loaded[k.replace("lora_A", "lora_B")] @ a
           for k, a in loaded.items() if k.endswith("lora_A.weight")}
    assert got.keys() == want.keys()
    for module, delta in want.items():
        torch.testing.assert_close(got[module], delta, rtol=1e-5, atol=1e-5, msg=module)


def test_init_lora_from_either_exported_file(tmp_path, tiny_models, dataset):
    """The kohya-named tool file (fused q/k/v, alpha folded) and the PEFT file both continue the LoRA exactly: the
    tool file is read back through diffusers' FLUX.2 converter (convert.tool_file_to_peft)."""
    from safetensors.torch import load_file

    from conftest import run_cli, write_config

    base = dict(dataset_path=str(dataset), base_model=str(tiny_models["flux2-klein-4b"]), trigger_words=["ohwx"],
                resolution=64, lora_rank=4, lora_alpha=8, max_sequence_length=32)
    src = run_cli("--config", str(write_config(tmp_path / "src.json", **base, output_path=str(tmp_path / "src"),
                                               max_train_steps=2, learning_rate=1e-2)))
    assert src.returncode == 0, src.stderr[-3000:]
    want = load_file(tmp_path / "src" / "lora.safetensors")
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        out = tmp_path / f"cont-{name}"
        res = run_cli("--config", str(write_config(
            tmp_path / f"{name}.json", **base, output_path=str(out), max_train_steps=1, learning_rate=1e-12,
            weight_decay=0.0, checkpointing_steps=None, init_lora=str(tmp_path / "src" / name))))
        assert res.returncode == 0, res.stderr[-3000:]
        got = load_file(out / "lora.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


# What FLUX.2 repos hold beside the pipeline: BFL's root single files, the processor's files in tokenizer/ (fetched:
# the tokenizer folder is taken whole), sharded text encoders (Mistral Small 3.1, Qwen3), pickles.
FLUX2_DECOYS = {
    "flux2-dev.safetensors": b"decoy root BFL transformer" * 64,
    "flux-2-klein-4b.safetensors": b"decoy root BFL transformer" * 64,
    "ae.safetensors": b"decoy root BFL autoencoder" * 64,
    "text_encoder/model.bf16-00001-of-00002.safetensors": b"decoy bf16 shard" * 64,
    "text_encoder/pytorch_model-00001-of-00002.bin": b"\x80\x04decoy pickle shard" * 64,
    "teaser.png": b"\x89PNGdecoy" * 64,
}


def test_hub_repo_downloads_the_pipeline_with_sharded_encoder_and_processor_files(tmp_path, tiny_models):
    import shutil

    from fake_hub import FakeHub
    from test_hub_download import download_in_child

    from lora_trainer.preflight.probe import probe_model

    model = tmp_path / "model"
    shutil.copytree(tiny_models["flux2-klein-4b"], model)
    from transformers import Qwen3ForCausalLM

    te = model / "text_encoder"  # sharded, as the real 8 B / 24 B encoders are
    encoder = Qwen3ForCausalLM.from_pretrained(te)
    shutil.rmtree(te)
    encoder.save_pretrained(te, max_shard_size="200KB")
    assert (te / "model.safetensors.index.json").is_file() and (te / "model-00002-of-00002.safetensors").is_file()
    for name, text in (("chat_template.jinja", "{{ messages }}"), ("processor_config.json", "{}"),
                       ("preprocessor_config.json", "{}")):
        (model / "tokenizer" / name).write_text(text)
    files = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()}
    hf_home, hub, repo = tmp_path / "hf_home", FakeHub(), "fake-org/tiny-flux2-klein"
    hub.add_repo(repo, model, FLUX2_DECOYS)
    proc = download_in_child(hub, hf_home, repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (snap,) = (hf_home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots").iterdir()
    # generation_config.json is for generate(): the encoder's hidden states never read it
    assert {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()} == \
        files - {"text_encoder/generation_config.json"}
    assert not hub.requested_files(repo) & set(FLUX2_DECOYS) and not hub.unexpected
    p = probe_model(str(snap))
    assert p.ok and (p.family, p.variant) == ("flux2_klein", "klein-4b"), p.problems
    comps = get_family("flux2_klein").load(snap, single_file=False, dtype=torch.float32)
    assert comps.text_encoders["text_encoder"].config.num_hidden_layers == 28


def test_dora_is_refused_before_training_where_the_tool_file_fuses_qkv(tmp_path, tiny_models, dataset):
    """FLUX.2's (and Ideogram 4's) tool file fuses q/k/v, which cannot carry DoRA's per-part magnitudes: use_dora is
    a config error in --validate-only (and so before a run trains), not an export failure after it."""
    from conftest import run_cli, write_config

    from lora_trainer.families import SPECS

    assert {n for n, s in SPECS.items() if not s.tool_file_dora} == {"flux2", "flux2_klein", "ideogram4"}
    for use_dora, errors in ((True, ["use_dora"]), (False, [])):
        cfg = write_config(tmp_path / f"c{use_dora}.json", dataset_path=str(dataset),
                           base_model=str(tiny_models["flux2-klein-4b"]), output_path=str(tmp_path / "out"),
                           trigger_words=["ohwx"], resolution=64, use_dora=use_dora)
        res = run_cli("--config", str(cfg), "--validate-only")
        assert [e["path"] for e in res.last("validation")["errors"]] == errors, res.stdout[-2000:]
        assert (res.returncode != 0) == use_dora
