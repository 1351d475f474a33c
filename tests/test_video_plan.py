"""The memory plan and the cache plan count a video family's frames: Wan's block and causal VAE measured on the CPU
at their real widths against the plan's figures for one and several latent frames, --validate-only planning the
largest clip a dataset trains (activations, latent cache) beside an images-only run, and Wan 2.2 TI2V-5B's
32-px sides (its 16x VAE) in the resolution check and the token count."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT, run_cli, write_config
from lora_trainer.families import SPECS
from lora_trainer.preflight import memory_plan

sys.path.insert(0, str(ROOT))
from bench.wan_check import TRANSFORMER, VAE, plan_folder  # noqa: E402

TEXT_TOKENS = 8
TOKENS_PER_FRAME = 64  # 16 x 16 latents, 2 x 2 patches


def _saved_bytes(model, latent_frames: int) -> int:
    """Bytes autograd keeps for the backward of one forward on a [1, C, F', 16, 16] latent (the frozen weights
    left out: the plan counts them apart)."""
    import torch

    frozen = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in frozen:
            saved[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randn(1, model.config.in_channels, latent_frames, 16, 16, dtype=torch.bfloat16)
    text = torch.randn(1, TEXT_TOKENS, model.config.text_dim, dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)
    return sum(saved.values())


@pytest.mark.parametrize("preset", ["attention", "attention_mlp"])
def test_wan_block_activations_follow_the_latent_frames(preset):
    """Two blocks of Wan 2.1 1.3B's width (12 x 128, ffn 8960), bf16, r16 LoRA through PEFT: what autograd keeps
    for one and three latent frames against the plan's activations (no checkpointing) for the same tokens."""
    import torch
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    spec = SPECS["wan"]
    config = dict(TRANSFORMER["t2v-1.3b"], num_layers=2, text_dim=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(**config).to(torch.bfloat16).requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=list(spec.presets[preset])))
    for latent in (1, 3):
        measured = _saved_bytes(model, latent)
        # 16 x 16 latents are 128 px: the plan's (128 / 16)^2 = 64 tokens a latent frame
        planned = memory_plan._activations(spec, config, 0, 128, 1, 2, False, preset == "attention", TEXT_TOKENS,
                                           variant=None, latent=latent)
        assert abs(measured - planned) <= memory_plan.DRIFT * planned, (preset, latent, measured, planned)


