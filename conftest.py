"""Shared fixtures: tiny random pipelines and datasets built once per session, and a CLI runner that
validates every stdout line against events_schema.json."""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch thread in this process and every trainer it starts (they inherit it): two threads on two cores shared
# with a neighbour wait on each other and a run gets many times slower, and a fixed count keeps CPU results the same
# from run to run, which the bitwise resume tests compare. The trainer's own choice is tested in test_device.py.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@dataclass
class CliResult:
    returncode: int
    events: list[dict]
    stdout: str
    stderr: str

    def of_type(self, type_: str) -> list[dict]:
        return [e for e in self.events if e["type"] == type_]

    def last(self, type_: str) -> dict:
        found = self.of_type(type_)
        assert found, f"no {type_!r} event; types seen: {[e['type'] for e in self.events]}\nstderr:\n{self.stderr[-3000:]}"
        return found[-1]


_validator = None


def event_validator():
    global _validator
    if _validator is None:
        import jsonschema

        _validator = jsonschema.Draft7Validator(json.loads((ROOT / "events_schema.json").read_text()))
    return _validator


def parse_events(stdout: str) -> list[dict]:
    """Every stdout line must be one schema-valid JSON event, seq 1, 2, 3 ... with one run_id."""
    events = []
    for n, line in enumerate(stdout.splitlines(), 1):
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"stdout line {n} is not JSON: {line[:300]!r}") from None
        errors = sorted(event_validator().iter_errors(ev), key=str)
        assert not errors, f"stdout line {n} violates events_schema.json: {errors[0].message}\n{line[:500]}"
        events.append(ev)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "seq must be 1, 2, 3, ..."
    assert len({e["run_id"] for e in events}) <= 1, "one run_id per process"
    return events


class _ForkServer:
    """tests/_forkserver.py, started on this worker's first CLI run: runs the CLI in a child forked after the
    third-party imports that cost a short tiny run nine tenths of its CPU."""

    def __init__(self, env: dict):
        self.env = env
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_forkserver.py")], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     bufsize=0)
        atexit.register(self.close)

    def close(self) -> None:
        self.proc.stdin.close()  # the server's loop ends; waiting for it lets `time` count its children's CPU
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def _line(self, deadline: float) -> str:
        import select
        import time

        out = b""
        while not out.endswith(b"\n"):
            if not select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError
            byte = self.proc.stdout.read(1)
            if not byte:
                raise OSError("the fork server exited")
            out += byte
        return out.decode()

    def run(self, argv: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str, str]:
        import signal
        import tempfile
        import time

        with tempfile.TemporaryDirectory(prefix="run_cli") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            umask = os.umask(0)  # process state a fresh subprocess inherits from this one: umask, cwd, environment
            os.umask(umask)
            req = {"argv": argv, "cwd": str(cwd), "env": env, "umask": umask, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            deadline = time.monotonic() + timeout
            pid = int(self._line(time.monotonic() + 900))  # the first request waits for the server's imports
            try:
                code = int(self._line(deadline))
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._line(time.monotonic() + 60)
                raise subprocess.TimeoutExpired(argv, timeout) from None
            return code, out.read_text(encoding="utf-8"), err.read_text(encoding="utf-8", errors="replace")


_fork_server: _ForkServer | None = None
# Read by the CLI's modules at import, which the child does itself, or by nothing in it (pytest's name of the test):
# these may differ from the server's environment.
_RUN_TIME_ENV = ("TRAIN_LORA_TEST_", "TRAIN_LORA_RUN_ID", "PYTEST_CURRENT_TEST")


def _forked_run(argv: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str, str] | None:
    """The run through the fork server, or None where a fresh interpreter could differ (see tests/_forkserver.py)."""
    global _fork_server
    if os.environ.get("TRAIN_LORA_TESTS_FORKSERVER", "1") == "0" or "--validate-only" in argv:
        return None
    if _fork_server is None or _fork_server.proc.poll() is not None:
        _fork_server = _ForkServer({**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    base = _fork_server.env
    if any(env.get(k) != base.get(k) for k in {*env, *base} if not k.startswith(_RUN_TIME_ENV)):
        return None
    return _fork_server.run(argv, cwd, env, timeout)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> CliResult:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    argv = [str(ROOT / "train_lora.py"), *args]
    forked = _forked_run(argv, cwd or ROOT, full_env, timeout)
    if forked is not None:
        code, stdout, stderr = forked
        return CliResult(code, parse_events(stdout), stdout, stderr)
    proc = subprocess.run([sys.executable, *argv], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    return CliResult(proc.returncode, parse_events(proc.stdout), proc.stdout, proc.stderr)


def lora_deltas(module) -> dict:
    """module path -> scale * B @ A of every LoRA layer of a PEFT-wrapped model (UNet, transformer, text encoder)."""
    out = {}
    for name, layer in module.named_modules():
        if hasattr(layer, "lora_A") and layer.lora_A:
            adapter = next(iter(layer.lora_A.keys()))
            a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
            out[name] = layer.scaling[adapter] * (b @ a)
    return out


def write_config(path: Path, **fields) -> Path:
    path.write_text(json.dumps(fields, indent=2), encoding="utf-8")
    return path


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks (it appends @group to the test ids)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` (pytest.ini) the tests that share a module-scoped fixture, most often a set of
    CLI runs that several tests assert on, all go to one worker: xdist's default ``load`` split such a module
    between the workers and each ran the fixture (its trainings) again. Groups are handed out before single
    tests, so these heavy modules also start first and the short single tests fill in the end."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d and d[-1].scope == "module" for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Lazily built tiny pipelines: tiny_models['sdxl'] etc."""
    from lora_trainer.testing.tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("models")

    class Lazy(dict):
        def __missing__(self, family):
            path = make_tiny_pipeline(root / family, family)
            self[family] = Path(path)
            return self[family]

    return Lazy()


@pytest.fixture()
def dataset(tmp_path) -> Path:
    from lora_trainer.testing.tiny import make_dataset

    return Path(make_dataset(tmp_path / "data", n=4, trigger="ohwx"))
