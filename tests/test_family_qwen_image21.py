"""Qwen-Image 2.1's quirks, each checked against diffusers' own QwenImage21Pipeline code on the tiny random
pipeline: RGBA latents (per-channel mean / std) through the VAE, the denoiser call (flattened latents, the image
slots of img_mask, sigma as the timestep, the last N output rows, the velocity's sign) against the pipeline's own
sampler step, prompts through its encode_prompt (system turn dropped, pre-norm last layer), why cached padding is
trimmed (RoPE counts it), the resolution shift, recognition of folders / files / Turbo, the single file through
diffusers' converter and the ComfyUI file through diffusers' Qwen LoRA converter (init_lora from either export:
tests/test_init_lora.py)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.families import SPECS, get_family, get_signature
from lora_trainer.families.qwen_image21.adapter import target_slots
from lora_trainer.families.qwen_image21.tiny import LATENTS_MEAN, SCHEDULER, Z_DIM, build

CAPTIONS = ["ohwx, a red circle", "ohwx, a small blue square on a green background, photo"]


@pytest.fixture(scope="module")
def pipe():
    p = build(None, seed=0)
    # Distinct values in every transformer weight: at init the modulation is zero-ish and a wrong timestep could
    # go unseen.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in p.transformer.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return p


@pytest.fixture()
def family():
    fam = get_family("qwen_image21")
    fam.variant = None
    fam.cfg = SimpleNamespace(max_sequence_length=48, validation_guidance_scale=None, validation_inference_steps=None)
    return fam


def _comps(family, pipe):
    return family.components({"transformer": pipe.transformer}, pipe.vae, {"text_encoder": pipe.text_encoder},
                             {"text_encoder": pipe.processor}, dict(pipe.scheduler.config))


def test_latents_are_the_pipelines_rgba_encoding_and_decode_back(pipe, family):
    from PIL import Image

    rgb = (torch.rand(2, 64, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    pixels = torch.stack([torch.from_numpy(pipe.image_processor.preprocess(Image.fromarray(x.numpy()).convert("RGB"))
                                           .numpy()[0]) for x in rgb])
    latents = family.encode_latents(pipe.vae, pixels)
    assert latents.shape == (2, Z_DIM, 4, 2)
    assert family.latent_layout(dict(pipe.vae.config)) == (Z_DIM, 16) == (latents.shape[1], 64 // latents.shape[2])
    # The pipeline's path for an RGB condition image: convert("RGBA") (alpha 255), preprocess, _encode_vae_image.
    for i in range(2):
        rgba = pipe.image_processor.preprocess(Image.fromarray(rgb[i].numpy()).convert("RGBA"))
        assert rgba.shape[1] == 4 and bool((rgba[:, 3] == 1).all())
        want = pipe._encode_vae_image(rgba[:, :, None], None)[:, :, 0]
        torch.testing.assert_close(latents[i:i + 1], want, rtol=1e-5, atol=1e-5)
    # Un-normalised as the pipeline does before decoding, the latents are the VAE's own posterior mode again, and
    # decode to RGBA.
    cfg = pipe.vae.config
    std, mean = (torch.tensor(v).view(1, Z_DIM, 1, 1, 1) for v in (cfg.latents_std, cfg.latents_mean))
    raw = pipe.vae.encode(torch.cat([pixels, torch.ones_like(pixels[:, :1])], 1)[:, :, None]).latent_dist.mode()
    torch.testing.assert_close(latents[:, :, None] * std + mean, raw, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latents[:, :, None], raw)  # the tiny statistics are not 0 / 1
    assert pipe.vae.decode(latents[:, :, None] * std + mean).sample.shape == (2, 4, 1, 64, 32)
    assert LATENTS_MEAN[0] != 0


def test_prompts_are_the_pipelines_encode_prompt_padded_and_masked(pipe, family):
    comps = _comps(family, pipe)
    cond = family.encode_text(comps, CAPTIONS + [""], torch.device("cpu"))
    assert cond["prompt_embeds"].shape == (3, 48, 32) and cond["prompt_embeds_mask"].shape == (3, 48)
    for i, caption in enumerate(CAPTIONS + [""]):
        want, mask, pad_mask = pipe.encode_prompt(caption, device="cpu")
        n = want.shape[1]
        assert mask is None and not pad_mask.any()
        torch.testing.assert_close(cond["prompt_embeds"][i, :n], want[0], rtol=1e-5, atol=1e-5)
        assert cond["prompt_embeds_mask"][i].tolist() == [1] * n + [0] * (48 - n)
        assert not cond["prompt_embeds"][i, n:].any()
    # The system turn is dropped (its token count from the processor's chat template): what is kept is the user
    # turn, the caption's tokens after "<|im_start|>user\n".
    tok = pipe.processor.tokenizer
    kept = tok(pipe.prompt_template_t2i.format(CAPTIONS[0])).input_ids[pipe._drop_idx:]
    assert kept[:3] == tok("<|im_start|>user\n").input_ids and pipe._drop_idx == len(
        tok(f"<|im_start|>system\n{pipe.sys_prompt}<|im_end|>\n").input_ids)
    assert int(cond["prompt_embeds_mask"][0].sum()) == len(kept)
    # An empty prompt is encoded as " " (the pipeline's rule), not as nothing.
    blank = len(tok(pipe.prompt_template_t2i.format(" ")).input_ids) - pipe._drop_idx
    assert int(cond["prompt_embeds_mask"][2].sum()) == blank


def test_the_text_is_the_last_layer_before_the_final_norm(pipe, family):
    """transformers 5 returns the normed state as hidden_states[-1]; the pipeline hooks the norm away, and so do we
    (through its encode_prompt): the cached rows are the un-normed last layer."""
    comps = _comps(family, pipe)
    cond = family.encode_text(comps, CAPTIONS[:1], torch.device("cpu"))
    ids = pipe.processor(text=[pipe.prompt_template_t2i.format(CAPTIONS[0])], return_tensors="pt")
    with torch.no_grad():
        normed = pipe.text_encoder(**ids, output_hidden_states=True).hidden_states[-1][0, pipe._drop_idx:]
    n = int(cond["prompt_embeds_mask"].sum())
    assert not torch.allclose(cond["prompt_embeds"][0, :n], normed, atol=1e-3)
    norm = pipe.text_encoder.model.language_model.norm
    torch.testing.assert_close(norm(cond["prompt_embeds"][0, :n]), normed, rtol=1e-4, atol=1e-5)


def test_img_mask_is_the_pipelines_text_then_target_slots():
    mask = target_slots(torch.zeros(2, 5, dtype=torch.bool), 16)
    assert mask.shape == (2, 9) and mask[:, :5].sum() == 0 and bool(mask[:, 5:].all())


def test_prediction_is_the_velocity_the_pipelines_sampler_steps_with(pipe, family):
    """One Euler step from sigma 1 to 0 with the pipeline's own loop (sigma 1 stays 1 under its shift): its latents
    are x - v, v being what predict returns at sigma 1. A timestep in [0, 1000], a flipped sign, the output's first
    rows instead of its last, or another mask would differ."""
    comps = _comps(family, pipe)
    cond = family.encode_text(comps, CAPTIONS[:1], torch.device("cpu"))
    x = torch.randn(1, Z_DIM, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v = family.predict(comps.denoisers, x, torch.tensor([1.0]), cond, None)
        kwargs = family.prompt_kwargs(cond, None)
        out = pipe(latents=pipe._pack_latents(x, 1, Z_DIM, 4, 4), sigmas=[1.0], height=64, width=64,
                   output_type="latent", **kwargs).images
    assert v.shape == x.shape and v.abs().mean() > 1e-3
    torch.testing.assert_close(pipe._unpack_latents(out, 64, 64, 16)[:, :, 0], x - v, rtol=1e-4, atol=1e-5)
    # And at another sigma, predict is the transformer's last h*w rows with timestep = sigma (the pipeline's t/1000).
    t = torch.tensor([0.37])
    with torch.no_grad():
        embeds = kwargs["prompt_embeds"]
        full = pipe.transformer(hidden_states=pipe._pack_latents(x, 1, Z_DIM, 4, 4), timestep=t,
                                encoder_hidden_states=embeds, img_shapes=[[(1, 4, 4)]],
                                img_mask=target_slots(torch.zeros(1, embeds.shape[1], dtype=torch.bool), 16),
                                return_dict=False)[0]
        got = family.predict(comps.denoisers, x, t, cond, None)
    assert full.shape[1] == embeds.shape[1] + 16
    torch.testing.assert_close(pipe._pack_latents(got, 1, Z_DIM, 4, 4), full[:, -16:], rtol=1e-5, atol=1e-6)


def test_cached_padding_is_trimmed_because_rope_counts_it(pipe, family):
    """The cache pads each caption to max_sequence_length; the image's RoPE frame position follows every text slot,
    padding included, so predict trims a batch to its longest caption (what encode_prompt does). A batch of two
    captions predicts each as the pipeline's batch does; the untrimmed padding would not."""
    comps = _comps(family, pipe)
    cond = family.encode_text(comps, CAPTIONS, torch.device("cpu"))
    x, t = torch.randn(2, Z_DIM, 4, 4, generator=torch.Generator().manual_seed(4)), torch.tensor([0.6, 0.6])
    embeds, mask, _ = pipe.encode_prompt(CAPTIONS, device="cpu")
    assert mask is not None and embeds.shape[1] < 48
    with torch.no_grad():
        got = family.predict(comps.denoisers, x, t, cond, None)
        want = pipe.transformer(hidden_states=pipe._pack_latents(x, 2, Z_DIM, 4, 4), timestep=t,
                                encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                                img_shapes=[[(1, 4, 4)]] * 2,
                                img_mask=target_slots(torch.zeros(2, embeds.shape[1], dtype=torch.bool), 16),
                                return_dict=False)[0][:, -16:]
        padded = pipe.transformer(hidden_states=pipe._pack_latents(x, 2, Z_DIM, 4, 4), timestep=t,
                                  encoder_hidden_states=cond["prompt_embeds"],
                                  encoder_hidden_states_mask=cond["prompt_embeds_mask"].bool(),
                                  img_shapes=[[(1, 4, 4)]] * 2,
                                  img_mask=target_slots(torch.zeros(2, 48, dtype=torch.bool), 16),
                                  return_dict=False)[0][:, -16:]
    torch.testing.assert_close(pipe._pack_latents(got, 2, Z_DIM, 4, 4), want, rtol=1e-5, atol=1e-6)
    assert (padded - want).abs().max() > 1e-4  # tiny RoPE: 4 frame-axis dims, so a small but real shift


