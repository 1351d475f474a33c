"""The config schema and what is read from it alone: where config_schema.json is, the required and optional keys,
problems as {path, value, message, allowed} with did-you-mean and a summary of what the schema allows, and which
keys and values are secrets (redacted wherever settings are written out). Torch-free, like the rest of config/.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any


def _find_schema(name: str) -> Path:
    """The package's copy (installed wheels; a symlink to the top-level file in a checkout), else the repo root."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / name, here.parent.parent / name):
        if candidate.is_file():
            return candidate
    return here.parent / name


SCHEMA_PATH = _find_schema("config_schema.json")
REQUIRED = ("dataset_path", "base_model", "output_path", "trigger_words")
NESTED_KEY = "training_params"
# Secrets are named exactly (hf_token, wandb_api_key, password, ...) or end in a secret suffix: a substring match
# ("token" in the name) also hid counts such as keep_tokens in run_started, the manifest and the report.
SECRET_KEYS = frozenset({"token", "hf_token", "hub_token", "api_key", "apikey", "wandb_api_key", "password",
                         "secret", "access_token", "auth_token"})
SECRET_SUFFIXES = ("_token", "_api_key", "_apikey", "_password", "_secret")
# Values that are credentials whatever key holds them: Hugging Face tokens (hf_...), OpenAI-style keys (sk-...),
# W&B keys (40 hex digits), and URLs with a password in them (https://user:pass@host).
SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|[0-9a-f]{40})$")
_URL_CREDENTIALS = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s:]+:[^/@\s]+@", re.IGNORECASE)
REDACTED = "<redacted>"


def is_secret_key(name: str) -> bool:
    key = name.lower()
    return key in SECRET_KEYS or key.endswith(SECRET_SUFFIXES)


def redact(name: str, value: Any) -> Any:
    """value, or REDACTED where the key names a secret or the value (or a list item) looks like a credential."""
    if is_secret_key(name):
        return REDACTED
    if isinstance(value, str):
        return REDACTED if SECRET_VALUE.match(value.strip()) or _URL_CREDENTIALS.match(value.strip()) else value
    if isinstance(value, list):
        return [redact("", v) for v in value]
    return value


_schema_cache: dict | None = None


def load_schema() -> dict:
    global _schema_cache
    if _schema_cache is None:
        with open(SCHEMA_PATH, encoding="utf-8") as fh:
            _schema_cache = json.load(fh)
    return _schema_cache


def optional_fields() -> dict[str, dict]:
    return load_schema()["definitions"][NESTED_KEY]["properties"]


def problem(path: str, value: Any, message: str, allowed: str | None = None) -> dict:
    try:
        if len(json.dumps(value, default=str)) > 300:  # echo a huge value back, but not all of it
            value = json.dumps(value, default=str)[:300] + "..."
    except (ValueError, RecursionError):
        value = repr(value)[:300]
    return {"path": path or "(root)", "value": value, "message": message, "allowed": allowed}


def _describe_allowed(node: dict) -> str | None:
    """Human summary of what a schema node accepts, for the 'allowed' field of a problem."""
    if "enum" in node:
        return "one of " + ", ".join(json.dumps(v) for v in node["enum"])
    parts: list[str] = []
    t = node.get("type")
    if t:
        parts.append(" or ".join(t) if isinstance(t, list) else t)
    if "minimum" in node:
        parts.append(f">= {node['minimum']}")
    if "exclusiveMinimum" in node:
        parts.append(f"> {node['exclusiveMinimum']}")
    if "maximum" in node:
        parts.append(f"<= {node['maximum']}")
    if "pattern" in node:
        parts.append(f"matching /{node['pattern']}/")
    if "minItems" in node:
        parts.append(f"at least {node['minItems']} item(s)")
    if "const" in node:
        return json.dumps(node["const"])
    if "oneOf" in node:
        return " | ".join(filter(None, (_describe_allowed(b) for b in node["oneOf"])))
    if node.get("type") == "string" and node.get("minLength"):
        parts.append("non-empty")
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        parts[0] = f"array of {_describe_allowed(node['items'])}"
    return ", ".join(parts) or node.get("description")