def test_wan_vae_encode_counts_a_clip():
    """AutoencoderKLWan at its real widths encodes a clip chunk by chunk with causal caches: its scratch (measured
    as test_memory_plan measures the FLUX VAE's) plus the clip's pixels against the plan, for an image and a 9-frame
    clip (Wan 2.1), and a 9-frame clip through Wan 2.2's patchified residual VAE."""
    import torch
    from diffusers import AutoencoderKLWan

    from tests.test_memory_plan import _LivePeak

    for variant, frames in (("t2v-1.3b", 1), ("t2v-1.3b", 9), ("ti2v-5b", 9)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = AutoencoderKLWan(**VAE[variant]).eval().requires_grad_(False)
        x = torch.randn(1, 3, frames, 64, 64)
        with torch.no_grad(), _LivePeak() as peak:
            vae.encode(x).latent_dist.mode()
        measured = peak.peak + x.nbytes
        planned = memory_plan._vae_encode_bytes(dict(vae.config), 64, 1, frames)
        assert abs(measured - planned) <= memory_plan.DRIFT * planned, (variant, frames, measured, planned)
    # an image family's VAE keeps its measured figure (frames 0)
    assert memory_plan._vae_encode_bytes({"block_out_channels": [128]}, 64, 1) == 5 * 128 * 64 * 64 * 4


@pytest.fixture(scope="module")
def wan_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-plan")
    return {"t2v-1.3b": plan_folder(root / "wan21", "t2v-1.3b"), "ti2v-5b": plan_folder(root / "wan22", "ti2v-5b"),
            "root": root}


def _clip_dataset(folder, *, clips: bool):
    from lora_trainer.testing.tiny import make_dataset
    from lora_trainer.testing.video import write_clip

    data = make_dataset(folder, n=2, trigger="ohwx")
    if clips:
        write_clip(data / "long.mp4", frames=60, fps=24, width=64, height=48)  # 2.5 s: 40 -> 33 frames at 16 fps
        write_clip(data / "short.mp4", frames=15, fps=15, width=48, height=32)  # 1 s: 16 -> 13 frames at 16 fps
        (data / "long.txt").write_text("ohwx, a square moving")
        (data / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    return data


def _validate(tmp_path, folder, data, name, **extra) -> dict:
    cfg = write_config(tmp_path / f"{name}.json", **{
        "dataset_path": str(data), "base_model": str(folder), "output_path": str(tmp_path / f"out-{name}"),
        "trigger_words": ["ohwx"], "resolution": 480, "mixed_precision": "bf16", "device": "cpu", "video_frames": 33,
        "video_fps": 16, **extra})
    res = run_cli("--config", str(cfg), "--validate-only")
    return res.last("validation")


def test_validate_only_plans_the_largest_clip(wan_folders, tmp_path):
    """A dataset with clips plans the largest clip bucket's tokens (33 frames: 9 latent frames of 30 x 30 tokens)
    and caches every clip's latent frames; the same images without clips plan one frame, as an image run."""
    folder = wan_folders["t2v-1.3b"]
    images = _validate(tmp_path, folder, _clip_dataset(tmp_path / "images", clips=False), "images")
    video = _validate(tmp_path, folder, _clip_dataset(tmp_path / "clips", clips=True), "clips")
    assert video["summary"]["dataset"]["videos"]["frame_buckets"] == {"13": 1, "33": 1}
    assert any(w["code"] == "video_unreadable" for w in video["warnings"])  # the broken clip: listed, skipped
    mem, mem1 = video["summary"]["memory"], images["summary"]["memory"]
    assert mem["video"] == {"frames": 33, "latent_frames": 9} and mem1["video"] == {"frames": 1, "latent_frames": 1}
    cfg_json = json.loads((folder / "transformer" / "config.json").read_text())
    spec, d = SPECS["wan"], 12 * 128
    for plan, latent in ((mem, 9), (mem1, 1)):
        expected = memory_plan._activations(spec, cfg_json, 0, 480, 1, 2, False, True, 512, latent=latent)
        assert plan["parts_gib"]["activations"] == round(expected / memory_plan.GIB, 2)
    # tokens: 9 x 900 image + 512 text against 900 + 512
    ratio = mem["parts_gib"]["activations"] / mem1["parts_gib"]["activations"]
    assert ratio == pytest.approx((9 * 900 + 512) / (900 + 512), rel=0.02)
    assert d * 9 * 900 * 26 * 2 * 30 / memory_plan.GIB < mem["parts_gib"]["activations"]
    # the latent cache: 2 images of one frame, each clip's latent frames (9, 4) in each of its windows (video_windows,
    # 3 by default) at its bucket; on disk by default
    from lora_trainer.data.buckets import bucket_range, make_buckets, nearest_bucket

    lat = video["summary"]["caches"]["latents"]
    assert lat["windows"] == 3 and lat["clips"] == 2 and lat["latent_frames"] == 2 + (9 + 4) * 3
    bw, bh = nearest_bucket(64, 48, make_buckets(480, *bucket_range(None, None, 480)))
    assert nearest_bucket(48, 32, make_buckets(480, *bucket_range(None, None, 480))) == (bw, bh)
    assert lat["total_bytes"] - images["summary"]["caches"]["latents"]["total_bytes"] == \
        (9 + 4) * 3 * 16 * (bw // 8) * (bh // 8) * 4
    assert lat["placement"] == "disk" and images["summary"]["caches"]["latents"]["placement"] != "disk"
    # uncached: a 33-frame clip through the causal VAE, not one image
    uncached = _validate(tmp_path, folder, _clip_dataset(tmp_path / "clips", clips=True), "uncached",
                         cache_latents=False, gradient_checkpointing=True)
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    encode = memory_plan._vae_encode_bytes(vae_cfg, 480, 1, 33)
    assert uncached["summary"]["memory"]["parts_gib"]["activations"] >= round(encode / memory_plan.GIB, 2) > 0


def test_ti2v_5b_sides_are_multiples_of_32(wan_folders, tmp_path):
    """Wan 2.2 TI2V-5B's VAE compresses 16x (patch 2: a token is 32 px): 496 px is refused for it, not for Wan 2.1,
    and its plan counts (480 / 32)^2 image tokens a latent frame."""
    spec = SPECS["wan"]
    assert (spec.pixel_multiple_for(None), spec.pixel_multiple_for("t2v-1.3b"), spec.pixel_multiple_for("ti2v-5b")) \
        == (16, 16, 32)
    assert spec.token_pixels_for("ti2v-5b") == 32 and SPECS["qwen_image21"].token_pixels_for(None) == 16
    from lora_trainer.data.buckets import make_buckets

    # the buckets step by 64 px: every family's sides are multiples of every variant's pixel multiple
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in make_buckets(480, 256, 1024))
    data = _clip_dataset(tmp_path / "data", clips=False)
    for variant, refused in (("ti2v-5b", True), ("t2v-1.3b", False)):
        v = _validate(tmp_path, wan_folders[variant], data, variant, resolution=496, enable_bucketing=False)
        errors = [e for e in v["errors"] if e.get("path") == "resolution"]
        assert bool(errors) == refused, (variant, v["errors"])
        if refused:
            assert "multiples of 32" in errors[0]["message"] and "480" in errors[0]["allowed"]
    v = _validate(tmp_path, wan_folders["ti2v-5b"], data, "ok")
    cfg_json = json.loads((wan_folders["ti2v-5b"] / "transformer" / "config.json").read_text())
    assert v["summary"]["model"]["variant"] == "ti2v-5b"
    expected = memory_plan._activations(spec, cfg_json, 0, 480, 1, 2, False, True, 512, variant="ti2v-5b")
    as_16px = memory_plan._activations(spec, cfg_json, 0, 480, 1, 2, False, True, 512, variant="t2v-1.3b")
    assert v["summary"]["memory"]["parts_gib"]["activations"] == round(expected / memory_plan.GIB, 2) < \
        round(as_16px / memory_plan.GIB, 2)
