"""Wan 2.1 specifics against the tiny pipeline (families/wan/): latent normalisation on a frame axis, the pipeline's
own prompt embeddings, the timestep convention and output sign against the pipeline's sampler, the ComfyUI file
through diffusers' Wan converter, and the signature's variant / file rules. The family is not registered yet
(STATUS.md), so these tests build the adapter directly instead of going through the registry."""
from __future__ import annotations

import pytest
import torch

from lora_trainer.families.adapter import Components
from lora_trainer.families.wan import signature as sig
from lora_trainer.families.wan import tiny
from lora_trainer.families.wan.adapter import Wan, original_name
from lora_trainer.families.signature import FileKeys, Match, Refusal


@pytest.fixture(scope="module")
def pipe():
    return tiny.build()


@pytest.fixture(scope="module")
def comps(pipe):
    return Components(denoisers={"transformer": pipe.transformer}, vae=pipe.vae,
                      text_encoders={"text_encoder": pipe.text_encoder}, tokenizers={"text_encoder": pipe.tokenizer},
                      scheduler_config=dict(pipe.scheduler.config), prediction_type="flow")


def test_latents_per_channel_and_frames(pipe):
    fam = Wan()
    gen = torch.Generator().manual_seed(0)
    clip = torch.rand(1, 3, 5, 32, 48, generator=gen) * 2 - 1
    z = fam.encode_latents(pipe.vae, clip)
    assert z.shape == (1, 16, 2, 4, 6)  # 5 frames -> 2 latent frames, 8x spatially
    raw = pipe.vae.encode(clip).latent_dist.mode()
    # The pipeline's own un-normalisation before decoding (pipeline_wan.py): latents / (1 / std) + mean.
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(z / inv_std + mean, raw, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z, raw)  # the stats are not 0 / 1: skipping them would show
    image = fam.encode_latents(pipe.vae, clip[:, :, 0])
    assert image.shape == (1, 16, 4, 6)  # an image: the one latent frame, its axis dropped
    torch.testing.assert_close(image, fam.encode_latents(pipe.vae, clip[:, :, :1])[:, :, 0])
    assert fam.latent_layout(pipe.vae.config) == (16, 8)


def test_prompt_embeddings_are_the_pipelines(pipe, comps):
    fam = Wan()
    captions = ["a red square  moves right", "ok"]
    cond = fam.encode_text(comps, captions, torch.device("cpu"))
    want, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=512)
    assert cond["prompt_embeds"].shape == (2, 512, tiny.WAN_TEXT_DIM)
    torch.testing.assert_close(cond["prompt_embeds"], want)
    real = int(pipe.tokenizer(captions[1]).attention_mask.__len__())
    assert cond["prompt_embeds"][1, real:].abs().sum() == 0  # zero past the caption, as the pipeline samples


def test_timestep_and_sign_match_the_pipelines_sampler(pipe, comps):
    fam = Wan()
    sched = fam.sampling_scheduler(comps)
    assert type(sched).__name__ == "UniPCMultistepScheduler"
    sched.set_timesteps(10)
    i = 3
    sigma, t = sched.sigmas[i], sched.timesteps[i]
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 16, 2, 4, 6, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    noisy = (1 - sigma) * x0 + sigma * noise
    cond = fam.encode_text(comps, ["a cat"], torch.device("cpu"))
    got = fam.predict(comps.denoisers, noisy, sigma.reshape(1).float(), cond, None)
    # UniPC's timesteps are sigma x 1000 truncated to integers (964 for 0.9643); training feeds the exact value.
    assert int(t) == int(float(sigma) * 1000)
    want = pipe.transformer(hidden_states=noisy, timestep=(sigma * 1000).reshape(1).float(),
                            encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]
    torch.testing.assert_close(got, want)
    # The training target (noise - x0) is the velocity the sampler integrates: its x0 estimate recovers x0.
    sched._step_index = i
    torch.testing.assert_close(sched.convert_model_output(noise - x0, sample=noisy), x0, rtol=1e-4, atol=1e-4)
    # One-frame (image) latents go through as 4-D.
    image = fam.predict(comps.denoisers, noisy[:, :, 0], sigma.reshape(1).float(), cond, None)
    assert image.shape == (1, 16, 4, 6)


