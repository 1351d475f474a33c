"""Family facts without torch: target presets, flow defaults (per variant, as README states them), and the config
rules that need the family (flow options on a DDPM model and the reverse), through preflight, the real
--validate-only and run_started."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_cli, write_config
from lora_trainer.config.config import parse_config
from lora_trainer.families import SPECS
from lora_trainer.families.spec import expand_targets, flow_options, objective_summary, peft_targets
from lora_trainer.preflight.run import run_preflight

README = Path(__file__).resolve().parent.parent / "README.md"
# README's family table, objective column, word for word; FLOW_DEFAULTS restates it as values, so that the code is
# checked against what users read and not against itself.
README_OBJECTIVE = {"flux1": "flow: `sigmoid` sigmas; dev `resolution` shift, schnell none",
                    "sd3": "flow: `logit_normal` sigmas, `static` shift 3.0, x0 preconditioning",
                    "flux2": "flow: `sigmoid` sigmas, `resolution` shift",
                    "flux2_klein": "flow: `sigmoid` sigmas, `resolution` shift",
                    "zimage": "flow: `uniform` sigmas, `static` shift 3.0",
                    "qwen_image": "flow: `sigmoid` sigmas, `resolution` shift (its scheduler's 0.5 / 0.9 at 256 / "
                                  "8192 tokens)",
                    "qwen_image21": "flow: `sigmoid` sigmas, `resolution` shift (its scheduler's constants)",
                    "chroma": "flow: `sigmoid` sigmas, no shift (kohya's Chroma advice)",
                    "anima": "flow: `uniform` sigmas, `static` shift 3.0 (ai-toolkit's)",
                    "krea2": "flow: `sigmoid` sigmas, `resolution` shift (its scheduler's 0.5 / 1.15 at 256 / 6400 "
                             "tokens)",
                    "ideogram4": "flow: `logit_normal` sigmas (std 1.5), `area` shift",
                    "wan": "flow: `sigmoid` sigmas, `static` shift 3.0 (musubi-tuner's, ai-toolkit's)"}
_FLUX = {"sigma_sampling": "sigmoid", "loss_weighting": "none", "precondition_outputs": False}
_SD3 = {"sigma_sampling": "logit_normal", "shift": "static", "shift_value": 3.0, "loss_weighting": "none",
        "precondition_outputs": True}
_WAN = {**_FLUX, "shift": "static", "shift_value": 3.0}
FLOW_DEFAULTS = {("wan", None): _WAN, ("wan", "t2v-1.3b"): _WAN, ("wan", "t2v-14b"): _WAN, ("wan", "ti2v-5b"): _WAN,
                 ("wan", "t2v-a14b"): _WAN,
                 ("flux1", "dev"): {**_FLUX, "shift": "resolution"}, ("flux1", "schnell"): {**_FLUX, "shift": "none"},
                 ("sd3", "sd3-medium"): _SD3, ("sd3", "sd3.5-medium"): _SD3, ("sd3", "sd3.5-large"): _SD3,
                 ("flux2", "dev"): {**_FLUX, "shift": "resolution"},
                 ("flux2_klein", "klein-4b"): {**_FLUX, "shift": "resolution"},
                 ("flux2_klein", "klein-9b"): {**_FLUX, "shift": "resolution"},
                 # one variant: README lists none
                 ("zimage", None): {"sigma_sampling": "uniform", "shift": "static", "shift_value": 3.0,
                                    "loss_weighting": "none", "precondition_outputs": False},
                 ("qwen_image", None): {**_FLUX, "shift": "resolution"},
                 ("qwen_image", "2512"): {**_FLUX, "shift": "resolution"},
                 ("qwen_image21", None): {**_FLUX, "shift": "resolution"},
                 ("chroma", None): {**_FLUX, "shift": "none"},
                 ("anima", None): {"sigma_sampling": "uniform", "shift": "static", "shift_value": 3.0,
                                   "loss_weighting": "none", "precondition_outputs": False},
                 ("krea2", None): {**_FLUX, "shift": "resolution"},
                 ("ideogram4", None): {"sigma_sampling": "logit_normal", "logit_std": 1.5, "shift": "area",
                                       "loss_weighting": "none", "precondition_outputs": False}}

FLUX_MODULES = {
    "transformer_blocks.0.attn.to_q": 2, "transformer_blocks.0.attn.add_q_proj": 2,
    "transformer_blocks.0.norm1.linear": 2, "transformer_blocks.0.ff.net.2": 2,
    "single_transformer_blocks.0.attn.to_q": 2, "single_transformer_blocks.0.proj_mlp": 2,
    "single_transformer_blocks.0.proj_out": 2, "single_transformer_blocks.0.norm.linear": 2,
    "single_transformer_blocks.0.attn.norm_q": 1, "proj_out": 2, "x_embedder": 2, "pos_embed.embedding": 2,
}


def _readme_families() -> dict[str, dict[str, str]]:
    """README's "Families" table (the first table after the heading): model_type -> {column header: cell}."""
    lines = README.read_text().split("\n## Families\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    header, _, *body = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[start:end]]
    return {row[1].strip("`"): dict(zip(header, row)) for row in body}


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


def test_readme_states_the_flow_defaults_of_every_variant():
    table = _readme_families()
    for family, text in README_OBJECTIVE.items():
        assert table[family]["objective (defaults)"] == text
        listed = set(re.findall(r"`([^`]+)`", table[family]["variants (detected)"]))
        # None: a family without variants (its README cell names none)
        assert listed == {v for f, v in FLOW_DEFAULTS if f == family and v is not None}, \
            "FLOW_DEFAULTS covers README's variants"
    assert {f for f, s in SPECS.items() if s.is_flow} == set(README_OBJECTIVE)


@pytest.mark.parametrize("family,variant", list(FLOW_DEFAULTS))
def test_flow_defaults_are_readmes_per_variant(tmp_path, family, variant):
    want = FLOW_DEFAULTS[family, variant]
    got = flow_options(_cfg(tmp_path), SPECS[family], variant)
    assert {k: got[k] for k in want} == want
    assert objective_summary(_cfg(tmp_path), SPECS[family], variant) == {"kind": "flow", **got}
    assert None not in got.values(), "every default resolved"


def test_flow_options_unknown_variant_and_explicit_values(tmp_path):
    # A variant not known yet (a hub model not downloaded): the family's default variant, dev for FLUX.1.
    assert flow_options(_cfg(tmp_path), SPECS["flux1"], None) == flow_options(_cfg(tmp_path), SPECS["flux1"], "dev")
    assert flow_options(_cfg(tmp_path), SPECS["sd3"], None)["shift"] == "static"
    mine = flow_options(_cfg(tmp_path, flow_shift="none", flow_precondition_outputs=False), SPECS["sd3"], "sd3-medium")
    assert (mine["shift"], mine["precondition_outputs"]) == ("none", False)
    forced = flow_options(_cfg(tmp_path, flow_shift="resolution"), SPECS["flux1"], "schnell")
    assert forced["shift"] == "resolution", "an explicit flow_shift wins over schnell's default"
    assert objective_summary(_cfg(tmp_path), SPECS["sdxl"], None) == {"kind": "ddpm"}
    assert all((None in s.flow) if s.is_flow else s.flow is None for s in SPECS.values()), "every flow family: None"


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
    objective = model["objective"]
    assert objective["kind"] == "flow" and {k: objective[k] for k in FLOW_DEFAULTS["flux1", "schnell"]} == \
        FLOW_DEFAULTS["flux1", "schnell"], objective
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


@pytest.mark.parametrize("name", ["flux1_dev.json", "sd35_large.json", "wan21_clips.json", "wan22_a14b.json"])
def test_example_family_configs_validate(name):
    from lora_trainer.config.config import load_config

    cfg, warnings = load_config(Path(__file__).resolve().parent.parent / "examples" / "configs" / name)
    assert cfg.model_type in ("flux1", "sd3", "wan") and not warnings
    pre = run_preflight(cfg)
    assert not [e for e in pre.errors if e["code"] == "config_invalid"], "no family rule may refuse the example"


def test_the_training_methods_example_config_parses_cleanly():
    """examples/configs/sdxl_methods.json (LoKr, EMA, per-dataset masks, a regularisation set, a held-out split)."""
    from lora_trainer.config.config import load_config

    cfg, warnings = load_config(Path(__file__).resolve().parent.parent / "examples" / "configs" / "sdxl_methods.json")
    assert not warnings, warnings
    assert (cfg.network_type, cfg.ema_decay, cfg.masked_loss, cfg.eval_split) == ("lokr", 0.999, True, 0.1)
    assert [e.role for e in cfg.datasets] == ["train", "regularization"]
    assert dict(cfg.datasets[0].overrides)["mask_path"] == "/data/datasets/ohwx_masks"


def test_run_started_reports_schnells_unshifted_objective(tmp_path, tiny_models, dataset):
    """The objective the trainer resolves from the loaded model's variant, as run_started reports it."""
    base = {"dataset_path": str(dataset), "base_model": str(tiny_models["flux1-schnell"]),
            "output_path": str(tmp_path / "out"), "trigger_words": ["ohwx"], "resolution": 64,
            "min_bucket_resolution": 64, "max_train_steps": 1, "max_sequence_length": 32}
    res = run_cli("--config", str(write_config(tmp_path / "run.json", **base)))
    assert res.returncode == 0, res.stderr[-3000:]
    started = res.last("run_started")
    objective = started["objective"]
    assert started["variant"] == "schnell" and objective["kind"] == "flow"
    assert {k: objective[k] for k in FLOW_DEFAULTS["flux1", "schnell"]} == FLOW_DEFAULTS["flux1", "schnell"], objective