def test_resolution_shift_uses_the_models_scheduler_constants(family):
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

    from lora_trainer.families.adapter import Components
    from lora_trainer.objectives.flow import calculate_shift as ours

    family.cfg = None
    objective = family.objective(Components({}, None, {}, {}, dict(SCHEDULER), "flow"))
    s = objective.settings
    assert (s.sigma_sampling, s.shift) == ("sigmoid", "resolution")
    assert (s.base_shift, s.max_shift, s.base_seq_len, s.max_seq_len) == (0.5, 0.9, 256, 8192)
    tokens = (1024 // 16) ** 2  # the pipeline's latents.shape[1] at 1024 px: one token per latent pixel
    assert objective.image_seq_len(torch.zeros(1, 64, 64, 64)) == tokens
    want = calculate_shift(tokens, 256, 8192, 0.5, 0.9)
    assert ours(tokens, s.base_seq_len, s.max_seq_len, s.base_shift, s.max_shift) == pytest.approx(want)


def test_sampling_takes_the_checkpoints_sample_sigmas_unless_steps_are_set(family):
    family.sample_sigmas = [1.0, 0.8, 0.5, 0.2]
    family.cfg = SimpleNamespace(validation_inference_steps=None, validation_guidance_scale=None)
    assert family.sample_steps() == 4 and family._pipeline_extra_kwargs() == {"sample_sigmas": [1.0, 0.8, 0.5, 0.2]}
    assert family.sample_kwargs() == {"true_cfg_scale": 1.0}  # the pipeline's default: no guidance
    family.cfg = SimpleNamespace(validation_inference_steps=2, validation_guidance_scale=None)
    assert family.sample_steps() == 2 and family._pipeline_extra_kwargs() == {"sample_sigmas": None}
    family.sample_sigmas = None
    family.cfg = None
    assert family.sample_steps() == 40


def test_presets_name_real_modules_and_never_the_shared_modulation(pipe):
    from lora_trainer.families.spec import expand_targets

    modules = {n: m.weight.dim() for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    spec = SPECS["qwen_image21"]
    for preset in ("attention", "attention_mlp", "all_linear"):
        hits = expand_targets(spec.targets(preset), modules)
        assert all(hits.values()), (preset, hits)
        names = {n for h in hits.values() for n in h}
        assert "modulation.1" not in names and all(n.startswith("transformer_blocks.") for n in names)
    assert len({n for h in expand_targets(spec.targets("all_linear"), modules).values() for n in h}) == 7 * 2


def test_comfy_file_through_diffusers_converter_gives_the_deltas():
    """Our ComfyUI file (diffusion_model. + diffusers names + .alpha) through the Qwen converter that
    QwenImage21Pipeline.load_lora_weights uses: every module's delta, the SwiGLU's too. (Its lora_unet_ table lacks
    2.1's modulation.1; our file never holds that module, and its keys are not lora_unet_ ones.)"""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    from lora_trainer.outputs.lora_files import alpha_state_dict

    g = torch.Generator().manual_seed(0)
    paths = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_out.0",
             "transformer_blocks.0.img_mlp.gate_layer", "transformer_blocks.1.img_mlp.proj",
             "transformer_blocks.1.img_mlp.out"]
    state = {}
    for p in paths:
        state[f"{p}.lora_A.weight"] = torch.randn(4, 32, generator=g)
        state[f"{p}.lora_B.weight"] = torch.randn(24, 4, generator=g)
    sd = alpha_state_dict("Qwen-Image 2.1", {"transformer": state}, alpha=8.0, rank=4, dtype=torch.float32)
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in sd)
    converted = _convert_non_diffusers_qwen_lora_to_diffusers(dict(sd))
    assert set(converted) == {f"transformer.{k}" for k in state}
    for p in paths:
        got = converted[f"transformer.{p}.lora_B.weight"] @ converted[f"transformer.{p}.lora_A.weight"]
        torch.testing.assert_close(got, 2.0 * state[f"{p}.lora_B.weight"] @ state[f"{p}.lora_A.weight"])


