"""Ideogram 4's quirks (families/ideogram4/): the model time 1 - sigma and the x0 - noise output against one step
of the pipeline's own sampler, the packed [pad | text | image] layout and the cached text rows against its
encode_prompt, the latent patchify order and BatchNorm normalisation against its decode, sampling from cached
features, the resolution-aware logit-normal sigmas, the single-file layout, and the ComfyUI file (fused qkv,
.alpha) through diffusers' own Ideogram 4 converter."""
from __future__ import annotations

import math

import pytest
import torch

from lora_trainer.families import get_family

CAPTIONS = ["a red circle", "ohwx, a blue square on a gradient background"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipe():
    from lora_trainer.families.ideogram4.tiny import build

    return build()


@pytest.fixture(scope="module")
def family_and_comps(pipe):
    from types import SimpleNamespace

    fam = get_family("ideogram4", SimpleNamespace(max_sequence_length=48, validation_guidance_scale=None,
                                                  validation_inference_steps=2))
    comps = fam._from_pipe(pipe)
    fam.variant = comps.variant
    return fam, comps


@pytest.fixture(scope="module")
def cond(family_and_comps):
    fam, comps = family_and_comps
    with torch.no_grad():
        return fam.encode_text(comps, CAPTIONS, CPU)


def _cached(fam, cond):
    """The batch the text cache serves: each row trimmed to its tokens (text_cache_row), right-padded again."""
    from lora_trainer.data.text_cache import TextCache

    cache = TextCache(host_budget_bytes=1 << 30)
    rows = [fam.text_cache_row({k: v[i] for k, v in cond.items()}) for i in range(len(CAPTIONS))]
    cache._decide(len(rows), 1)
    for c, row in zip(CAPTIONS, rows):
        cache._keys[c] = c
        cache._keep(c, row)
    return cache.batch(CAPTIONS), rows


def test_text_rows_are_the_pipelines_encode_prompt(pipe, family_and_comps, cond):
    """Each cached row holds exactly the real tokens of the pipeline's left-padded features; packed back, the
    layout (features, position ids, segments, indicator) is the pipeline's own at the same padding."""
    from lora_trainer.families.ideogram4.adapter import packed_inputs

    fam, _ = family_and_comps
    length = fam.max_sequence_length
    with torch.no_grad():
        embeds, pos, seg, ind = pipe.encode_prompt(CAPTIONS, grid_h=2, grid_w=3, max_sequence_length=length,
                                                   device=CPU)
    batch, rows = _cached(fam, cond)
    n = [int(r["text_length"]) for r in rows]
    assert n[0] < n[1] < length and [r["prompt_embeds"].shape[0] for r in rows] == n
    padded = torch.nn.functional.pad(batch["prompt_embeds"], (0, 0, 0, length - batch["prompt_embeds"].shape[1]))
    text, p2, s2, i2 = packed_inputs(padded, batch["text_length"], 2, 3)
    torch.testing.assert_close(text, embeds[:, :length])
    assert torch.equal(p2, pos) and torch.equal(s2, seg) and torch.equal(i2, ind)


def test_predict_matches_the_pipelines_euler_step(pipe, family_and_comps, cond):
    """One step of Ideogram4Pipeline's loop (model time 1 - t/1000, its -v into the scheduler) at guidance 1
    (conditional model only) equals x + (sigma_next - sigma) * predict(x, sigma); the raw sign or sigma fed as the
    model's time fail it."""
    fam, comps = family_and_comps
    batch, _ = _cached(fam, cond)
    one = {k: v[:1, : int(batch["text_length"][0])] if k == "prompt_embeds" else v[:1] for k, v in batch.items()}
    latents = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    tokens = latents.flatten(2).transpose(1, 2)
    seen = {}

    def grab(p, i, t, kw):
        if i == 0:
            seen["after"] = kw["latents"].clone()
            seen["sigmas"] = p.scheduler.sigmas[:2].clone()
        return kw

    pipe(prompt=CAPTIONS[0], num_inference_steps=3, height=64, width=64, guidance_scale=1.0, guidance_schedule=None,
         max_sequence_length=fam.max_sequence_length, latents=tokens.clone(), output_type="latent",
         callback_on_step_end=grab)
    s0, s1 = seen["sigmas"]
    assert 0 < s1 < s0 <= 1
    after = seen["after"].transpose(1, 2).reshape(latents.shape)
    with torch.no_grad():
        v = fam.predict(comps.denoisers, latents, s0.reshape(1), one, None)
        wrong_t = fam.predict(comps.denoisers, latents, (1 - s0).reshape(1), one, None)
    torch.testing.assert_close(latents + (s1 - s0) * v, after, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(latents + (s1 - s0) * -v, after, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(latents + (s1 - s0) * wrong_t, after, rtol=1e-3, atol=1e-4)


def test_padding_to_the_batch_does_not_change_a_prediction(family_and_comps, cond):
    """A caption packed beside a longer one (more left padding) gets the prediction it gets alone."""
    fam, comps = family_and_comps
    batch, _ = _cached(fam, cond)
    x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.7, 0.3])
    n0 = int(batch["text_length"][0])
    with torch.no_grad():
        both = fam.predict(comps.denoisers, x, t, batch, None)
        alone = fam.predict(comps.denoisers, x[:1], t[:1], {"prompt_embeds": batch["prompt_embeds"][:1, :n0],
                                                             "text_length": batch["text_length"][:1]}, None)
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-6)


