"""init_lora: a run that starts from an existing LoRA file (ours, kohya or PEFT layout) continues it: with a
vanishing learning rate the run writes back the same LoRA, and a different alpha is compensated so the delta is
the same; a file that does not fit the config (rank, DoRA, modules) is refused, by --validate-only already."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, write_config

# lr 1e-12: one AdamW step moves fp32 weights by ~1e-12, which the fp16 export cannot represent, so the written
# LoRA must equal the one read (schema forbids lr 0).
FROZEN = dict(learning_rate=1e-12, weight_decay=0.0, max_train_steps=1, checkpointing_steps=None)


def _cfg(tmp_path: Path, model, dataset, name: str, **extra) -> Path:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / name),
           "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "lora_rank": 4, "lora_alpha": 8,
           "learning_rate": 1e-2, "max_train_steps": 3, "train_text_encoder": True, **extra}
    return write_config(tmp_path / f"{name}.json", **cfg)


def _deltas(sd: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = sd[key].float(), sd[f"{name}.lora_up.weight"].float()
            out[name] = (up.flatten(1) @ down.flatten(1)) * float(sd[f"{name}.alpha"]) / down.shape[0]
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_models):
    from lora_trainer.testing.tiny import make_dataset

    tmp = tmp_path_factory.mktemp("init_lora")
    data = make_dataset(tmp / "data", n=4, trigger="ohwx")
    runs = {}
    for family in ("sd15", "sdxl"):
        res = run_cli("--config", str(_cfg(tmp, tiny_models[family], data, f"src_{family}")))
        assert res.returncode == 0, res.stderr[-3000:]
        runs[family] = tmp / f"src_{family}"
    return data, runs


@pytest.mark.parametrize("family,file", [("sd15", "pytorch_lora_weights.safetensors"), ("sd15", "lora.safetensors"),
                                         ("sdxl", "lora.safetensors")])
def test_continuing_a_lora_starts_from_its_weights(tmp_path, tiny_models, source, family, file):
    data, runs = source
    src = runs[family] / file
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models[family], data, "cont", init_lora=str(src), **FROZEN)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(e.get("phase") == "init_lora" for e in res.of_type("status"))
    want = load_file(runs[family] / "lora.safetensors")
    got = load_file(tmp_path / "cont" / "lora.safetensors")
    assert got.keys() == want.keys()
    for k in want:  # text encoders and SDXL's SGM-named UNet modules included
        assert torch.equal(got[k], want[k]), k


def test_a_different_alpha_keeps_the_delta(tmp_path, tiny_models, source):
    data, runs = source
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], data, "cont", lora_alpha=2,
                                       init_lora=str(runs["sd15"] / "lora.safetensors"), **FROZEN)))
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = _deltas(load_file(runs["sd15"] / "lora.safetensors")), _deltas(load_file(tmp_path / "cont" / "lora.safetensors"))
    assert got.keys() == want.keys()
    for k in want:  # lora_up was scaled by (8/4)/(2/4) = 4, then rounded to fp16 again
        torch.testing.assert_close(got[k], want[k], rtol=2e-3, atol=2e-3 * float(want[k].abs().max()))


def test_files_that_do_not_fit_are_refused_before_training(tmp_path, tiny_models, source):
    data, runs = source
    src = str(runs["sd15"] / "lora.safetensors")
    cases = [({"lora_rank": 8}, "lora_rank"), ({"use_dora": True}, "use_dora"),
             ({"init_lora": str(tmp_path / "missing.safetensors")}, "init_lora"),
             ({"init_lora": str(tiny_models["sd15"] / "unet" / "diffusion_pytorch_model.safetensors")}, "init_lora")]
    for extra, path in cases:
        res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], data, "bad", **{"init_lora": src, **extra})),
                      "--validate-only")
        assert res.returncode == 2, (extra, res.stdout[-1500:])
        assert path in {e["path"] for e in res.last("validation")["errors"]}, extra
    # Modules the run would not train (the file has text-encoder modules): found when the adapters exist.
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], data, "bad2", init_lora=src,
                                       train_text_encoder=False)))
    assert res.returncode == 2 and "target_modules" in {p["path"] for p in res.last("error")["details"]["problems"]}
    assert "Traceback" not in res.stderr


def test_continuing_a_dora_keeps_its_magnitudes(tmp_path, tiny_models, source):
    data, _ = source
    dora = dict(use_dora=True, target_modules=["to_q", "to_v", "conv1"])  # conv1: [out,1,1,1] <-> [1,out,1,1]
    src = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], data, "src", **dora)))
    assert src.returncode == 0, src.stderr[-3000:]
    res = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], data, "cont", **dora, **FROZEN,
                                       init_lora=str(tmp_path / "src" / "lora.safetensors"))))
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = load_file(tmp_path / "src" / "lora.safetensors"), load_file(tmp_path / "cont" / "lora.safetensors")
    assert got.keys() == want.keys() and any(k.endswith(".dora_scale") for k in want)
    for k in want:
        if k.endswith(".dora_scale"):  # fp32 in the file: one AdamW step at lr 1e-12 stays below its resolution too
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)
        else:
            assert torch.equal(got[k], want[k]), k


# The PEFT file's path is one for every family: the newer families check their tool file only (CI time).
@pytest.mark.parametrize("tiny,file", [(t, f) for t in ("zimage", "qwen-image")
                                       for f in ("lora.safetensors", "pytorch_lora_weights.safetensors")]
                         + [(t, "lora.safetensors") for t in ("qwen-image-2.1", "chroma", "anima", "krea2", "wan21")])
def test_continuing_a_dit_lora_from_either_export(tmp_path, tiny_models, dataset, tiny, file):
    """The DiT families whose ComfyUI file is diffusers' names under diffusion_model. with .alpha (Z-Image,
    Qwen-Image, Qwen-Image 2.1), under transformer. with alpha folded in (Chroma), or original names read back
    through the family's convert.tool_file_to_peft (Anima, Krea 2): a run continues either exported file and, with a
    vanishing learning rate, writes it back."""
    common = {"dataset_path": str(dataset), "base_model": str(tiny_models[tiny]), "trigger_words": ["ohwx"],
              "resolution": 64, "min_bucket_resolution": 64, "lora_rank": 4, "lora_alpha": 8}
    src = run_cli("--config", str(write_config(tmp_path / "src.json", output_path=str(tmp_path / "src"),
                                               learning_rate=1e-2, max_train_steps=2, **common)))
    assert src.returncode == 0, src.stderr[-3000:]
    cont = run_cli("--config", str(write_config(tmp_path / "cont.json", output_path=str(tmp_path / "cont"),
                                                init_lora=str(tmp_path / "src" / file), **common, **FROZEN)))
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert any(e.get("phase") == "init_lora" for e in cont.of_type("status"))
    want, got = load_file(tmp_path / "src" / "lora.safetensors"), load_file(tmp_path / "cont" / "lora.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