def test_single_file_round_trips_through_diffusers_converter(tiny_models, tmp_path):
    from diffusers import QwenImage21Transformer2DModel

    from lora_trainer.preflight.probe import probe_model
    from lora_trainer.testing.single_file import write_single_file

    model = tiny_models["qwen-image-2.1"]
    f = write_single_file(model, tmp_path / "qwen_image_2.1_bf16.safetensors")
    header = json.loads(f.read_bytes()[8:8 + int.from_bytes(f.read_bytes()[:8], "little")])
    assert "model.diffusion_model.transformer_blocks.0.img_mlp.gate_up.weight" in header  # ComfyUI's fusion
    loaded = QwenImage21Transformer2DModel.from_single_file(str(f), config=str(model), subfolder="transformer",
                                                            local_files_only=True)
    ref = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    assert loaded.state_dict().keys() == ref.keys() and all(torch.equal(loaded.state_dict()[k], ref[k]) for k in ref)
    probe = probe_model(str(f))
    assert probe.family == "qwen_image21" and "Qwen-Image 2.1 layout" in probe.family_evidence


def test_signature_variant_file_rules_and_qwen_image_apart():
    from lora_trainer.families.signature import FileKeys

    sig, qwen = get_signature("qwen_image21"), get_signature("qwen_image")
    assert sig.variant({"num_layers": 32, "causal_condition": True}) == (None, "", None)
    assert sig.variant({"causal_condition": False})[2] is not None
    mine = ["txt_in.text_norm.weight", "img_in.weight", "modulation.1.weight", "transformer_blocks.0.attn.to_q.weight"]
    theirs = ["img_in.weight", "txt_norm.weight", "txt_in.weight", "transformer_blocks.0.img_mod.1.weight"]
    for prefix in ("", "model.diffusion_model."):
        for keys, yes, no in ((mine, sig, qwen), (theirs, qwen, sig)):
            k = frozenset(prefix + x for x in keys)
            fk = FileKeys(k, {x: {} for x in k})
            assert yes.match_file(fk) is not None and no.match_file(fk) is None