def test_latents_normalised_and_patchified_as_the_pipeline_decodes(pipe, family_and_comps):
    """encode_latents -> the pipeline's own denormalise + unpatchify (its decode, tokens row-major) -> the VAE's
    posterior mode; FLUX.2's channel-major patchify (the other order) fails it."""
    from lora_trainer.families._flux2.adapter import patchify as flux2_patchify
    from lora_trainer.families._flux2.adapter import bn_stats

    fam, comps = family_and_comps
    assert comps.vae.bn.running_mean.abs().max() > 0  # non-trivial statistics (trap 12)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = comps.vae.encode(pixels).latent_dist.mode()
        latents = fam.encode_latents(comps.vae, pixels)
    b, c, h, w = latents.shape
    assert (c, h, w) == (32, 4, 4) and fam.latent_layout(dict(comps.vae.config)) == (32, 16)
    tokens = latents.flatten(2).transpose(1, 2)  # what the pipeline's loop holds
    mean = comps.vae.bn.running_mean.view(1, 1, -1)
    std = torch.sqrt(comps.vae.bn.running_var + comps.vae.config.batch_norm_eps).view(1, 1, -1)
    y = (tokens * std + mean).view(b, h, w, 2, 2, c // 4).permute(0, 5, 1, 3, 2, 4).reshape(b, c // 4, 2 * h, 2 * w)
    torch.testing.assert_close(y, z, rtol=1e-5, atol=1e-5)
    m, s = bn_stats(comps.vae)
    other = ((flux2_patchify(z) - m) / s).flatten(2).transpose(1, 2)
    assert not torch.allclose(other, tokens, atol=1e-3)


def test_samples_from_cached_features_equal_samples_from_the_prompt(pipe, family_and_comps, cond):
    """The sampling pipeline fed cached features (text encoder gone) makes the pipeline's image for the prompt."""
    fam, comps = family_and_comps
    batch, _ = _cached(fam, cond)
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="np", **fam.sample_kwargs())
    assert kwargs["guidance_schedule"] is None and kwargs["guidance_scale"] == 7.0  # 2 steps: a constant
    from types import SimpleNamespace

    default = get_family("ideogram4", SimpleNamespace(max_sequence_length=None, validation_guidance_scale=None,
                                                      validation_inference_steps=None))
    assert default.sample_steps() == 48 and default.sample_kwargs() == {
        "guidance_scale": None, "guidance_schedule": [7.0] * 45 + [3.0] * 3, "max_sequence_length": 2048}
    want = pipe(prompt=CAPTIONS[1], generator=torch.Generator().manual_seed(0), **kwargs).images
    no_text = type(comps)(**{**comps.__dict__, "text_encoders": {}})
    sampler = fam.pipeline(no_text)
    assert sampler.text_encoder is None and sampler.unconditional_transformer is pipe.unconditional_transformer
    one = {"prompt_embeds": batch["prompt_embeds"][1:], "text_length": batch["text_length"][1:]}
    got = sampler(**fam.prompt_kwargs(one, None), generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want), rtol=1e-4, atol=1e-4)


