"""CLI contract tests: the real train_lora.py in a subprocess, every stdout line validated against
events_schema.json (see tests/conftest.py), exit codes as documented."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
from conftest import run_cli, write_config  # noqa: E402

from lora_trainer.contract.errors import EXIT_CODES  # noqa: E402


def _base(tmp_path: Path, dataset: Path, model: str = "missing/model", **extra) -> dict:
    return {"dataset_path": str(dataset), "base_model": model, "output_path": str(tmp_path / "out"),
            "trigger_words": ["ohwx"], **extra}


def _assert_config_error(res, *paths: str) -> dict:
    assert res.returncode == 2, res.stderr
    err = res.last("error")
    assert err["code"] == "config_invalid" and err["exit_code"] == 2
    assert "Traceback" not in res.stderr
    got = {p["path"] for p in err["details"]["problems"]}
    for p in paths:
        assert p in got, f"{p} not among reported problem paths {got}"
    for p in err["details"]["problems"]:
        assert p["message"] and "allowed" in p and "value" in p
    return err


def test_help_documents_flags_and_exit_codes():
    res = run_cli("--help")
    assert res.returncode == 0
    assert res.stdout == "", "help text goes to stderr: stdout carries events only"
    for flag in ("--config", "--validate-only", "--resume", "--debug", "--run-id", "--progress"):
        assert flag in res.stderr
    # The help's table must say what the README's does: the same exit codes, each with its error code. (Checking
    # the help against EXIT_CODES, the list it is printed from, could not fail.)
    helped = dict(re.findall(r"^ +(\d+)  (.+)$", res.stderr.split("exit codes:", 1)[1], re.M))
    documented = _readme_exit_codes()
    assert set(map(int, helped)) == set(documented), (sorted(helped), sorted(documented))
    names = {int(code): name for code, name, _ in EXIT_CODES}
    for code, name in documented.items():
        assert names[code] == (name or "ok"), f"exit {code}: README says {name!r}, the code {names[code]!r}"


def _readme_exit_codes() -> dict[int, str]:
    """exit code -> error `code` from the README's "Exit codes" table (130 / 143 share a row)."""
    section = (ROOT / "README.md").read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    out: dict[int, str] = {}
    for row in re.findall(r"^\| *([\d /]+?) *\| *([^|]*?) *\|", section, re.M):
        name = row[1].strip("`") if row[1].startswith("`") else ("interrupted" if "interrupted" in row[1] else "")
        for code in row[0].split("/"):
            out[int(code)] = name
    assert len(out) >= 10, out
    return out


def test_missing_config_flag_is_a_config_error():
    res = run_cli()
    err = _assert_config_error(res)
    assert "--config" in err["message"]


def test_config_file_not_found(tmp_path):
    res = run_cli("--config", str(tmp_path / "nope.json"))
    err = _assert_config_error(res, "--config")
    assert "not found" in err["message"]


def test_invalid_json_names_line_and_column(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"dataset_path": "x",\n  "base_model": }')
    err = _assert_config_error(run_cli("--config", str(p)), "--config")
    assert "line 2" in err["message"]


def test_not_utf8_and_not_an_object(tmp_path):
    p = tmp_path / "c.json"
    p.write_bytes(b'{"dataset_path": "\xff\xfe"}')
    _assert_config_error(run_cli("--config", str(p)), "--config")
    p.write_text("[1, 2, 3]")
    _assert_config_error(run_cli("--config", str(p)), "(root)")


def test_all_problems_reported_at_once_with_path_value_allowed(tmp_path, dataset):
    cfg = _base(tmp_path, dataset, learning_rat=0.1, lora_rank=0, mixed_precision="fp8",
                training_params={"batch_size": "four", "optimiser": "adamw"})
    del cfg["trigger_words"]
    err = _assert_config_error(run_cli("--config", str(write_config(tmp_path / "c.json", **cfg))),
                               "learning_rat", "lora_rank", "mixed_precision", "training_params.batch_size",
                               "training_params.optimiser", "trigger_words")
    problems = {p["path"]: p for p in err["details"]["problems"]}
    assert "did you mean 'learning_rate'" in problems["learning_rat"]["message"]
    assert "did you mean 'optimizer'" in problems["training_params.optimiser"]["message"]
    assert problems["lora_rank"]["value"] == 0 and ">= 1" in problems["lora_rank"]["allowed"]
    assert '"bf16"' in problems["mixed_precision"]["allowed"]


def test_flat_and_nested_conflict_is_an_error(tmp_path, dataset):
    cfg = _base(tmp_path, dataset, learning_rate=1e-4, training_params={"learning_rate": 2e-4})
    err = _assert_config_error(run_cli("--config", str(write_config(tmp_path / "c.json", **cfg))),
                               "training_params.learning_rate")
    assert "both" in err["details"]["problems"][0]["message"]


