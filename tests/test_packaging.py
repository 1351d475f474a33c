"""Packaging: pyproject.toml mirrors requirements.txt; a wheel built from the tree carries the schemas and the
`train-lora` console script and works when installed away from the checkout; the Dockerfile and .dockerignore
are checked statically (no Docker engine needed)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, parse_events

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

SCHEMAS = ("config_schema.json", "events_schema.json")


# ----------------------------------------------------------------------------------------------- pyproject
def _requirement_lines(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(re.sub(r"\s+", "", line))
    return out


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_mirrors_requirements_and_declares_extras_and_script():
    data = _pyproject()
    project = data["project"]
    deps = [re.sub(r"\s+", "", d) for d in project["dependencies"]]
    assert sorted(deps) == sorted(_requirement_lines(ROOT / "requirements.txt")), "keep pyproject and requirements.txt in step"
    assert "torch>=2.4" in deps
    extras = project["optional-dependencies"]
    assert extras["8bit"] == ["bitsandbytes"]
    assert extras["prodigy"] == ["prodigyopt"]
    assert extras["tensorboard"] == ["tensorboard>=2.14,<2.22"]
    assert extras["wandb"] == ["wandb>=0.19,<0.32"]
    assert sorted(extras["dev"]) == sorted(_requirement_lines(ROOT / "requirements-dev.txt"))
    assert project["scripts"] == {"train-lora": "lora_trainer.cli:main"}
    assert set(SCHEMAS) <= set(data["tool"]["setuptools"]["package-data"]["lora_trainer"])
    assert data["build-system"]["build-backend"] == "setuptools.build_meta"


def test_package_schema_copies_are_the_top_level_files():
    from lora_trainer.config import config

    pkg = ROOT / "lora_trainer"
    for name in SCHEMAS:
        assert (pkg / name).read_bytes() == (ROOT / name).read_bytes(), name
    assert Path(config.SCHEMA_PATH).parent == pkg  # the package copy wins; the repo root is only the fallback
    assert config.load_schema() == json.loads((ROOT / "config_schema.json").read_text())


def test_schema_falls_back_to_the_repository_root(tmp_path):
    """A checkout whose lora_trainer/ lacks the schema copies (e.g. symlinks not checked out) still finds it."""
    shutil.copytree(ROOT / "lora_trainer", tmp_path / "lora_trainer",
                    ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    shutil.copy2(ROOT / "config_schema.json", tmp_path / "config_schema.json")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import lora_trainer.config.config as c; c.load_schema(); print(c.SCHEMA_PATH)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()) == tmp_path / "config_schema.json"


# ------------------------------------------------------------------------------------ wheel + console script
def _copy_source_tree(dest: Path) -> Path:
    """The files a build needs, in a scratch folder: building in the checkout would leave build/ and *.egg-info."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", *SCHEMAS):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "lora_trainer", dest / "lora_trainer", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _build_wheel(src: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(out), "-q"]
    try:  # the venv's setuptools builds offline; without a recent one pip fetches it from PyPI (build isolation)
        version = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
        if version >= (70, 1):
            cmd.append("--no-build-isolation")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pass
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_carries_schemas_and_console_script_and_runs_outside_the_checkout(tmp_path):
    wheel = _build_wheel(_copy_source_tree(tmp_path / "src"), tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for name in SCHEMAS:  # real files with the schema's content, not links
            assert zf.read(f"lora_trainer/{name}") == (ROOT / name).read_bytes(), name
        assert "lora_trainer/cli.py" in names and "lora_trainer/families/sdxl/adapter.py" in names
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert re.search(r"^\[console_scripts\]\s*\ntrain-lora\s*=\s*lora_trainer\.cli:main\s*$", entry_points, re.M), entry_points
    assert "Requires-Dist: diffusers==0.42.1" in metadata and "Requires-Dist: torch>=2.4" in metadata
    assert 'Provides-Extra: 8bit' in metadata

    # A fresh venv that sees the test venv's packages (torch, jsonschema, ...) but not the checkout.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    vpy = venv / "bin" / "python"
    purelib = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # --system-site-packages exposes the base interpreter's site-packages; the test venv's come in through a .pth.
    Path(purelib, "_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index",
                           "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    script = venv / "bin" / "train-lora"
    assert script.is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

    where = subprocess.run([str(vpy), "-c", "import lora_trainer, lora_trainer.config.config as c; "
                            "print(lora_trainer.__file__); print(c.SCHEMA_PATH)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.splitlines():  # the installed package and its own schema copy, not the checkout's
        assert Path(line).resolve().is_relative_to(venv.resolve()), where.stdout

    helped = subprocess.run([str(script), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--config" in helped.stderr and "exit codes" in helped.stderr
    assert helped.stdout == "", "stdout is reserved for events"

    broken = elsewhere / "broken.json"
    broken.write_text(json.dumps({"dataset_path": "data", "base_model": "m", "output_path": "out",
                                  "trigger_words": ["ohwx"], "learning_rat": 1e-4}))
    res = subprocess.run([str(script), "--config", str(broken)], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res.stderr[-3000:]
    events = parse_events(res.stdout)  # schema-valid events, seq 1, 2, ...
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "config_invalid" and error["exit_code"] == 2
    # The suggestion comes from config_schema.json's key list: the installed package found its schema.
    assert any("learning_rate" in p["message"] for p in error["details"]["problems"]), error


# ------------------------------------------------------------------------------------ Dockerfile (static)
KNOWN_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                      "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse_dockerfile(text: str) -> list[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments) with `\\` continuations joined and comment lines inside them dropped."""
    lines = text.splitlines()
    for line in lines:
        m = re.match(r"#\s*escape\s*=\s*(\S)", line)
        assert not m or m.group(1) == "\\", "only the default escape character is supported here"
        if not line.startswith("#"):
            break
    out: list[tuple[int, str, str]] = []
    buf: str | None = None
    start = 0
    for n, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if buf is None:
            if not stripped or stripped.startswith("#"):
                continue
            buf, start = "", n
        elif not stripped or stripped.startswith("#"):
            continue  # Docker drops comment (and blank) lines inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, args = buf.partition(" ")
        instruction = word.upper()
        assert instruction in KNOWN_INSTRUCTIONS, f"Dockerfile line {start}: unknown instruction {word!r}"
        assert args.strip(), f"Dockerfile line {start}: {instruction} without arguments"
        assert "<<" not in args or instruction not in ("RUN", "COPY", "ADD"), f"line {start}: heredocs are not parsed here"
        out.append((start, instruction, args.strip()))
        buf = None
    assert buf is None, "the Dockerfile ends inside a line continuation"
    return out


def _exec_form(args: str) -> list[str] | None:
    if not args.startswith("["):
        return None
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def _key_values(args: str) -> dict[str, str]:
    """ENV / ARG / LABEL arguments: `K=V K2="V 2"` or the legacy `K V`."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) if "=" in t else (t, "") for t in tokens)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[int, str, str]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


# .dockerignore with Docker's rules (moby/patternmatcher): Go filepath.Match plus `**`, `!` re-includes, the last
# matching line wins, and a path is excluded when it or any parent folder matches.
def _ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = posixpath.normpath(line[1:].strip() if negate else line).lstrip("/")
        patterns.append((negate, re.compile(_glob_to_regex(pat))))
    return patterns


def _glob_to_regex(pat: str) -> str:
    out, i = "", 0
    while i < len(pat):
        c = pat[i]
        if pat.startswith("**", i):
            if pat.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            else:
                out, i = out + ".*", i + 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pat.find("]", i + 1)
            assert end > 0, pat
            body = pat[i + 1:end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end
        elif c == "\\" and i + 1 < len(pat):
            i += 1
            out += re.escape(pat[i])
        else:
            out += re.escape(c)
        i += 1
    return "^" + out + "$"


def dockerignored(rel: str, patterns=None) -> bool:
    patterns = _ignore_patterns() if patterns is None else patterns
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for negate, rx in patterns:
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_matcher_follows_docker_rules():
    pats = [(False, re.compile(_glob_to_regex(p))) for p in ("**/__pycache__", "*.egg-info", "docs")]
    pats.append((True, re.compile(_glob_to_regex("docs/keep.md"))))
    assert dockerignored("a/b/__pycache__/x.pyc", pats) and dockerignored("__pycache__/x.pyc", pats)
    assert dockerignored("train_lora.egg-info/PKG-INFO", pats) and not dockerignored("x/y.egg-info/PKG-INFO", pats)
    assert dockerignored("docs/other.md", pats) and not dockerignored("docs/keep.md", pats)
    assert not dockerignored("lora_trainer/cli.py", pats)


def test_dockerignore_keeps_local_state_out_of_the_context():
    for path in (".git/HEAD", ".venv/bin/python", "demo_output/out/lora.safetensors", ".pytest_cache/v/x",
                 ".hypothesis/examples/x", "lora_trainer/__pycache__/cli.cpython-312.pyc", "outputs/run/lora.safetensors",
                 "build/lib/x.py", "train_lora.egg-info/PKG-INFO", "tests/test_config.py"):
        assert dockerignored(path), path


def test_dockerfile_parses_with_known_instructions_on_a_cuda_runtime_base(dockerfile):
    instructions = [ins for _, ins, _ in dockerfile]
    first = next(i for i, ins in enumerate(instructions) if ins != "ARG")
    assert instructions[first] == "FROM", "the first instruction after ARGs must be FROM"
    # Global ARGs (those before the first FROM) are what a FROM line may use: the default base is what counts.
    global_args = _key_values(" ".join(a for _, ins, a in dockerfile[:first] if ins == "ARG")) if first else {}
    froms = [_expand(args, global_args) for _, ins, args in dockerfile if ins == "FROM"]
    image = froms[-1].split()[0]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", image), image
    assert instructions.count("ENTRYPOINT") == 1


def _copies(dockerfile) -> list[tuple[int, list[str], str]]:
    """(line, sources, absolute destination) of every COPY/ADD from the build context."""
    out, workdir = [], "/"
    variables: dict[str, str] = {}
    for line, ins, args in dockerfile:
        if ins in ("ARG", "ENV"):
            variables.update(_key_values(args))
        elif ins == "WORKDIR":
            workdir = posixpath.join(workdir, _expand(args, variables))
        elif ins in ("COPY", "ADD"):
            tokens = _exec_form(args) or shlex.split(args)
            flags = [t for t in tokens if t.startswith("--")]
            paths = [_expand(t, variables) for t in tokens if not t.startswith("--")]
            if any(f.startswith("--from") for f in flags):
                continue  # from another stage or image, not the context
            assert len(paths) >= 2, f"line {line}: {ins} needs a source and a destination"
            dest = paths[-1] if paths[-1].startswith("/") else posixpath.join(workdir, paths[-1])
            if len(paths) > 2:
                assert paths[-1].endswith("/"), f"line {line}: several sources need a destination ending in /"
            out.append((line, paths[:-1], dest))
    return out


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored(dockerfile):
    patterns = _ignore_patterns()
    copied: dict[str, Path] = {}  # container path -> repo path
    for line, sources, dest in _copies(dockerfile):
        for src in sources:
            matches = sorted(ROOT.glob(src)) if any(c in src for c in "*?[") else [ROOT / src]
            assert matches and all(m.exists() or m.is_symlink() for m in matches), f"line {line}: {src} not in the repo"
            for m in matches:
                rel = m.relative_to(ROOT).as_posix()
                assert not dockerignored(rel, patterns), f"line {line}: {rel} is excluded by .dockerignore"
                if m.is_dir() and not m.is_symlink():
                    for f in m.rglob("*"):
                        frel = f.relative_to(ROOT).as_posix()
                        if (f.is_file() or f.is_symlink()) and not dockerignored(frel, patterns):
                            copied[posixpath.join(dest, f.relative_to(m).as_posix())] = f
                    for f in m.rglob("*.py"):
                        assert not dockerignored(f.relative_to(ROOT).as_posix(), patterns), f
                else:
                    target = posixpath.join(dest, m.name) if dest.endswith("/") else dest
                    copied[target] = m
    # Symlinks are copied as links: their targets must land in the image at the matching place.
    for container_path, repo_path in copied.items():
        if repo_path.is_symlink():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(container_path), os.readlink(repo_path)))
            assert target in copied, f"{repo_path.relative_to(ROOT)} links to {target}, which the image lacks"
    for needed in ("requirements.txt", "pyproject.toml", "lora_trainer/cli.py", *SCHEMAS,
                   *(f"lora_trainer/{s}" for s in SCHEMAS)):
        assert ROOT / needed in copied.values(), f"{needed} is not copied into the image"


def _shell_commands(script: str) -> list[list[str]]:
    """A RUN line split into simple commands at &&, ||, ;, | (quotes respected)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _pip_installs(dockerfile) -> list[tuple[int, list[str]]]:
    """(instruction index, argv after `pip install`) for every pip install in a RUN, ARGs/ENVs expanded."""
    variables: dict[str, str] = {}
    out = []
    for idx, (_, ins, args) in enumerate(dockerfile):
        if ins in ("ARG", "ENV"):
            variables.update(_key_values(args))
        elif ins == "RUN":
            for tokens in _shell_commands(_expand(args, variables)):
                for k in range(len(tokens) - 1):
                    if re.fullmatch(r"(\S*/)?pip3?|(\S*/)?python3?", tokens[k]):
                        rest = tokens[k + 1:]
                        if rest[:2] == ["-m", "pip"]:
                            rest = rest[2:]
                        if rest and rest[0] == "install" and (tokens[k].endswith(("pip", "pip3")) or tokens[k + 1] == "-m"):
                            out.append((idx, rest[1:]))
                            break
    return out


def _option(argv: list[str], *names: str) -> str | None:
    for i, tok in enumerate(argv):
        for name in names:
            if tok == name and i + 1 < len(argv):
                return argv[i + 1]
            if tok.startswith(name + "="):
                return tok.split("=", 1)[1]
    return None


def test_dockerfile_installs_cuda_torch_first_then_requirements_then_the_project(dockerfile):
    installs = _pip_installs(dockerfile)
    torch_idx = req_idx = project_idx = None
    for idx, argv in installs:
        packages = [t for t in argv if not t.startswith("-")]
        if torch_idx is None and any(re.fullmatch(r"torch([=<>!~].*)?", p) for p in packages):
            index = _option(argv, "--index-url", "-i", "--extra-index-url")
            assert index and re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+/?", index), \
                f"torch must come from a CUDA index of PyTorch, got {index!r}"
            torch_idx = idx
        req = _option(argv, "-r", "--requirement")
        if req is not None:
            assert posixpath.basename(req) == "requirements.txt", req
            req_idx = idx if req_idx is None else req_idx
        if "--no-deps" in argv and any(p in (".", "/app", "/app/") or p.endswith("/app") for p in packages):
            project_idx = idx
    assert torch_idx is not None, "no `pip install torch --index-url <CUDA index>`"
    assert req_idx is not None, "no `pip install -r requirements.txt`"
    assert project_idx is not None, "no `pip install --no-deps .` of the project"
    assert torch_idx < req_idx < project_idx, \
        "order: CUDA torch first (so requirements.txt keeps it), then requirements.txt, then the project"
    code_copy = min(i for i, (_, ins, args) in enumerate(dockerfile) if ins == "COPY" and "lora_trainer" in args)
    assert req_idx < code_copy < project_idx, "dependencies go in layers before the code, so code edits keep them cached"
    req_copy = [i for i, (_, ins, args) in enumerate(dockerfile) if ins == "COPY" and "requirements.txt" in args]
    assert req_copy and req_copy[0] < req_idx, "requirements.txt must be copied before it is installed"


def test_dockerfile_entrypoint_runs_the_trainer(dockerfile):
    args = next(a for _, ins, a in dockerfile if ins == "ENTRYPOINT")
    argv = _exec_form(args)
    assert argv, "ENTRYPOINT must use the exec (JSON) form, so signals reach the trainer and arguments append"
    if posixpath.basename(argv[0]) in ("tini", "dumb-init", "catatonit"):  # an init that forwards signals
        argv = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
    if posixpath.basename(argv[0]) == "train-lora":
        assert _pyproject()["project"]["scripts"]["train-lora"] == "lora_trainer.cli:main"
    else:
        assert re.fullmatch(r"python3?(\.\d+)?", posixpath.basename(argv[0])) and argv[1].endswith("train_lora.py"), argv
    cmd = [a for _, ins, a in dockerfile if ins == "CMD"]
    assert all(_exec_form(c) is not None for c in cmd), "CMD must use the exec form"


def test_dockerfile_user_volume_and_environment(dockerfile):
    users = [args.split(":")[0] for _, ins, args in dockerfile if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    created = " ".join(args for _, ins, args in dockerfile if ins == "RUN")
    assert re.search(rf"(useradd|adduser)\b[^&;]*\b{re.escape(users[-1])}\b", created), f"user {users[-1]} is never created"
    volumes: list[str] = []
    for _, ins, args in dockerfile:
        if ins == "VOLUME":
            volumes += _exec_form(args) or args.split()
    assert "/data" in volumes
    env: dict[str, str] = {}
    for _, ins, args in dockerfile:
        if ins == "ENV":
            env.update(_key_values(args))
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("HF_HOME", "").startswith("/data/"), "the Hugging Face cache belongs on the /data volume"
    healthchecks = [args for _, ins, args in dockerfile if ins == "HEALTHCHECK"]
    assert all(h.strip().upper() == "NONE" for h in healthchecks), "no HEALTHCHECK: the event heartbeat is the liveness signal"