def test_training_sigmas_are_the_resolution_aware_logit_normal():
    """Defaults: logit-normal std 1.5 with mean 0.5 ln(H W / 512^2), as the pipeline's schedule and diffusers'
    script (1024 px: 4096 tokens of 16 px, mean ln 2); flow_* keys still override."""
    from lora_trainer.families.spec import flow_options
    from lora_trainer.families import SPECS
    from lora_trainer.objectives.flow import FlowMatchingObjective, FlowSettings

    opts = flow_options(None, SPECS["ideogram4"], None)
    assert (opts["sigma_sampling"], opts["shift"], opts["logit_std"], opts["logit_mean"]) == \
        ("logit_normal", "area", 1.5, 0.0)
    obj = FlowMatchingObjective(FlowSettings(**opts), patch_size=1)
    sig = obj.sample_sigmas(200_000, 4096, CPU, torch.Generator().manual_seed(0)).double()
    logit = torch.log(sig / (1 - sig))
    assert abs(logit.mean().item() - math.log(2.0)) < 0.02 and abs(logit.std().item() - 1.5) < 0.02
    at512 = obj.sample_sigmas(200_000, 1024, CPU, torch.Generator().manual_seed(0)).double()
    assert abs(torch.log(at512 / (1 - at512)).mean().item()) < 0.02


def test_single_file_layout_round_trips(pipe, tmp_path):
    from safetensors.torch import save_file

    from lora_trainer.families.ideogram4.convert import from_diffusers, to_diffusers
    from lora_trainer.preflight.probe import probe_model

    sd = pipe.transformer.state_dict()
    cfg = dict(pipe.transformer.config)
    native = from_diffusers(sd, cfg)
    assert "layers.0.attention.qkv.weight" in native and "layers.0.attention.o.weight" in native
    assert not any(".to_q." in k or "to_out" in k for k in native)
    back = to_diffusers(dict(native), cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in native.items()}, tmp_path / "i4.safetensors")
    probe = probe_model(str(tmp_path / "i4.safetensors"))
    assert probe.family == "ideogram4", probe.family_evidence


