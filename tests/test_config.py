"""Config schema and loader: the schema is complete and valid, the dataclass mirrors it, and no input
makes the loader fail with anything but a ConfigError."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from lora_trainer.config.config import REQUIRED, TrainConfig, load_config, load_schema, optional_fields, parse_config
from lora_trainer.contract.errors import ConfigError

BASE = {"dataset_path": "data", "base_model": "org/model", "output_path": "out", "trigger_words": ["ohwx"]}


def test_schemas_are_valid_draft7():
    for name in ("config_schema.json", "events_schema.json"):
        jsonschema.Draft7Validator.check_schema(json.loads((ROOT / name).read_text()))


def test_every_optional_field_is_documented_with_default_and_example():
    for key, spec in optional_fields().items():
        assert "default" in spec and spec.get("description"), key
        assert spec.get("examples"), key
        types = spec.get("type", [])
        types = types if isinstance(types, list) else [types]
        if "integer" in types or "number" in types:
            assert ("minimum" in spec or "exclusiveMinimum" in spec) and "maximum" in spec, key
        # every default must itself be valid
        assert not list(jsonschema.Draft7Validator(spec).iter_errors(spec["default"])), key


def test_dataclass_mirrors_schema():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    schema_keys = set(REQUIRED) | set(optional_fields())
    assert schema_keys == set(fields) - {"explicit_keys", "config_path"}
    top = load_schema()["properties"]
    assert set(top) == schema_keys | {"$schema", "training_params"}, "every parameter is accepted flat too"
    for key, spec in optional_fields().items():
        default = fields[key].default
        expected = tuple(spec["default"]) if isinstance(spec["default"], list) else spec["default"]
        assert default == expected, f"{key}: dataclass {default!r} != schema {expected!r}"


def test_defaults_and_normalisation(tmp_path):
    cfg, warnings = parse_config({**BASE, "trigger_words": " ohwx "}, base_dir=tmp_path)
    assert cfg.trigger_words == ("ohwx",) and warnings == []
    assert cfg.max_train_steps == 1000 and cfg.alpha == cfg.lora_rank == 16
    assert cfg.dataset_path == tmp_path / "data"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora_rank = 4  # type: ignore[misc]


def test_same_value_flat_and_nested_is_fine(tmp_path):
    cfg, _ = parse_config({**BASE, "lora_rank": 8, "training_params": {"lora_rank": 8, "seed": 1}}, base_dir=tmp_path)
    assert (cfg.lora_rank, cfg.seed) == (8, 1) and cfg.explicit_keys == {"lora_rank", "seed"}


def test_warnings_for_unused_settings(tmp_path):
    _, warnings = parse_config({**BASE, "text_encoder_lr": 1e-5, "validation_prompts": ["x"]}, base_dir=tmp_path)
    assert {w["path"] for w in warnings} == {"text_encoder_lr", "validation_prompts"}


def test_secrets_redacted_in_to_dict(tmp_path):
    token = "hf_" + "aB3" * 10  # the shape of a Hugging Face token, pasted where it does not belong
    cfg, _ = parse_config({**BASE, "keep_tokens": 3, "max_sequence_length": 128, "validation_prompts": ["ohwx", token],
                           "base_model_config": "https://user:s3cret@example.com/configs"}, base_dir=tmp_path)
    d = cfg.to_dict()
    json.dumps(d)
    assert d["validation_prompts"] == ["ohwx", "<redacted>"]
    assert d["base_model_config"] == "<redacted>"
    assert token not in json.dumps(d) and "s3cret" not in json.dumps(d)
    # Counts and other settings whose names contain "token" are not secrets.
    assert d["keep_tokens"] == 3 and d["max_sequence_length"] == 128 and d["trigger_words"] == ["ohwx"]
    # With ordinary values, no setting at all is redacted.
    plain = parse_config(BASE, base_dir=tmp_path)[0].to_dict()
    assert "<redacted>" not in json.dumps(plain)
    assert set(plain) == set(REQUIRED) | set(optional_fields())


@pytest.mark.parametrize("name,secret", [
    ("hf_token", True), ("HF_TOKEN", True), ("wandb_api_key", True), ("password", True), ("hub_token", True),
    ("db_password", True), ("client_secret", True), ("api_key", True),
    ("keep_tokens", False), ("max_sequence_length", False), ("tokenizer", False), ("secretary", False),
    ("token_count", False), ("trigger_words", False)])
def test_secret_key_names(name, secret):
    from lora_trainer.config.config import is_secret_key, redact

    assert is_secret_key(name) is secret
    assert (redact(name, 5) == "<redacted>") is secret


def test_load_config_importing_no_torch(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(BASE))
    code = ("import sys; from lora_trainer.config.config import load_config; load_config(sys.argv[1]); "
            "import lora_trainer.preflight.run; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(p)], check=True, cwd=ROOT)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
known_keys = st.sampled_from(sorted(set(REQUIRED) | set(optional_fields()) | {"training_params", "$schema"}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, st.dictionaries(known_keys, json_values, max_size=8),
                 st.fixed_dictionaries({}, optional={k: json_values for k in list(optional_fields())[:20]})
                 .map(lambda d: {**BASE, **d})))
def test_fuzz_parse_config_only_raises_config_error(raw):
    try:
        cfg, _ = parse_config(raw)
    except ConfigError as exc:
        assert exc.problems and all({"path", "value", "message", "allowed"} <= set(p) for p in exc.problems)
        json.dumps(exc.problems, default=str)
    else:
        assert isinstance(cfg, TrainConfig)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_load_config_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("fuzz") / "c.json"
    p.write_bytes(data)
    try:
        load_config(p)
    except ConfigError:
        pass


def test_deeply_nested_json_is_a_config_error(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ConfigError):
        load_config(p)