@pytest.mark.parametrize("name,turbo", [("Qwen/Qwen-Image-2.1-Turbo", True),
                                        ("/models/qwen_image_2.1_turbo.safetensors", True),
                                        ("Qwen/Qwen-Image-2.1", False)])
def test_turbo_is_told_and_warned(name, turbo):
    from lora_trainer.families.signature import DistillFacts

    got = get_signature("qwen_image21").distilled(DistillFacts(name, {}, {}, {}))
    assert (got is not None) == turbo
    if turbo:
        assert got.base == "Qwen/Qwen-Image-2.1"


def test_the_probe_takes_the_folder_and_warns_on_a_turbo_one(tmp_path, tiny_models):
    from lora_trainer.preflight.probe import probe_model

    probe = probe_model(str(tiny_models["qwen-image-2.1"]))
    assert probe.ok and probe.family == "qwen_image21" and "processor" in probe.components_found
    assert not [w for w in probe.warnings if w["code"] == "model_distilled"]
    folder = tmp_path / "Qwen-Image-2.1-Turbo"
    shutil.copytree(tiny_models["qwen-image-2.1"], folder)
    probe = probe_model(str(folder))
    assert probe.family == "qwen_image21" and [w for w in probe.warnings if w["code"] == "model_distilled"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / "processor" / name).unlink()
    probe = probe_model(str(folder))
    assert "processor" in probe.components_missing and not probe.ok