def test_comfy_file_through_diffusers_converter(pipe):
    """diffusion_model. + native names, q/k/v fused (rank 3r, block-diagonal up, alpha x 3) -> diffusers' own
    Ideogram 4 converter: every trained delta exactly; init_lora's reader gets back each part's rank-r factors."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ideogram4_lora_to_diffusers

    from lora_trainer.families.ideogram4.convert import tool_file_to_peft
    from lora_trainer.families.ideogram4.export import comfy_state_dict

    rank, alpha = 4, 8.0
    g = torch.Generator().manual_seed(0)
    names = ["layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v",
             "layers.0.attention.to_out.0", "layers.1.feed_forward.w2", "layers.1.adaln_modulation"]
    mods = dict(pipe.transformer.named_modules())
    state = {}
    for n in names:
        state[f"{n}.lora_A.weight"] = torch.randn(rank, mods[n].in_features, generator=g)
        state[f"{n}.lora_B.weight"] = torch.randn(mods[n].out_features, rank, generator=g)
    sd = comfy_state_dict({"transformer": state}, pipe.transformer.config, alpha=alpha, rank=rank,
                          dtype=torch.float32)
    assert sd["diffusion_model.layers.0.attention.qkv.lora_A.weight"].shape[0] == 3 * rank
    assert sd["diffusion_model.layers.0.attention.qkv.alpha"].item() == 3 * alpha
    assert {k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_A.weight")} == {
        "diffusion_model.layers.0.attention.qkv", "diffusion_model.layers.0.attention.o",
        "diffusion_model.layers.1.feed_forward.w2", "diffusion_model.layers.1.adaln_modulation"}
    out = _convert_non_diffusers_ideogram4_lora_to_diffusers(dict(sd))
    assert set(out) == {f"transformer.{n}.{p}" for n in names for p in ("lora_A.weight", "lora_B.weight")}
    for n in names:
        want = (alpha / rank) * state[f"{n}.lora_B.weight"] @ state[f"{n}.lora_A.weight"]
        got = out[f"transformer.{n}.lora_B.weight"] @ out[f"transformer.{n}.lora_A.weight"]
        torch.testing.assert_close(got, want)
    peft = tool_file_to_peft(dict(sd))
    assert all(peft[f"transformer.{n}.lora_A.weight"].shape[0] == rank for n in names)
    for n in names:
        got = peft[f"transformer.{n}.lora_B.weight"] @ peft[f"transformer.{n}.lora_A.weight"]
        torch.testing.assert_close(got, (alpha / rank) * state[f"{n}.lora_B.weight"] @ state[f"{n}.lora_A.weight"])


def test_init_lora_from_either_exported_file(tmp_path):
    """Both exported files (PEFT, and the ComfyUI file read back through diffusers' converter: fused qkv split,
    alpha into the weights) continue the LoRA with the trained deltas (init_from_file.apply_init_lora)."""
    from safetensors.torch import save_file

    from lora_trainer.adapters.init_from_file import apply_init_lora
    from lora_trainer.adapters.lora import add_lora, plain_lora_state
    from lora_trainer.families import SPECS
    from lora_trainer.families.ideogram4.export import comfy_state_dict
    from lora_trainer.families.ideogram4.tiny import transformer
    from lora_trainer.outputs.export import adapter_metadata, peft_state_dict

    rank, alpha = 4, 8.0
    targets = SPECS["ideogram4"].presets["all_linear"]

    def adapted(seed):
        torch.manual_seed(seed)
        model = transformer()
        add_lora(model, rank=rank, alpha=alpha, dropout=0.0, targets=targets, use_dora=False, path="transformer")
        return model

    src = adapted(0)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
    state = plain_lora_state(src)
    save_file(peft_state_dict({"transformer": state}), tmp_path / "peft.safetensors",
              metadata=adapter_metadata({"transformer": state}, alpha=alpha, rank=rank))
    save_file(comfy_state_dict({"transformer": state}, src.config, alpha=alpha, rank=rank, dtype=torch.float32),
              tmp_path / "lora.safetensors")
    want = {k[: -len(".lora_A.weight")]: state[k.replace("lora_A", "lora_B")] @ a
            for k, a in state.items() if k.endswith("lora_A.weight")}
    for name in ("peft.safetensors", "lora.safetensors"):
        dst = adapted(1)
        info = apply_init_lora(tmp_path / name, "ideogram4", {"transformer": dst}, rank=rank, alpha=alpha,
                               use_dora=False, unet_config=None)
        assert info["not_in_file"] == [], (name, info["not_in_file"][:3])
        got = plain_lora_state(dst)
        for module, delta in want.items():
            d = got[f"{module}.lora_B.weight"] @ got[f"{module}.lora_A.weight"]
            torch.testing.assert_close(d, delta, rtol=1e-5, atol=1e-5, msg=f"{name} {module}")


def test_single_file_loads_with_the_rest_from_the_config_source(tmp_path, tiny_models):
    """A transformer single file in the original layout (under model.diffusion_model.) loads exactly; the
    unconditional transformer (sampling only), VAE and Qwen3-VL come from the config source folder, whose download
    patterns fetch the unconditional transformer's weights too."""
    from lora_trainer.runtime.single_file import config_source_patterns, load_components_single_file
    from lora_trainer.testing.single_file import write_tiny_single_file

    model = tiny_models["ideogram4"]
    single = write_tiny_single_file(model, tmp_path / "ideogram4.safetensors")
    fam = get_family("ideogram4")
    comps = load_components_single_file(fam, single, config_source=model, dtype=torch.float32)
    ref = fam.load(model, single_file=False, dtype=torch.float32)
    for name in ("transformer",):
        a, b = comps.denoisers[name].state_dict(), ref.denoisers[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(comps.sampling_only) == {"unconditional_transformer"}
    pats = config_source_patterns("ideogram4")
    assert "unconditional_transformer/diffusion_pytorch_model.safetensors" in pats
    assert "transformer/diffusion_pytorch_model.safetensors" not in pats


def test_hub_patterns_fetch_the_pipeline_and_nothing_else():
    """A hub repo's files as Ideogram 4 ships them: both transformers' shards + index, the sharded text encoder,
    the tokenizer folder (chat_template.jinja); not the fp8 root file, pickles or other variants."""
    from fnmatch import fnmatch

    from lora_trainer.runtime.loading import HUB_IGNORE_PATTERNS, HUB_PATTERNS

    want = ["model_index.json", "scheduler/scheduler_config.json", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors", "tokenizer/chat_template.jinja", "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json", "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
            "text_encoder/model-00001-of-00004.safetensors",
            *(f"{t}/{f}" for t in ("transformer", "unconditional_transformer")
              for f in ("config.json", "diffusion_pytorch_model.safetensors.index.json",
                        "diffusion_pytorch_model-00001-of-00004.safetensors"))]
    not_wanted = ["ideogram-4-fp8.safetensors", "transformer/diffusion_pytorch_model.fp8-00001-of-00002.safetensors",
                  "text_encoder/pytorch_model-00001-of-00004.bin", "README.md", "LICENSE.md"]

    def fetched(f):
        return any(fnmatch(f, p) for p in HUB_PATTERNS) and not any(fnmatch(f, p) for p in HUB_IGNORE_PATTERNS)

    assert [f for f in want if not fetched(f)] == []
    assert [f for f in not_wanted if fetched(f)] == []