@pytest.mark.parametrize("extra,path", [
    ({"max_train_steps": 100, "checkpointing_steps": 500}, "checkpointing_steps"),
    ({"model_type": "sdxl", "resolution": 1000}, "resolution"),
    ({"resolution": 516}, "resolution"),
    ({"max_train_steps": 10, "num_epochs": 2}, "num_epochs"),
    ({"max_train_steps": 10, "lr_warmup_steps": 50}, "lr_warmup_steps"),
    ({"device": "cpu", "optimizer": "adamw8bit"}, "optimizer"),
    ({"flip_aug": True}, "flip_aug"),
    ({"output_name": "../escape"}, "output_name"),
    ({"trigger_words": [""]}, "trigger_words"),
    ({"resume": True}, "resume"),
    ({"training_params": {"dataset_path": "x"}}, "training_params.dataset_path"),
])
def test_cross_field_and_schema_rules(tmp_path, dataset, extra, path):
    cfg = {**_base(tmp_path, dataset), **extra}
    _assert_config_error(run_cli("--config", str(write_config(tmp_path / "c.json", **cfg))), path)


def test_output_inside_dataset_is_refused(tmp_path, dataset):
    cfg = _base(tmp_path, dataset)
    cfg["output_path"] = str(dataset / "out")
    _assert_config_error(run_cli("--config", str(write_config(tmp_path / "c.json", **cfg))), "output_path")


def test_validate_only_ok_flat_and_nested_equivalent(tmp_path, dataset, tiny_models):
    model = str(tiny_models["sd15"])
    flat = write_config(tmp_path / "flat.json", **_base(tmp_path, dataset, model, learning_rate=2e-4, lora_rank=8))
    nested = write_config(tmp_path / "nested.json", **_base(tmp_path, dataset, model,
                                                           training_params={"learning_rate": 2e-4, "lora_rank": 8}))
    results = [run_cli("--config", str(p), "--validate-only") for p in (flat, nested)]
    for res in results:
        assert res.returncode == 0, res.stderr
        v = res.last("validation")
        assert v["ok"] is True and v["errors"] == []
        assert v["summary"]["dataset"]["images"] == 4
        assert v["summary"]["model"]["family"] == "sd15"
    assert [e["type"] for e in results[0].events] == [e["type"] for e in results[1].events]


def test_validate_only_reports_missing_dataset_and_model(tmp_path):
    cfg = _base(tmp_path, tmp_path / "no_such_dataset", str(tmp_path / "no_model_dir"))
    res = run_cli("--config", str(write_config(tmp_path / "c.json", **cfg)), "--validate-only")
    assert res.returncode == 2
    v = res.last("validation")
    codes = {e["code"] for e in v["errors"]}
    assert "dataset_missing" in codes and "model_not_found" in codes
    assert res.last("error")["code"] == "config_invalid"
    assert "Traceback" not in res.stderr


def test_target_module_typo_found_before_training(tmp_path, dataset, tiny_models):
    cfg = _base(tmp_path, dataset, str(tiny_models["sd15"]), target_modules=["to_q", "to_kk"])
    path = write_config(tmp_path / "c.json", **cfg)
    for args in (("--validate-only",), ()):  # validate-only, and a training run, which stops at the same check
        res = run_cli("--config", str(path), *args)
        err = _assert_config_error(res, "target_modules")
        assert not res.of_type("run_started")
        assert [p["value"] for p in err["details"]["problems"]] == [["to_kk"]]


def test_pickle_checkpoint_refused(tmp_path, dataset):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    res = run_cli("--config", str(write_config(tmp_path / "c.json", **_base(tmp_path, dataset, str(ckpt)))),
                  "--validate-only")
    assert res.returncode == 2
    assert "model_pickle_refused" in {e["code"] for e in res.last("validation")["errors"]}


def test_example_config_is_valid_when_pointed_at_local_data(tmp_path, dataset, tiny_models):
    example = json.loads((ROOT / "example_config.json").read_text())
    example.update(dataset_path=str(dataset), output_path=str(tmp_path / "out"), base_model=str(tiny_models["sdxl"]))
    example["$schema"] = str(ROOT / "config_schema.json")
    res = run_cli("--config", str(write_config(tmp_path / "c.json", **example)), "--validate-only")
    assert res.returncode == 0, res.stderr
    assert res.last("validation")["summary"]["model"]["family"] == "sdxl"


def test_run_id_flag_and_debug_traceback(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("{")
    res = run_cli("--config", str(p), "--run-id", "job-42")
    assert res.events and all(e["run_id"] == "job-42" for e in res.events)
    dbg = run_cli("--config", str(p), "--debug")
    assert dbg.returncode == 2 and "Traceback" in dbg.stderr
