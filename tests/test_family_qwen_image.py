"""Qwen-Image's quirks, each checked against diffusers' own QwenImagePipeline code on the tiny random pipeline:
latents (frame axis, per-channel mean / std), the denoiser call (packing, sigma as the timestep, the velocity's
sign) against the pipeline's own sampler step, prompts through the pipeline's encode_prompt (template, the 34
dropped tokens, masked padding), the resolution shift with the scheduler's own constants, recognition of its
files, and the ComfyUI file through diffusers' converter (init_lora from it: tests/test_init_lora.py)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, write_config
from lora_trainer.families import get_family, get_signature
from lora_trainer.families.qwen_image.adapter import pack, unpack
from lora_trainer.families.qwen_image.tiny import build

CAPTIONS = ["ohwx, a red circle", "ohwx, a small blue square on a green background, photo"]


@pytest.fixture(scope="module")
def pipe():
    p = build(None, seed=0)
    # Distinct values in every transformer and VAE weight: at init the modulation outputs are zero-ish and a
    # wrong timestep could go unseen.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (p.transformer,):
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return p


@pytest.fixture(scope="module")
def family(pipe):
    fam = get_family("qwen_image")
    fam.variant = None
    return fam


def _comps(family, pipe):
    return family.components({"transformer": pipe.transformer}, pipe.vae, {"text_encoder": pipe.text_encoder},
                             {"text_encoder": pipe.tokenizer}, dict(pipe.scheduler.config))


def test_latents_are_the_pipelines_normalised_posterior_mean(pipe, family):
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = family.encode_latents(pipe.vae, pixels)
    assert latents.shape == (2, 16, 8, 6)
    assert family.latent_layout(dict(pipe.vae.config)) == (16, 8) == (latents.shape[1], 64 // latents.shape[2])
    # What the pipeline does before decoding (latents / (1 / std) + mean), on the frame axis it decodes with.
    cfg = pipe.vae.config
    std_inv = 1.0 / torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)
    raw = pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()
    torch.testing.assert_close(latents[:, :, None] / std_inv + mean, raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latents, ((raw - mean) * std_inv)[:, :, 0])  # diffusers' training script


def test_packing_is_the_pipelines_and_round_trips(pipe):
    x = torch.randn(2, 16, 8, 6)
    packed = pack(x)
    assert packed.shape == (2, 4 * 3, 64)
    torch.testing.assert_close(packed, pipe._pack_latents(x[:, None], 2, 16, 8, 6), rtol=0, atol=0)
    assert torch.equal(unpack(packed, 8, 6), x)


def test_prompts_are_the_pipelines_encode_prompt_padded_and_masked(pipe, family):
    comps = _comps(family, pipe)
    family.cfg = type("Cfg", (), {"max_sequence_length": 48, "validation_guidance_scale": None})()
    cond = family.encode_text(comps, CAPTIONS, torch.device("cpu"))
    assert cond["prompt_embeds"].shape == (2, 48, 32) and cond["prompt_embeds_mask"].shape == (2, 48)
    for i, caption in enumerate(CAPTIONS):
        want, mask = pipe.encode_prompt(caption, device="cpu", max_sequence_length=48)
        n = want.shape[1]
        # Template applied, its first prompt_template_encode_start_idx (34) tokens dropped, by the pipeline itself.
        assert pipe.prompt_template_encode_start_idx == 34
        torch.testing.assert_close(cond["prompt_embeds"][i, :n], want[0], rtol=1e-5, atol=1e-5)
        assert cond["prompt_embeds_mask"][i].tolist() == [1] * n + [0] * (48 - n)
        assert not cond["prompt_embeds"][i, n:].any()
    assert cond["prompt_embeds_mask"][0].sum() < cond["prompt_embeds_mask"][1].sum()
    # The 34 dropped tokens are the template's system turn and user opening, as with the real tokenizer (trap: a
    # tokenizer that splits them otherwise shifts the embeddings with no error): what is kept starts with the caption.
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == 34
    kept = pipe.tokenizer(pipe.prompt_template_encode.format(CAPTIONS[0])).input_ids[34:]
    assert kept[:len(pipe.tokenizer(CAPTIONS[0]).input_ids)] == pipe.tokenizer(CAPTIONS[0]).input_ids


def test_masked_padding_changes_no_prediction(pipe, family):
    comps = _comps(family, pipe)
    family.cfg = type("Cfg", (), {"max_sequence_length": 48, "validation_guidance_scale": None})()
    cond = family.encode_text(comps, CAPTIONS[:1], torch.device("cpu"))
    n = int(cond["prompt_embeds_mask"].sum())
    noisy, t = torch.randn(1, 16, 8, 8), torch.tensor([0.7])
    with torch.no_grad():
        padded = family.predict(comps.denoisers, noisy, t, cond, None)
        short = family.predict(comps.denoisers, noisy, t, {"prompt_embeds": cond["prompt_embeds"][:, :n],
                                                           "prompt_embeds_mask": cond["prompt_embeds_mask"][:, :n]},
                               None)
    torch.testing.assert_close(padded, short, rtol=1e-4, atol=1e-5)


def test_prediction_is_the_velocity_the_pipelines_sampler_steps_with(pipe, family):
    """One Euler step from sigma 1 to 0 with the pipeline (unshifted scheduler): its latents are x - v, where v is
    what predict returns at sigma 1 for the same latents and prompt. A timestep in [0, 1000] instead of sigma, a
    flipped sign or another packing would differ."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    comps = _comps(family, pipe)
    family.cfg = type("Cfg", (), {"max_sequence_length": 48, "validation_guidance_scale": None})()
    cond = family.encode_text(comps, CAPTIONS[:1], torch.device("cpu"))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    with torch.no_grad():
        v = family.predict(comps.denoisers, x, torch.tensor([1.0]), cond, None)
        out = pipe(prompt_embeds=cond["prompt_embeds"], prompt_embeds_mask=cond["prompt_embeds_mask"],
                   latents=pack(x), num_inference_steps=1, height=64, width=64, true_cfg_scale=1.0,
                   max_sequence_length=48, output_type="latent").images
    assert v.abs().mean() > 1e-3
    torch.testing.assert_close(unpack(out, 8, 8), x - v, rtol=1e-4, atol=1e-5)


