"""Anima's quirks (families/anima/): a modular pipeline folder (modular_model_index.json) recognised and loaded; the
timestep (sigma) and output sign against the modular pipeline's own denoise loop; the cached conditioner output
against the pipeline's own text steps, one prompt at a time, with the true-length mask reproducing its token count;
the Qwen VAE normalisation against the pipeline's encoder; the Cosmos single-file converter round trip; the ComfyUI
file through diffusers' Anima LoRA converter and back for init_lora."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from lora_trainer.families import get_family

CAPTIONS = ["a red circle", "ohwx, a blue square on a wooden table under a lamp, soft light, a long caption"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(tiny_models):
    fam = get_family("anima")
    comps = fam.load(tiny_models["anima"], single_file=False, dtype=torch.float32)
    return fam, comps


@pytest.fixture(scope="module")
def reference(tiny_models):
    from lora_trainer.testing.tiny import load_pipeline

    return load_pipeline(tiny_models["anima"]).pipe  # AnimaModularPipeline, every component loaded


def test_modular_folder_is_probed_and_an_old_style_index_too(tmp_path, tiny_models):
    from lora_trainer.preflight.probe import probe_model

    model = tiny_models["anima"]
    assert not (model / "model_index.json").exists() and (model / "modular_model_index.json").is_file()
    probe = probe_model(str(model))
    assert probe.ok and probe.family == "anima" and "AnimaModularPipeline" in probe.family_evidence
    # A repo converted with a classic index ([library, class] entries) is read the same way.
    copy = shutil.copytree(model, tmp_path / "m")
    index = json.loads((copy / "modular_model_index.json").read_text())
    (copy / "modular_model_index.json").unlink()
    (copy / "model_index.json").write_text(json.dumps({k: v[:2] if isinstance(v, list) else v
                                                       for k, v in index.items()}))
    assert probe_model(str(copy)).family == "anima"
    shutil.rmtree(copy / "t5_tokenizer")
    (copy / "text_conditioner" / "diffusion_pytorch_model.safetensors").unlink()
    missing = probe_model(str(copy)).components_missing
    assert "t5_tokenizer" in missing and "text_conditioner" in missing


def test_cached_text_is_the_pipelines_conditioning_one_prompt_at_a_time(loaded, reference):
    """A batch of captions of different lengths: each cached row, cut to its mask, equals what the modular
    pipeline's own text steps give that prompt alone (Qwen3 -> T5 ids -> conditioner, padded to at least
    min_sequence_length): same values, same token count."""
    fam, comps = loaded
    fam.cfg = type("C", (), {"max_sequence_length": 32})()
    try:
        with torch.no_grad():
            cond = fam.encode_text(comps, CAPTIONS, CPU)
    finally:
        fam.cfg = None
    lengths = cond["prompt_mask"].sum(1).tolist()
    assert cond["prompt_embeds"].shape[1] == 32 and lengths[0] != lengths[1]
    for i, caption in enumerate(CAPTIONS):
        want = reference(prompt=caption, max_sequence_length=32, height=64, width=64, num_inference_steps=1,
                         output="prompt_embeds")
        assert want.shape[1] == lengths[i]
        torch.testing.assert_close(cond["prompt_embeds"][i, : lengths[i]], want[0], rtol=1e-4, atol=1e-5)
        assert not cond["prompt_embeds"][i, lengths[i]:].any()


def test_predict_matches_the_pipelines_denoise_loop(loaded, reference):
    """One step of the modular pipeline's loop (timestep t / num_train_timesteps, padding_mask, FlowMatch Euler)
    from given latents equals x + (0 - sigma) * predict(x, sigma); a negated output or t in [0, 1000] fails it. The
    padded, masked batch row predicts what the unpadded prompt does."""
    from lora_trainer.families.anima.adapter import _cut

    fam, comps = loaded
    with torch.no_grad():
        cond = fam.encode_text(comps, CAPTIONS, CPU)
    latents = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = fam.pipeline(comps)
    pipe.pipe.update_components(guider=type(pipe.pipe.guider)(guidance_scale=1.0))  # the conditional pass alone
    row = {k: v[:1] for k, v in cond.items()}  # the shorter caption: masked in the batch, cut for the pipeline
    assert cond["prompt_mask"][0].sum() < cond["prompt_mask"][1].sum()
    after = pipe.pipe(prompt_embeds=_cut(row), num_inference_steps=1, height=64, width=64,
                      latents=latents.clone(), output="latents")
    sigma = torch.ones(1)  # one step: sigmas [1.0], unchanged by the static shift
    x = latents[:, :, 0]
    with torch.no_grad():
        v = fam.predict(comps.denoisers, x.expand(2, -1, -1, -1), sigma.expand(2), cond, None)[:1]
        wrong_t = fam.predict(comps.denoisers, x, sigma * 1000, row, None)
    torch.testing.assert_close(x - v, after[:, :, 0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(x + v, after[:, :, 0], rtol=1e-3, atol=1e-4)
    assert not torch.allclose(x - wrong_t, after[:, :, 0], rtol=1e-3, atol=1e-4)


def test_latents_are_normalised_as_the_pipeline_encodes_them(loaded):
    from diffusers.modular_pipelines.anima.encoders import encode_vae_image

    fam, comps = loaded
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = fam.encode_latents(comps.vae, pixels)
    theirs = encode_vae_image(pixels, comps.vae, None, CPU, torch.float32, latent_channels=16, sample_mode="argmax")
    torch.testing.assert_close(ours, theirs[:, :, 0])
    assert fam.latent_layout(dict(comps.vae.config)) == (16, 8)


def test_single_file_round_trip_and_signature(loaded):
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    from lora_trainer.families.anima.convert import config_checks, from_diffusers
    from lora_trainer.families.anima.signature import match_file
    from lora_trainer.families.signature import FileKeys

    _, comps = loaded
    transformer = comps.denoisers["transformer"]
    sd, config = transformer.state_dict(), dict(transformer.config)
    native = from_diffusers(sd, config)
    assert "blocks.0.self_attn.q_proj.weight" in native and "x_embedder.proj.1.weight" in native
    back = convert_cosmos_transformer_checkpoint_to_diffusers({f"net.{k}": v for k, v in native.items()})
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    refusal, figures = config_checks({k: list(v.shape) for k, v in native.items()}, config, "config.json")
    assert refusal is None and figures and all(a == b for _, a, b in figures), figures
    keys = {f"model.diffusion_model.{k}": {} for k in native} | {"model.diffusion_model.llm_adapter.embed.weight": {}}
    found = match_file(FileKeys(frozenset(keys), keys))
    assert found is not None and "llm_adapter" in found.evidence
    assert match_file(FileKeys(frozenset(sd), {k: {} for k in sd})) is None  # diffusers names: not this layout


def test_tool_file_reads_back_through_diffusers_converter():
    """ai-toolkit's Cosmos names under diffusion_model., alpha / rank folded into lora_B (no .alpha: diffusers'
    Anima loader refuses it); diffusers' converter and our init_lora reader give back the PEFT modules."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_anima_lora_to_diffusers

    from lora_trainer.families.anima.convert import tool_file_to_peft
    from lora_trainer.families.anima.export import tool_state_dict

    g = torch.Generator().manual_seed(0)
    paths = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_out.0", "transformer_blocks.0.ff.net.2",
             "transformer_blocks.1.norm3.linear_1"]
    state = {f"{p}.lora_{x}.weight": torch.randn(4, 8, generator=g) if x == "A" else torch.randn(8, 4, generator=g)
             for p in paths for x in "AB"}
    out = tool_state_dict({"transformer": state}, alpha=8.0, rank=4, dtype=torch.float32)
    assert "diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight" in out
    assert "diffusion_model.blocks.1.adaln_modulation_mlp.1.lora_B.weight" in out
    assert all("lora" in k for k in out)
    for read in (_convert_non_diffusers_anima_lora_to_diffusers(dict(out)), tool_file_to_peft(dict(out))):
        assert set(read) == {f"transformer.{k}" for k in state}
        for k, v in state.items():
            torch.testing.assert_close(read[f"transformer.{k}"], v * (2.0 if ".lora_B." in k else 1.0))
