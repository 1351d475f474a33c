"""Family facts without torch: target presets, flow defaults, and the config rules that need the family
(flow options on a DDPM model and the reverse), through preflight and the real --validate-only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, write_config
from lora_trainer.config.config import parse_config
from lora_trainer.families import SPECS
from lora_trainer.families.spec import expand_targets, flow_options, peft_targets
from lora_trainer.preflight.run import run_preflight

FLUX_MODULES = {
    "transformer_blocks.0.attn.to_q": 2, "transformer_blocks.0.attn.add_q_proj": 2,
    "transformer_blocks.0.norm1.linear": 2, "transformer_blocks.0.ff.net.2": 2,
    "single_transformer_blocks.0.attn.to_q": 2, "single_transformer_blocks.0.proj_mlp": 2,
    "single_transformer_blocks.0.proj_out": 2, "single_transformer_blocks.0.norm.linear": 2,
    "single_transformer_blocks.0.attn.norm_q": 1, "proj_out": 2, "x_embedder": 2, "pos_embed.embedding": 2,
}


def _cfg(tmp_path: Path, **extra):
    raw = {"dataset_path": str(tmp_path / "data"), "base_model": str(tmp_path / "model"),
           "output_path": str(tmp_path / "out"), "trigger_words": ["ohwx"], **extra}
    return parse_config(raw)[0]


def test_presets_select_the_documented_layers():
    flux = SPECS["flux1"]
    hits = expand_targets(flux.presets["attention_mlp"], FLUX_MODULES)
    # The single blocks' fused output projection, but not the model's final proj_out (suffix match would take both).
    assert hits["single_transformer_blocks.*.proj_out"] == ["single_transformer_blocks.0.proj_out"]
    assert hits["to_q"] == ["single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_q"]
    every = peft_targets(flux.presets["all_linear"], FLUX_MODULES)
    assert "transformer_blocks.0.norm1.linear" in every and "single_transformer_blocks.0.norm.linear" in every
    assert not {"proj_out", "x_embedder", "single_transformer_blocks.0.attn.norm_q"} & set(every), \
        "all_linear covers the blocks' Linear layers only"
    assert flux.targets("auto") == flux.presets["attention_mlp"] and flux.targets(["to_q"]) == ("to_q",)
    assert SPECS["sd15"].targets("auto") == ("to_q", "to_k", "to_v", "to_out.0"), "SD default unchanged"


def test_flow_options_take_family_defaults_and_explicit_values(tmp_path):
    assert flow_options(_cfg(tmp_path), SPECS["flux1"])["sigma_sampling"] == "sigmoid"
    sd3 = flow_options(_cfg(tmp_path), SPECS["sd3"])
    assert (sd3["sigma_sampling"], sd3["shift"], sd3["shift_value"], sd3["precondition_outputs"]) == \
        ("logit_normal", "static", 3.0, True)
    mine = flow_options(_cfg(tmp_path, flow_shift="none", flow_precondition_outputs=False), SPECS["sd3"])
    assert (mine["shift"], mine["precondition_outputs"]) == ("none", False)


@pytest.mark.parametrize("family,key,value", [
    ("sdxl", "flow_shift", "static"), ("sd15", "flow_sigma_sampling", "logit_normal"),
    ("flux1", "min_snr_gamma", 5.0), ("sd3", "prediction_type", "epsilon"), ("flux1", "noise_offset", 0.05),
    ("sd3", "train_guidance_scale", 1.0), ("sdxl", "max_sequence_length", 128), ("flux1", "resolution", 520),
])
def test_option_of_the_other_objective_is_a_config_error(tmp_path, family, key, value):
    pre = run_preflight(_cfg(tmp_path, model_type=family, **{key: value}))
    hits = [e for e in pre.errors if e["path"] == key]
    assert hits and hits[0]["code"] == "config_invalid" and hits[0]["allowed"], pre.errors
    assert run_preflight(_cfg(tmp_path, model_type=family)).errors == [e for e in pre.errors if e["path"] != key]


def test_validate_only_reports_the_objective_and_refuses_cross_options(tmp_path, tiny_models, dataset):
    base = {"dataset_path": str(dataset), "base_model": str(tiny_models["flux1-schnell"]),
            "output_path": str(tmp_path / "out"), "trigger_words": ["ohwx"], "resolution": 64,
            "min_bucket_resolution": 64}
    ok = run_cli("--config", str(write_config(tmp_path / "ok.json", **base)), "--validate-only")
    assert ok.returncode == 0, ok.stdout[-3000:]
    model = ok.last("validation")["summary"]["model"]
    assert (model["family"], model["variant"]) == ("flux1", "schnell")
    assert model["objective"] == {"kind": "flow", **flow_options(parse_config(base)[0], SPECS["flux1"])}
    bad = run_cli("--config", str(write_config(tmp_path / "bad.json", **base, min_snr_gamma=5,
                                               train_guidance_scale=1.0)), "--validate-only")
    assert bad.returncode == 2
    paths = {e["path"] for e in bad.last("validation")["errors"]}
    assert {"min_snr_gamma", "train_guidance_scale"} <= paths, json.dumps(bad.last("validation")["errors"])


def test_validate_only_checks_transformer_targets(tmp_path, tiny_models, dataset):
    base = {"dataset_path": str(dataset), "base_model": str(tiny_models["sd3"]), "output_path": str(tmp_path / "out"),
            "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64}
    typo = run_cli("--config", str(write_config(tmp_path / "t.json", **base, target_modules=["to_q", "add_qq_proj"])),
                   "--validate-only")
    errors = typo.last("validation")["errors"]
    assert typo.returncode == 2 and [(e["code"], e["value"]) for e in errors] == [("target_modules_unknown",
                                                                                  ["add_qq_proj"])]
    norm = run_cli("--config", str(write_config(tmp_path / "n.json", **base, target_modules=["norm_q"])),
                   "--validate-only")
    assert norm.last("validation")["errors"][0]["code"] == "target_modules_unsupported"
    for preset in ("attention", "attention_mlp", "all_linear"):
        ok = run_cli("--config", str(write_config(tmp_path / f"{preset}.json", **base, target_modules=preset)),
                     "--validate-only")
        assert ok.returncode == 0, ok.last("validation")["errors"]


@pytest.mark.parametrize("name", ["flux1_dev.json", "sd35_large.json"])
def test_example_family_configs_validate(name):
    from lora_trainer.config.config import load_config

    cfg, warnings = load_config(Path(__file__).resolve().parent.parent / "examples" / "configs" / name)
    assert cfg.model_type in ("flux1", "sd3") and not warnings
    pre = run_preflight(cfg)
    assert not [e for e in pre.errors if e["code"] == "config_invalid"], "no family rule may refuse the example"