def _resolve_node(schema: dict, path: list) -> dict:
    """Follow a JSON path through the schema (resolving local $refs) to the node describing it."""
    node = schema
    for part in path:
        while "$ref" in node:
            node = _follow_ref(schema, node["$ref"])
        if isinstance(part, int):
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part, {})
    while "$ref" in node:
        node = _follow_ref(schema, node["$ref"])
    return node


def _follow_ref(schema: dict, ref: str) -> dict:
    node: Any = schema
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _json_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class NonFinite(str):
    """A number JSON cannot hold, kept as the literal the file spells it with (NaN, Infinity, -Infinity, or a
    literal such as 1e999 that overflows to infinity). Python's json module accepts them; JSON and every other
    reader of the config do not, and no schema range rejects them (NaN compares false with every bound)."""


def json_number(text: str) -> float | NonFinite:
    """json.loads' parse_float (and, for the named constants, parse_constant): a finite float, else NonFinite."""
    value = float(text)
    return value if math.isfinite(value) else NonFinite(text)


def mark_non_finite(value: Any) -> Any:
    """value with every non-finite float (a Python caller's float('nan')) replaced by its NonFinite literal."""
    if isinstance(value, float) and not math.isfinite(value):
        return NonFinite("NaN" if value != value else ("Infinity" if value > 0 else "-Infinity"))
    if isinstance(value, dict):
        return {k: mark_non_finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mark_non_finite(v) for v in value]
    return value


def non_finite_problems(raw: Any, path: tuple = ()) -> list[dict]:
    """One problem per NonFinite in a marked document, named by its JSON path."""
    if isinstance(raw, NonFinite):
        return [problem(_json_path(path), str(raw), f"{raw} is not a finite number (JSON has no NaN or Infinity)",
                        _describe_allowed(_resolve_node(load_schema(), list(path))) or "a finite number")]
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    return [p for key, value in items for p in non_finite_problems(value, path + (key,))]


def check_keys(raw: dict, problems: list[dict]) -> dict[str, Any]:
    """Unknown keys and flat/nested conflicts; returns the merged optional parameters."""
    opt = optional_fields()
    top_known = list(REQUIRED) + ["$schema", NESTED_KEY] + list(opt)
    for key in raw:
        if key not in top_known:
            problems.append(problem(key, raw[key], f"unknown key '{key}'{_did_you_mean(key, top_known)}",
                                    "a key defined in config_schema.json"))
    merged = {k: v for k, v in raw.items() if k in opt}
    nested = raw.get(NESTED_KEY, {})
    if not isinstance(nested, dict):
        return merged  # the schema reports the wrong type
    for key, value in nested.items():
        path = f"{NESTED_KEY}.{key}"
        if key in REQUIRED:
            problems.append(problem(path, value, f"'{key}' must be at the top level, not under {NESTED_KEY}",
                                    "move it to the top level"))
        elif key not in opt:
            problems.append(problem(path, value, f"unknown key '{key}'{_did_you_mean(key, list(opt))}",
                                    "a key defined in config_schema.json"))
        elif key in raw and raw[key] != value:
            problems.append(problem(path, value, f"'{key}' is given both at the top level ({json.dumps(raw[key])}) "
                                    f"and under {NESTED_KEY} ({json.dumps(value)}) with different values",
                                    "give it once, or the same value in both places"))
        else:
            merged[key] = value
    return merged


def schema_problems(raw: dict) -> list[dict]:
    import jsonschema  # imported lazily: ~50 ms that --help does not need

    schema = load_schema()
    validator = jsonschema.Draft7Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(raw), key=lambda e: list(map(str, e.absolute_path))):
        if err.validator == "additionalProperties":
            continue  # reported by check_keys, with a did-you-mean suggestion
        path = list(err.absolute_path)
        node = _resolve_node(schema, path)
        message = err.message
        if err.validator == "required":
            missing = err.message.split("'")[1] if "'" in err.message else ""
            path = path + [missing]
            problems.append(problem(_json_path(path), None, f"'{missing}' is required",
                                    _describe_allowed(_resolve_node(schema, path))))
            continue
        elif err.validator == "oneOf":
            message = f"{json.dumps(err.instance)[:200]} is not valid here"
        problems.append(problem(_json_path(path), err.instance if path else None, message,
                                _describe_allowed(node) if path else None))
    return problems
