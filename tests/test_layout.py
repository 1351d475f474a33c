"""The package's layout rules (issue 20): a family is a folder behind one registry, the rest is grouped by role.

These read the source (ast / tokenize) or import modules in a fresh interpreter; none trains anything.
"""
from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lora_trainer"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _family_names() -> tuple[str, ...]:
    from lora_trainer.families import FAMILIES

    return FAMILIES


# ----------------------------------------------------------------------------------------------- torch-free
def _torch_free_modules() -> list[str]:
    """What preflight (--validate-only in about a second) and the CLI's config step may import: the family specs
    and signatures, the registry, and everything under preflight/, config/ and contract/."""
    keep = []
    for name in MODULES:
        parts = name.split(".")
        if parts[1:2] in (["preflight"], ["config"], ["contract"]) or name == "lora_trainer.families" \
                or parts[-1] in ("spec", "signature") and parts[1] == "families":
            keep.append(name)
    return keep


def test_specs_signatures_preflight_config_and_contract_import_no_torch():
    names = _torch_free_modules()
    assert {"lora_trainer.families", "lora_trainer.families.spec", "lora_trainer.families.sd15.spec",
            "lora_trainer.preflight.run", "lora_trainer.config.config", "lora_trainer.contract.events"} <= set(names)
    assert len([n for n in names if n.endswith(".signature")]) > len(_family_names())
    # One fresh interpreter imports them one by one and names the first that brings torch (or diffusers) in.
    code = ("import importlib, json, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "    heavy = sorted({'torch', 'diffusers', 'transformers', 'peft'} & set(sys.modules))\n"
            "    if heavy:\n"
            "        print(json.dumps([name, heavy])); break\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"imports torch (module, heavy modules loaded): {proc.stdout.strip()}"


# ------------------------------------------------------------------------------------------- import graph
def _imports(name: str, path: Path) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its file (module level or inside functions;
    ``if TYPE_CHECKING`` blocks excluded: they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = base[: len(base) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("lora_trainer"):
                target = node.module.split(".")
            else:
                continue
            mod = ".".join(target)
            for alias in node.names:  # `from . import x` may name a module
                sub = f"{mod}.{alias.name}"
                out.add(sub if sub in MODULES else mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("lora_trainer"))
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(GRAPH):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle() is None, " -> ".join(_cycle())


def test_the_import_graph_sees_lazy_imports():
    """Control: the graph includes imports made inside functions (the trainer imports loading lazily)."""
    assert "lora_trainer.runtime.loading" in GRAPH["lora_trainer.training.trainer"]
    assert "lora_trainer.families.adapter" in GRAPH["lora_trainer.families._unet.adapter"]


@pytest.mark.parametrize("lower,upper", [("adapters", "training"), ("adapters", "distributed"),
                                         ("families", "training"), ("objectives", "families"),
                                         ("preflight", "training"),
                                         ("data", "training"), ("outputs", "training.trainer"),
                                         ("runtime", "training.trainer"), ("distributed", "training")])
def test_lower_layers_never_import_upper_ones(lower, upper):
    bad = sorted(f"{n} -> {m}" for n, deps in GRAPH.items() if n.startswith(f"lora_trainer.{lower}.")
                 for m in deps if m == f"lora_trainer.{upper}" or m.startswith(f"lora_trainer.{upper}."))
    assert not bad, bad


def test_no_module_over_the_size_limit():
    long = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in MODULES.items()}
    assert not {n: k for n, k in long.items() if k > MAX_LINES}


# ---------------------------------------------------------------------------------- family names in code
# Family-specific key names of the checkpoints (single-file layouts, LoRA layouts): they belong to the family folders.
KEY_LITERALS = ("double_blocks", "single_blocks", "joint_blocks", "x_block", "context_block", "conditioner.embedders",
                "cond_stage_model", "vector_in", "guidance_in", "input_blocks", "output_blocks", "middle_block",
                "single_transformer_blocks")
# Lines outside families/ and testing/ that still name a family, as (file, text of the line): messages whose prose
# names a model file. This list may only shrink: a new entry means family knowledge outside its folder.
ALLOWED: set[tuple[str, str]] = {
    # A single-file hint naming the releases users should train from (prose).
    ("lora_trainer/runtime/single_file.py",
     'hint="train from a bf16/fp16 (or plain fp8) release of the model, e.g. the original flux1-dev.safetensors "'),
    ("lora_trainer/runtime/single_file.py", '"or sd3.5_large.safetensors, or a diffusers folder")'),
    # A file holding one diffusers transformer on its own (not a model) is refused by its diffusers key names.
    ("lora_trainer/preflight/probe/single_file.py",
     'if has("transformer_blocks.") and (has("single_transformer_blocks.") or has("context_embedder.") or has("x_embedder.")):'),
}


def _hits(path: Path, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """(file, stripped line) for identifiers and string literals naming a family or a family key literal; comments
    and docstrings are prose and not counted."""
    word = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, names)) + r")(?![A-Za-z0-9])")
    keys = re.compile("|".join(map(re.escape, KEY_LITERALS)))
    src = path.read_text(encoding="utf-8")
    lines = src.splitlines()
    where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    doc_lines = set()
    for n in ast.walk(ast.parse(src)):
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str):
            doc_lines.update(range(n.lineno, n.end_lineno + 1))
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in (tokenize.NAME, tokenize.STRING) or tok.start[0] in doc_lines:
            continue
        text = tok.string
        if word.search(text) or (tok.type == tokenize.STRING and keys.search(text)):
            out.append((where, lines[tok.start[0] - 1].strip()))
    return out