# What a Qwen-Image 2.1 repo's processor/ holds beside the tokenizer (Qwen3VLProcessor's image / video configs,
# its chat template): all of it comes along; pickles and root single files do not.
DECOYS = {"qwen_image_2.1_bf16.safetensors": b"decoy root single-file transformer" * 64,
          "text_encoder/pytorch_model-00001-of-00002.bin": b"\x80\x04decoy pickle shard" * 64}


def test_hub_repo_downloads_the_processor_folder(tmp_path, tiny_models):
    from fake_hub import FakeHub
    from test_hub_download import download_in_child

    from lora_trainer.preflight.probe import probe_model

    model = tmp_path / "model"
    shutil.copytree(tiny_models["qwen-image-2.1"], model)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json", "vocab.json",
                 "merges.txt"):
        (model / "processor" / name).write_text("{}")
    files = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()}
    repo, hf_home, hub = "fake-org/tiny-qwen-image-2.1", tmp_path / "hf_home", FakeHub()
    hub.add_repo(repo, model, DECOYS)
    proc = download_in_child(hub, hf_home, repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (snap,) = (hf_home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots").iterdir()
    got = {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()}
    assert got == files - {"text_encoder/generation_config.json"}
    assert not hub.requested_files(repo) & set(DECOYS) and not hub.unexpected
    assert probe_model(str(snap)).family == "qwen_image21"


def test_the_trainer_loads_the_folder_with_its_processor(tiny_models, family):
    comps = family.load(tiny_models["qwen-image-2.1"], single_file=False, dtype=torch.float32)
    proc = comps.tokenizers["text_encoder"]
    assert type(proc).__name__ == "Qwen3VLTextProcessor" and proc.tokenizer.chat_template
    assert family.sample_sigmas is None and comps.scheduler_config["max_shift"] == 0.9


def test_a_real_processor_folder_loads_text_only(tmp_path, family):
    """Qwen/Qwen-Image-2.1's processor/ is a Qwen3VLProcessor's (image and video processor configs, the chat
    template in chat_template.json); without torchvision the trainer reads its tokenizer and template alone."""
    from lora_trainer.families.qwen_image21.tiny import make_processor

    folder = tmp_path / "processor"
    make_processor().save_pretrained(folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "Qwen3VLProcessor",
        "image_processor": {"image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 16, "merge_size": 2},
        "video_processor": {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16}}))
    for name, kind in (("preprocessor_config.json", "image"), ("video_preprocessor_config.json", "video")):
        (folder / name).write_text(json.dumps({"processor_class": "Qwen3VLProcessor",
                                               f"{kind}_processor_type": "Qwen3VL"}))
    proc = family.load_tokenizer(tmp_path, "text_encoder")
    system = [{"role": "system", "content": [{"type": "text", "text": "Comprehend and analyze the provided prompt."}]}]
    ids = proc.apply_chat_template(system, tokenize=True, return_dict=False)
    assert ids == [proc.tokenizer("<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n")
                   .input_ids]
    with pytest.raises(ValueError, match="text prompts only"):
        proc(text=["x"], images=[object()])