def test_comfy_file_loads_through_diffusers_wan_converter(pipe):
    from diffusers import WanPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from lora_trainer.families.wan.spec import ATTENTION, MLP

    rank, alpha = 2, 4.0
    model = tiny.transformer()
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(ATTENTION + MLP)), model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen))
    state = get_peft_model_state_dict(model)
    tool = Wan().tool_state_dict({"transformer": state}, {}, alpha=alpha, rank=rank, dtype=torch.float32)
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in tool
    assert "diffusion_model.blocks.1.cross_attn.o.alpha" in tool and "diffusion_model.blocks.0.ffn.2.alpha" in tool
    assert not any(".attn1." in k or "to_q" in k for k in tool)
    loaded = WanPipeline.lora_state_dict(tool)
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    n = 0
    for key, a in state.items():
        if not key.endswith("lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        b = state[f"{path}.lora_B.weight"]
        la, lb = loaded[f"transformer.{path}.lora_A.weight"], loaded[f"transformer.{path}.lora_B.weight"]
        torch.testing.assert_close(lb.float() @ la.float(), (alpha / rank) * b @ a, rtol=1e-5, atol=1e-5)
        n += 1
    assert n == 2 * len(ATTENTION + MLP)


def test_original_names():
    assert original_name("blocks.3.attn1.to_out.0") == "blocks.3.self_attn.o"
    assert original_name("blocks.3.attn2.to_k") == "blocks.3.cross_attn.k"
    assert original_name("blocks.0.ffn.net.0.proj") == "blocks.0.ffn.0"


@pytest.mark.parametrize("cfg,expected", [
    ({"num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16, "num_layers": 30}, "t2v-1.3b"),
    ({"num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16, "num_layers": 40}, "t2v-14b"),
    ({"num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 16}, None),  # the tiny model
])
def test_variant_by_width(cfg, expected):
    assert sig.variant(cfg)[0] == expected and sig.variant(cfg)[2] is None


def test_i2v_refused_ti2v_5b_by_its_channels():
    assert sig.variant({"image_dim": 1280, "in_channels": 36})[2][1] == "Wan image-to-video"
    assert sig.variant({"in_channels": 36})[2][1].startswith("Wan image-to-video")
    assert sig.variant({"in_channels": 48, "num_attention_heads": 24})[0] == "ti2v-5b"


def test_ti2v_5b_latents_and_per_token_timesteps():
    """Wan 2.2 TI2V-5B: its VAE's 48 channels at 16x, and one timestep per token as its pipeline passes them
    (expand_timesteps), which the adapter reproduces; the sampling pipeline gets expand_timesteps too."""
    pipe = tiny.build("ti2v-5b")
    comps = Components(denoisers={"transformer": pipe.transformer}, vae=pipe.vae,
                       text_encoders={"text_encoder": pipe.text_encoder}, tokenizers={"text_encoder": pipe.tokenizer},
                       scheduler_config=dict(pipe.scheduler.config), prediction_type="flow")
    fam = Wan()
    fam.variant = "ti2v-5b"
    clip = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = fam.encode_latents(pipe.vae, clip)
    assert z.shape == (1, 48, 2, 4, 4) and fam.latent_layout(pipe.vae.config) == (48, 16)
    cond = fam.encode_text(comps, ["a cat"], torch.device("cpu"))
    sigma = torch.tensor([0.7])
    got = fam.predict(comps.denoisers, z, sigma, cond, None)
    # The pipeline's expand_timesteps call (mask of ones: no image), [B, F' * h/2 * w/2].
    want = pipe.transformer(hidden_states=z, timestep=torch.full((1, 2 * 2 * 2), 700.0),
                            encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]
    torch.testing.assert_close(got, want)
    assert fam.pipeline(comps).config.expand_timesteps is True


def _keys(prefix="", width=1536, channels=16, i2v=False):  # noqa: D103
    names = {"patch_embedding.weight": [width, channels, 1, 2, 2], "text_embedding.0.weight": [width, 4096],
             "head.modulation": [1, 2, width], "blocks.0.self_attn.q.weight": [width, width]}
    if i2v:
        names["blocks.0.cross_attn.k_img.weight"] = [width, width]
    header = {prefix + k: {"dtype": "BF16", "shape": v, "data_offsets": [0, 0]} for k, v in names.items()}
    return FileKeys(frozenset(header), header)


def test_single_file_rules():
    m = sig.match_file(_keys("model.diffusion_model."))
    assert isinstance(m, Match) and m.variant == "t2v-1.3b" and "model.diffusion_model." in m.evidence
    assert sig.match_file(_keys(width=5120)).variant == "t2v-14b"
    assert isinstance(sig.match_file(_keys(i2v=True)), Refusal)
    assert sig.match_file(_keys(width=3072, channels=48)).variant == "ti2v-5b"
    assert isinstance(sig.match_file(_keys(width=5120, channels=36)), Refusal)
    assert sig.match_file(FileKeys(frozenset({"img_in.weight"}), {})) is None


def test_samples_from_cached_embeddings_as_a_frame_grid(pipe, comps):
    fam = Wan()
    cond = fam.encode_text(comps, ["a cat", ""], torch.device("cpu"))
    kwargs = fam.prompt_kwargs({"prompt_embeds": cond["prompt_embeds"][:1]}, {"prompt_embeds": cond["prompt_embeds"][1:]})
    sampler = fam.pipeline(comps)
    out = sampler(**kwargs, num_inference_steps=2, height=32, width=48, generator=torch.Generator().manual_seed(0),
                  **fam.sample_kwargs())
    assert out.images[0].size == (48, 32)
    fam.sample_frames = 5
    out = fam.pipeline(comps)(**kwargs, num_inference_steps=2, height=32, width=48,
                              generator=torch.Generator().manual_seed(0), **fam.sample_kwargs())
    assert out.images[0].size == (5 * 48, 32) and len(out.frames[0]) == 5