def test_resolution_shift_uses_the_models_scheduler_constants(family):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from lora_trainer.objectives.flow import calculate_shift as ours

    from lora_trainer.families.adapter import Components
    from lora_trainer.families.qwen_image.tiny import QWEN_SCHEDULER

    comps = Components({}, None, {}, {}, dict(QWEN_SCHEDULER), "flow")
    family.cfg = None
    objective = family.objective(comps)
    s = objective.settings
    assert (s.sigma_sampling, s.shift) == ("sigmoid", "resolution")
    from lora_trainer.families.qwen_image.tiny import QWEN_SCHEDULER as cfg

    tokens = (1024 // 16) ** 2
    want = calculate_shift(tokens, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"],
                           cfg["max_shift"])
    assert (s.base_shift, s.max_shift, s.base_seq_len, s.max_seq_len) == (0.5, 0.9, 256, 8192)
    assert ours(tokens, s.base_seq_len, s.max_seq_len, s.base_shift, s.max_shift) == pytest.approx(want)
    assert objective.image_seq_len(torch.zeros(1, 16, 128, 128)) == tokens


def test_flux_keeps_its_shift_constants():
    from lora_trainer.families.adapter import resolution_shift_constants

    flux = dict(base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    assert resolution_shift_constants(flux) == {"base_shift": 0.5, "max_shift": 1.15, "base_seq_len": 256,
                                                "max_seq_len": 4096}
    assert resolution_shift_constants({"shift": 3.0}) == {}  # SD3's: FlowSettings' defaults stay


def test_variant_rule_and_single_file_match():
    from lora_trainer.families.signature import FileKeys

    sig = get_signature("qwen_image")
    assert sig.variant({"num_layers": 60, "guidance_embeds": False}) == (None, "", None)
    for switch in ("zero_cond_t", "use_layer3d_rope", "guidance_embeds"):
        assert sig.variant({switch: True})[2] is not None, switch
    qwen = ["img_in.weight", "txt_norm.weight", "txt_in.weight", "transformer_blocks.0.img_mod.1.weight"]
    for prefix in ("", "model.diffusion_model."):
        keys = frozenset(prefix + k for k in qwen)
        assert sig.match_file(FileKeys(keys, {k: {} for k in keys})) is not None
    flux = frozenset(["img_in.weight", "double_blocks.0.img_attn.qkv.weight", "txt_in.weight"])
    assert sig.match_file(FileKeys(flux, {k: {} for k in flux})) is None


def test_qwen_image_21_file_is_not_taken(tmp_path):
    """A Qwen-Image 2.1 file (txt_in.text_norm, the shared modulation) is its own family's, never Qwen-Image's."""
    from safetensors.torch import save_file

    from lora_trainer.preflight.probe import probe_model

    f = tmp_path / "qwen21.safetensors"
    save_file({"model.diffusion_model.txt_in.text_norm.weight": torch.zeros(2),
               "model.diffusion_model.img_in.weight": torch.zeros(2, 2),
               "model.diffusion_model.modulation.1.weight": torch.zeros(8, 2),
               "model.diffusion_model.transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, str(f))
    assert probe_model(str(f)).family == "qwen_image21"


def test_diffusers_reads_the_single_file_as_written(tiny_models, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    from lora_trainer.testing.single_file import write_single_file

    model = tiny_models["qwen-image"]
    f = write_single_file(model, tmp_path / "qwen_image_bf16.safetensors", prefix=False)
    loaded = QwenImageTransformer2DModel.from_single_file(str(f), config=str(model), subfolder="transformer",
                                                          local_files_only=True)
    ref = load_file(model / "transformer" / "diffusion_pytorch_model.safetensors")
    assert loaded.state_dict().keys() == ref.keys()
    assert all(torch.equal(loaded.state_dict()[k], ref[k]) for k in ref)


def test_comfy_file_through_diffusers_converter_gives_the_deltas():
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    from lora_trainer.outputs.lora_files import alpha_state_dict

    g = torch.Generator().manual_seed(0)
    paths = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2", "transformer_blocks.0.txt_mod.1"]
    state = {}
    for p in paths:
        state[f"{p}.lora_A.weight"] = torch.randn(4, 32, generator=g)
        state[f"{p}.lora_B.weight"] = torch.randn(24, 4, generator=g)
    sd = alpha_state_dict("Qwen-Image", {"transformer": state}, alpha=8.0, rank=4, dtype=torch.float32)
    assert {k.rsplit(".", 1)[-1] for k in sd} == {"weight", "alpha"} and all(k.startswith("diffusion_model.") for k in sd)
    converted = _convert_non_diffusers_qwen_lora_to_diffusers(dict(sd))
    assert set(converted) == {f"transformer.{k}" for k in state}
    for p in paths:
        got = converted[f"transformer.{p}.lora_B.weight"] @ converted[f"transformer.{p}.lora_A.weight"]
        want = 2.0 * state[f"{p}.lora_B.weight"] @ state[f"{p}.lora_A.weight"]
        torch.testing.assert_close(got, want)


# What Qwen/Qwen-Image holds beside the pipeline's files: pickles, other precisions and root single files must not
# come along (none of them is needed), while the sharded transformer and text encoder and every tokenizer file must.
QWEN_DECOYS = {
    "qwen_image_bf16.safetensors": b"decoy root single-file transformer" * 64,
    "transformer/diffusion_pytorch_model.bf16-00001-of-00002.safetensors": b"decoy bf16 shard" * 64,
    "text_encoder/pytorch_model-00001-of-00002.bin": b"\x80\x04decoy pickle shard" * 64,
    "text_encoder/pytorch_model.bin.index.json": b'{"weight_map": {}}',
    "tokenizer/pytorch_model.bin": b"\x80\x04decoy pickle in a tokenizer folder" * 8,
}


def _shard(folder: Path, stem: str) -> None:
    """The component's single weights file as save_pretrained shards a big one: two shards and an index."""
    import shutil

    single = folder / f"{stem}.safetensors"
    for i in (1, 2):
        shutil.copy(single, folder / f"{stem}-0000{i}-of-00002.safetensors")
    single.unlink()
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": f"{stem}-00001-of-00002.safetensors", "b": f"{stem}-00002-of-00002.safetensors"}}))


def test_hub_repo_downloads_the_sharded_pipeline_and_tokenizer_only(tmp_path, tiny_models):
    import shutil

    from fake_hub import FakeHub
    from test_hub_download import download_in_child

    from lora_trainer.preflight.probe import probe_model

    model = tmp_path / "model"
    shutil.copytree(tiny_models["qwen-image"], model)
    _shard(model / "transformer", "diffusion_pytorch_model")
    _shard(model / "text_encoder", "model")
    for name, text in (("vocab.json", "{}"), ("merges.txt", "#version: 0.2\n"), ("added_tokens.json", "{}"),
                       ("special_tokens_map.json", "{}")):  # what the real tokenizer folder holds beside these
        (model / "tokenizer" / name).write_text(text)
    files = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()}
    assert {"tokenizer/chat_template.jinja", "tokenizer/tokenizer_config.json",
            "text_encoder/model.safetensors.index.json"} <= files
    repo, hf_home, hub = "fake-org/tiny-qwen-image", tmp_path / "hf_home", FakeHub()
    hub.add_repo(repo, model, QWEN_DECOYS)
    proc = download_in_child(hub, hf_home, repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (snap,) = (hf_home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots").iterdir()
    # generation_config.json is for text generation, which the encoder never does
    assert {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()} == \
        files - {"text_encoder/generation_config.json"}
    assert not hub.requested_files(repo) & set(QWEN_DECOYS) and not hub.unexpected
    probe = probe_model(str(snap))
    assert probe.ok and probe.family == "qwen_image", probe.problems


def test_train_text_encoder_is_a_config_error_naming_the_key(tmp_path, tiny_models, dataset):
    cfg = write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models["qwen-image"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64,
                       train_text_encoder=True)
    res = run_cli("--config", str(cfg), "--validate-only")
    errors = res.last("validation")["errors"]
    assert res.returncode != 0 and [e["path"] for e in errors] == ["train_text_encoder"], errors


@pytest.mark.parametrize("name,want", [
    ("Qwen/Qwen-Image-2512", "2512"), ("/models/qwen_image_2512_fp8_e4m3fn.safetensors", "2512"),
    ("/data/Qwen-Image-2512/", "2512"), ("Qwen/Qwen-Image", None), ("/models/qwen_image_bf16.safetensors", None),
    ("/runs/2512/Qwen-Image", None)])
def test_2512_is_told_by_its_name(name, want):
    """Qwen-Image-2512's files are Qwen-Image's: the variant comes from the name it is given by."""
    from lora_trainer.families import get_signature

    assert get_signature("qwen_image").named_variant(name, None) == want


def test_the_probe_names_2512_by_its_folder(tmp_path, tiny_models):
    from lora_trainer.preflight.probe import probe_model

    folder = tmp_path / "Qwen-Image-2512"
    shutil.copytree(tiny_models["qwen-image"], folder)
    probe = probe_model(str(folder))
    assert probe.ok and (probe.family, probe.variant) == ("qwen_image", "2512") and "by its name" in probe.family_evidence
    assert probe_model(str(tiny_models["qwen-image"])).variant is None
