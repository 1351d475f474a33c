"""merge_lora: a LoRA fused into the frozen base before training (ai-toolkit's de-distillation "training adapter"
for Z-Image Turbo), never part of the exported LoRA: fused exactly, used by the training, absent from the outputs,
recorded in the manifest, checked by --validate-only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli, write_config

TINY = "zimage"  # the family the training adapter exists for; any family's pipeline loader works the same way


def _common(tiny_models, dataset) -> dict:
    return {"dataset_path": str(dataset), "base_model": str(tiny_models[TINY]), "trigger_words": ["ohwx"],
            "resolution": 64, "min_bucket_resolution": 64, "lora_rank": 4, "lora_alpha": 8, "log_every_n_steps": 1,
            "checkpointing_steps": None}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_models):
    """A trained LoRA of the tiny model in both exported layouts (ai-toolkit's diffusion_model. one and PEFT's)."""
    from lora_trainer.testing.tiny import make_dataset

    tmp = tmp_path_factory.mktemp("merge_src")
    data = make_dataset(tmp / "data", n=2, trigger="ohwx")
    res = run_cli("--config", str(write_config(tmp / "src.json", output_path=str(tmp / "src"), learning_rate=3e-2,
                                               max_train_steps=3, **_common(tiny_models, data))))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "src"


def test_the_merge_is_the_lora_delta_exactly(tiny_models, adapter):
    """Every targeted Linear of the denoiser moves by scale x alpha / rank x B @ A, nothing else moves."""
    from lora_trainer.families import get_family
    from lora_trainer.runtime.merge_lora import merge_into_base

    fam = get_family("zimage")
    comps = fam.load(Path(tiny_models[TINY]), single_file=False, dtype=torch.float32)
    base = {k: v.clone() for k, v in comps.denoisers["transformer"].state_dict().items()}
    info = merge_into_base(fam, comps, adapter / "lora.safetensors", 0.5)
    sd = load_file(adapter / "lora.safetensors")  # ai-toolkit's layout: diffusion_model.<module>, with .alpha
    after = comps.denoisers["transformer"].state_dict()
    assert set(after) == set(base), "the adapter's layers were removed again"
    modules = {k.removeprefix("diffusion_model.")[: -len(".lora_A.weight")] for k in sd if k.endswith(".lora_A.weight")}
    assert info["weights_changed"]["transformer"] == len(modules) > 0
    for m in modules:
        a, b = (sd[f"diffusion_model.{m}.lora_{x}.weight"].float() for x in "AB")
        want = 0.5 * float(sd[f"diffusion_model.{m}.alpha"]) / a.shape[0] * b @ a
        torch.testing.assert_close(after[f"{m}.weight"] - base[f"{m}.weight"], want, rtol=1e-3, atol=1e-5)
    assert all(torch.equal(after[k], base[k]) for k in base if k.rsplit(".", 1)[0] not in modules)


def test_a_run_trains_on_the_merged_base_and_exports_only_its_own_lora(tmp_path, tiny_models, dataset, adapter):
    common = {**_common(tiny_models, dataset), "learning_rate": 1e-12, "weight_decay": 0.0, "max_train_steps": 1}
    merged = run_cli("--config", str(write_config(tmp_path / "m.json", output_path=str(tmp_path / "m"),
                                                  merge_lora=str(adapter / "lora.safetensors"), **common)))
    assert merged.returncode == 0, merged.stderr[-3000:]
    plain = run_cli("--config", str(write_config(tmp_path / "p.json", output_path=str(tmp_path / "p"), **common)))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert any(e["phase"] == "merge_lora" for e in merged.of_type("status"))
    # The same seed, data and fresh LoRA: only the base differs, so the first loss does.
    assert merged.of_type("step")[0]["loss"] != plain.of_type("step")[0]["loss"]
    # Its own LoRA only: PEFT starts B at zero and lr 1e-12 leaves it there, so nothing of the adapter is exported.
    peft = load_file(tmp_path / "m" / "pytorch_lora_weights.safetensors")
    assert peft and all(not v.any() for k, v in peft.items() if "lora_B" in k)
    manifest = json.loads((tmp_path / "m" / "training_manifest.json").read_text())
    assert manifest["merged_lora"]["scale"] == 1.0 and len(manifest["merged_lora"]["sha256"]) == 64
    assert json.loads((tmp_path / "p" / "training_manifest.json").read_text())["merged_lora"] is None
    assert "fused into the base at scale 1" in (tmp_path / "m" / "README.md").read_text()


def test_validate_only_refuses_what_is_not_a_lora(tmp_path, tiny_models, dataset):
    junk = tmp_path / "junk.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, str(junk))
    for value, words in ((str(junk), "is not a LoRA"), (str(tmp_path / "missing.safetensors"), "no such file")):
        cfg = write_config(tmp_path / "c.json", output_path=str(tmp_path / "out"), merge_lora=value,
                           **_common(tiny_models, dataset))
        res = run_cli("--config", str(cfg), "--validate-only")
        assert res.returncode == 2, res.stderr[-2000:]
        problems = [e for e in res.last("validation")["errors"] if e.get("path") == "merge_lora"]
        assert problems and words in problems[0]["message"], res.last("validation")["errors"]
