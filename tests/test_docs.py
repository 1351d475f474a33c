"""The docs stay in step with the code: every config key is documented in the README, and every warning code the
package can emit is listed in events_schema.json, which is what an integrator reads."""
from __future__ import annotations

import json
import re

from conftest import ROOT


def test_every_config_key_is_in_the_readme():
    schema = json.loads((ROOT / "config_schema.json").read_text())
    keys = set(schema["definitions"]["training_params"]["properties"]) | set(schema["required"])
    readme = (ROOT / "README.md").read_text()
    missing = sorted(k for k in keys if f"`{k}`" not in readme)
    assert not missing, f"config keys without a word in README.md: {missing}"


def test_every_warning_code_is_documented():
    emitted = set()
    for path in (ROOT / "lora_trainer").rglob("*.py"):
        text = path.read_text()
        # ev.emit("warning", code="x", ...) and preflight/config issues: _issue("x", ...), {"code": "x", ...}
        emitted |= set(re.findall(r'emit\(\s*"warning",\s*code="([a-z0-9_]+)"', text))
        emitted |= set(re.findall(r'warnings\.append\(\s*\{\s*"code":\s*"([a-z0-9_]+)"', text))
        emitted |= set(re.findall(r'warnings\.append\(\s*_issue\(\s*"([a-z0-9_]+)"', text))
    assert {"no_gpu", "dora_loaders", "unused_setting"} <= emitted  # the patterns still find them
    schema = json.loads((ROOT / "events_schema.json").read_text())
    documented = schema["definitions"]["warning"]["properties"]["code"]["description"]
    missing = sorted(c for c in emitted if c not in documented)
    assert not missing, f"warning codes missing from events_schema.json's warning.code description: {missing}"