def _family_name_hits() -> set[tuple[str, str]]:
    names = _family_names()
    hits = set()
    for name, path in MODULES.items():
        parts = name.split(".")
        if parts[1:2] in (["families"], ["testing"]) or name == "lora_trainer.tiny":
            continue
        hits.update(_hits(path, names))
    return hits


def test_no_family_names_outside_the_family_folders():
    hits = _family_name_hits()
    new = sorted(hits - ALLOWED)
    assert not new, "family knowledge outside lora_trainer/families/ (move it into the family's folder or spec):\n" \
        + "\n".join(f"{f}: {line}" for f, line in new)
    gone = sorted(ALLOWED - hits)
    assert not gone, "allowed lines no longer present: remove them from ALLOWED (the list only shrinks):\n" \
        + "\n".join(f"{f}: {line}" for f, line in gone)


def test_the_family_name_scan_finds_what_it_should(tmp_path):
    """Control: a branch on a family name and a key literal are found; the same words in a comment or a
    docstring are not."""
    bad = tmp_path / "bad.py"
    bad.write_text('"""sd3 in a docstring is prose."""\n# flux1 in a comment too\n'
                   'def f(family):\n    if family == "sdxl":\n        return "joint_blocks.0"\n    return sd15_rule\n')
    hits = [line for _, line in _hits(bad, _family_names())]
    assert hits == ['if family == "sdxl":', 'return "joint_blocks.0"', "return sd15_rule"], hits


# ------------------------------------------------------------------------------------ registry and schema
def _schema_enum(schema: dict) -> list[str]:
    return schema["definitions"]["training_params"]["properties"]["model_type"]["enum"]


def test_schema_model_type_enum_is_the_registry():
    from lora_trainer.config.config import load_schema

    want = ["auto", *_family_names()]
    root = json.loads((ROOT / "config_schema.json").read_text())
    packaged = json.loads((PKG / "config_schema.json").read_text())
    assert _schema_enum(root) == want
    assert _schema_enum(packaged) == want
    assert _schema_enum(load_schema()) == want


def test_every_family_folder_is_registered_and_complete():
    from lora_trainer.families import FAMILIES, SPECS, get_signature

    folders = sorted(p.name for p in (PKG / "families").iterdir()
                     if p.is_dir() and not p.name.startswith(("_", ".")) and p.name != "__pycache__")
    assert folders == sorted(FAMILIES)
    for name in FAMILIES:
        for part in ("spec.py", "signature.py", "adapter.py", "tiny.py"):
            assert (PKG / "families" / name / part).is_file(), f"families/{name}/{part} is missing"
        assert SPECS[name].name == name
        assert get_signature(name) is not None


def test_spec_fields_are_required():
    import dataclasses

    from lora_trainer.families.spec import FamilySpec

    optional = [f.name for f in dataclasses.fields(FamilySpec)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert optional == [], f"a missing fact must fail at import, not default: {optional}"
