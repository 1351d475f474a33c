"""Non-finite numbers in a config (issue 21, item 9): Python's JSON parser accepts NaN, Infinity and -Infinity, which
JSON does not have and no schema range rejects; a config holding one must be refused as config_invalid (exit 2)
naming the key's JSON path and the literal, by --validate-only and before a training run loads anything."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli
from lora_trainer.config.config import load_config, parse_config
from lora_trainer.contract.errors import ConfigError

LITERALS = ("NaN", "Infinity", "-Infinity")


def _config_text(tmp_path, model, dataset, key, literal, nested) -> str:
    cfg = {"dataset_path": str(dataset), "base_model": str(model), "output_path": str(tmp_path / "out"),
           "trigger_words": ["ohwx"], "max_train_steps": 1, "resolution": 64, "checkpointing_steps": None}
    where = {}
    if nested:
        cfg["training_params"] = where
    else:
        where = cfg
    where[key] = "@@VALUE@@"
    # json.dumps would write the literal as NaN too, but only for floats; the marker keeps the literal exact.
    return json.dumps(cfg, indent=1).replace('"@@VALUE@@"', literal)


@pytest.mark.parametrize("nested", [False, True], ids=["top", "training_params"])
@pytest.mark.parametrize("literal", LITERALS)
def test_cli_refuses_non_finite_numbers(tmp_path, tiny_models, dataset, literal, nested):
    path = "training_params.learning_rate" if nested else "learning_rate"
    cfg = tmp_path / "c.json"
    cfg.write_text(_config_text(tmp_path, tiny_models["sd15"], dataset, "learning_rate", literal, nested))
    for flags in (["--validate-only"], []):  # the check, then a real training run
        res = run_cli("--config", str(cfg), *flags)
        assert res.returncode == 2, (flags, res.stdout[-2000:], res.stderr[-2000:])
        err = res.last("error")
        assert err["code"] == "config_invalid" and err["exit_code"] == 2
        problems = err["details"]["problems"]
        assert [(p["path"], p["value"]) for p in problems] == [(path, literal)], problems
        assert "finite" in problems[0]["message"]
        assert not res.of_type("run_started") and not res.of_type("validation")
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_every_place_and_python_callers(tmp_path):
    """Lists, flat and nested at once, and an overflowing literal (1e999 parses as inf) are each named; parse_config
    refuses float('nan') from a Python caller too."""
    text = ('{"dataset_path": "d", "base_model": "m", "output_path": "o", "trigger_words": ["x"],'
            ' "noise_offset": -Infinity, "training_params": {"lora_dropout": NaN, "weight_decay": 1e999},'
            ' "validation_prompts": ["a", NaN]}')
    p = tmp_path / "c.json"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    got = {(q["path"], q["value"]) for q in info.value.problems}
    assert got == {("noise_offset", "-Infinity"), ("training_params.lora_dropout", "NaN"),
                   ("training_params.weight_decay", "1e999"), ("validation_prompts[1]", "NaN")}, info.value.problems
    json.dumps(info.value.problems, allow_nan=False)  # the error event must stay strict JSON
    with pytest.raises(ConfigError) as info:
        parse_config({"dataset_path": "d", "base_model": "m", "output_path": "o", "trigger_words": ["x"],
                      "learning_rate": float("nan")})
    assert [(q["path"], q["value"]) for q in info.value.problems] == [("learning_rate", "NaN")]
