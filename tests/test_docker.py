"""The Docker image built and run for real (issue 12): the Dockerfile built on a Debian base made from Debian
packages (docker/debian-base.sh: no registry is reachable here) with the CPU torch wheel already on this machine,
then containers run the demo's tiny SDXL config the way the README says, `docker run --user UID:GID -v HOST:/data`,
on a host folder owned by a uid that is neither root nor the image's `trainer`.

One module-scoped scenario, in order:
1. container 1 downloads the base model from tests/fake_hub.py (`--network host`, HF_ENDPOINT) into the image's
   HF_HOME on the volume, trains, and is stopped with `docker stop` once its first `step` event is read (a
   handshake on the event stream, no sleeps);
2. container 2 (`--network none`, HF_HUB_OFFLINE=1) reruns with `--resume`, finding the model in the volume's cache.
The tests below assert on what each left on stdout, stderr and the host folder.

Needs a Docker engine (Debian's docker.io, started by .ci/run) and a docker client with BuildKit; skipped, saying
why, without one. Marked `docker`: `pytest -m "not docker"` leaves it out.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fake_hub import FakeHub

from conftest import ROOT, CliResult, parse_events

pytestmark = pytest.mark.docker

BASE_IMAGE = "lora-trainer-base:bookworm"  # docker/debian-base.sh's default; .ci/run builds it once per CI run
IMAGE = "lora-trainer:test"
REPO = "fake-org/tiny-sdxl"
STEPS = 40
# A uid/gid that owns nothing in the image (the image's trainer is 1000): the run only works if --user does.
HOST_UID = HOST_GID = 4321
BUILD_TIMEOUT_S = 1200
RUN_TIMEOUT_S = 600


def _run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, **kw)


def _docker_client() -> tuple[str | None, str]:
    """(docker executable that can build with BuildKit, why not). The Dockerfile's RUN --mount needs BuildKit: a
    client with the buildx plugin, or one older than 23, whose DOCKER_BUILDKIT=1 uses the engine's built-in BuildKit
    (Debian 12's docker.io 20.10). A newer client without buildx falls back to the legacy builder, which cannot."""
    candidates = [os.environ.get("DOCKER"), shutil.which("docker"), "/usr/bin/docker"]
    seen, reasons = set(), []
    for exe in candidates:
        if not exe or not os.access(exe, os.X_OK) or os.path.realpath(exe) in seen:
            continue
        seen.add(os.path.realpath(exe))
        if _run([exe, "buildx", "version"]).returncode == 0:
            return exe, ""
        m = re.search(r"version (\d+)\.", _run([exe, "--version"]).stdout)
        if m and int(m.group(1)) < 23:
            return exe, ""
        reasons.append(f"{exe} ({m.group(0) if m else 'unknown version'}) has no buildx plugin")
    if not reasons:
        return None, "no docker command (.ci/run installs Debian's docker.io)"
    return None, "no docker client with BuildKit: " + "; ".join(reasons)


@pytest.fixture(scope="module")
def docker() -> str:
    exe, why = _docker_client()
    if exe is None:
        pytest.skip(why)
    server = _run([exe, "version", "--format", "{{.Server.Version}}"], timeout=30)
    if server.returncode != 0 or not server.stdout.strip():
        pytest.skip(f"no Docker engine answers (start dockerd; .ci/run does): {server.stderr.strip()[:300]}")
    return exe


def _pip_cert() -> str | None:
    """The CA bundle this machine's pip trusts (PIP_CERT, else `pip config`'s cert): package registries are reached
    through a TLS-intercepting proxy here, so pip inside the build needs it (passed as a BuildKit secret)."""
    cert = os.environ.get("PIP_CERT")
    if not cert:
        out = _run([sys.executable, "-m", "pip", "config", "list"]).stdout
        found = re.findall(r"^[\w:.-]*\bcert='?([^'\n]+)'?$", out, re.MULTILINE)
        cert = found[-1] if found else None
    return cert if cert and os.path.isfile(cert) else None


def _torch_wheel(dest: Path) -> tuple[str, Path]:
    """(torch version, folder holding its wheel for the image's Python, 3.11 on Debian 12). pip download with the
    host's torch version finds the wheel where pip already finds it (this machine's find-links folder); a
    +cpu version is not on PyPI, so this never falls back to downloading a CUDA build of several GB."""
    version = importlib.metadata.version("torch")
    if platform.machine() != "x86_64":
        pytest.skip(f"the test builds an x86_64 image; this machine is {platform.machine()}")
    proc = _run([sys.executable, "-m", "pip", "download", f"torch=={version}", "--no-deps", "--only-binary", ":all:",
                 "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", str(dest), "-q"],
                timeout=600)
    if proc.returncode != 0 or not list(dest.glob("torch-*.whl")):
        pytest.skip(f"no torch=={version} wheel for Python 3.11 that pip can fetch without a large download: "
                    f"{proc.stderr.strip()[-300:]}")
    return version, dest


@pytest.fixture(scope="module")
def image(docker, tmp_path_factory) -> str:
    """The image, built as a user would with the test's build arguments. Layers stay in the engine's cache, so a
    rerun (and the second test run in one CI job) only rebuilds what changed."""
    if _run([docker, "image", "inspect", BASE_IMAGE]).returncode != 0:
        proc = _run([str(ROOT / "docker" / "debian-base.sh"), BASE_IMAGE], timeout=900,
                    env={**os.environ, "DOCKER": docker})
        if proc.returncode != 0:
            pytest.skip(f"no {BASE_IMAGE} and docker/debian-base.sh could not build it: {proc.stderr.strip()[-400:]}")
    version, wheels = _torch_wheel(tmp_path_factory.mktemp("wheels"))
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    wheels_image = "lora-trainer-torch-wheels:" + re.sub(r"[^\w.-]", "-", version)
    proc = _run([docker, "build", "-q", "-t", wheels_image, "-f", str(ROOT / "docker" / "wheels.Dockerfile"),
                 str(wheels)], timeout=BUILD_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cert = _pip_cert()
    cmd = [docker, "build", "--progress", "plain", "-t", IMAGE,
           "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
           "--build-arg", f"TORCH_WHEELS={wheels_image}",
           "--build-arg", f"TORCH_SPEC=torch=={version}",
           # The local wheel's version (2.13.0+cpu) is on no index; PyPI supplies torch's own dependencies.
           "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple",
           "--build-arg", "REQUIRE_CUDA_TORCH=0",
           *(["--secret", f"id=pip_cert,src={cert}"] if cert else []),
           str(ROOT)]
    proc = _run(cmd, timeout=BUILD_TIMEOUT_S, env=env)
    assert proc.returncode == 0, f"docker build failed:\n{proc.stderr[-6000:]}"
    return IMAGE


def _demo_config(folder: Path) -> Path:
    """demo.py's config (the README's `make demo`), relative to the config file as a config in /data would be."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
    config = {
        "dataset_path": "dataset", "base_model": REPO, "output_path": "out", "trigger_words": ["ohwx"],
        "training_params": {"resolution": 128, "min_bucket_resolution": 64, "max_bucket_resolution": 256,
                            "batch_size": 2, "max_train_steps": STEPS, "learning_rate": 3e-3, "lora_rank": 8,
                            "target_modules": targets, "checkpointing_steps": 20, "log_every_n_steps": 5,
                            "output_name": "demo_lora", "overwrite_output": True, "seed": 7, "validation_steps": 20,
                            "validation_inference_steps": 8, "num_validation_images": 2,
                            "validation_prompts": ["ohwx, a red circle, blue background"]},
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@dataclass
class Run(CliResult):  # conftest's result (of_type, last) plus what `docker stop` returned
    stop_returncode: int | None = None


def _container(docker: str, image: str, host: Path, name: str, docker_args: list[str], args: list[str],
               stop_at_first_step: bool = False) -> Run:
    """`docker run --rm --user UID:GID -v HOST:/data IMAGE --config /data/config.json ARGS`, stdout read line by
    line; with stop_at_first_step, `docker stop -t 120` as soon as the first `step` event arrives."""
    cmd = [docker, "run", "--rm", "--name", name, "--user", f"{host.stat().st_uid}:{host.stat().st_gid}",
           "-v", f"{host}:/data", *docker_args, image, "--config", "/data/config.json", *args]
    stderr_path = host.parent / f"{name}.stderr"
    with open(stderr_path, "w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        # A watchdog instead of a read timeout: a hung container is killed, which ends the stdout loop below.
        watchdog = threading.Timer(RUN_TIMEOUT_S, lambda: _run([docker, "kill", name]))
        watchdog.start()
        lines, stopper = [], None
        try:
            for line in proc.stdout:
                lines.append(line)
                if stop_at_first_step and stopper is None and json.loads(line)["type"] == "step":
                    # Not waited on here: docker stop returns once the container has exited, and the container
                    # keeps writing events (checkpoint, interrupted) that this loop must go on reading.
                    stopper = subprocess.Popen([docker, "stop", "-t", "120", name], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE, text=True)
            rc = proc.wait(timeout=60)
            stop_rc = stopper.wait(timeout=180) if stopper else None
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                _run([docker, "rm", "-f", name])
                proc.kill()
        stderr.seek(0)
        err = stderr.read()
    stdout = "".join(lines)
    return Run(rc, parse_events(stdout) if stdout.strip() else [], stdout, err, stop_rc)


@dataclass
class Scenario:
    host: Path
    hub: FakeHub
    runs: dict[str, Run] = field(default_factory=dict)
    requests: dict[str, list] = field(default_factory=dict)

    def on_host(self, container_path: str) -> Path:
        assert container_path.startswith("/data/"), container_path
        return self.host / container_path[len("/data/"):]


@pytest.fixture(scope="module")
def scenario(docker, image, tmp_path_factory, tiny_models):
    from lora_trainer.testing.tiny import make_dataset

    root = tmp_path_factory.mktemp("docker")
    host = root / "data"
    host.mkdir()
    make_dataset(host / "dataset", n=12, trigger="ohwx", sizes=[(128, 128), (192, 128), (128, 192), (160, 160)])
    _demo_config(host)
    if os.geteuid() == 0:  # as root, hand the folder to a user of its own; otherwise it is already not root's
        for path in [host, *host.rglob("*")]:
            os.chown(path, HOST_UID, HOST_GID)
    hub = FakeHub()
    hub.add_repo(REPO, Path(tiny_models["sdxl"]))
    tag = f"{os.getpid()}-{threading.get_ident()}"
    with hub:
        sc = Scenario(host, hub)
        sc.runs["stopped"] = _container(docker, image, host, f"lora-trainer-test-{tag}-1",
                                        ["--network", "host", "-e", f"HF_ENDPOINT={hub.endpoint}"], [],
                                        stop_at_first_step=True)
        sc.requests["stopped"] = hub.take()
        sc.runs["resumed"] = _container(docker, image, host, f"lora-trainer-test-{tag}-2",
                                        ["--network", "none", "-e", "HF_HUB_OFFLINE=1"], ["--resume"])
        sc.requests["resumed"] = hub.take()
        yield sc
    assert not hub.unexpected, f"requests FakeHub does not emulate: {hub.unexpected}"


def test_stdout_is_only_schema_valid_events_and_logs_go_to_stderr(scenario):
    for name, run in scenario.runs.items():
        # parse_events (in _container) already refused any non-JSON or schema-invalid line and any seq gap; no
        # `-t` on docker run, so the container's stderr stays apart from its stdout.
        assert len(run.events) > 10, f"{name}: {len(run.events)} events\n{run.stderr[-3000:]}"
        on_stderr = [line for line in run.stderr.splitlines() if line.startswith('{"type"')]
        assert not on_stderr, f"{name}: an event on stderr: {on_stderr[0][:300]}"
    # The human log of the stop went to stderr, its event to stdout.
    stopped = scenario.runs["stopped"].stderr
    assert re.search(r"^\S+ \S+ WARNING train_lora: interrupted by SIGTERM$", stopped, re.MULTILINE), stopped[-3000:]


def test_runs_as_the_host_folders_owner_without_permission_problems(scenario):
    for name, run in scenario.runs.items():
        assert "Traceback" not in run.stderr, f"{name}:\n{run.stderr[-3000:]}"
        # e.g. a library writing under HOME, which is / (not writable) for a --user uid without a passwd entry
        assert not re.search(r"permission denied", run.stderr, re.IGNORECASE), f"{name}:\n{run.stderr[-3000:]}"
    owner = (scenario.host.stat().st_uid, scenario.host.stat().st_gid)
    written = [p for p in (scenario.host / "out").rglob("*")] + [p for p in (scenario.host / "hf-cache").rglob("*")]
    assert written
    foreign = [p for p in written if (p.lstat().st_uid, p.lstat().st_gid) != owner]
    assert not foreign, f"files not owned by {owner}: {foreign[:5]}"


def test_the_model_is_downloaded_once_into_the_hf_cache_on_the_volume(scenario):
    stopped = scenario.runs["stopped"]
    assert any(e["phase"] == "downloading" for e in stopped.of_type("progress")), [e["type"] for e in stopped.events]
    assert scenario.hub.downloaded_files(REPO, scenario.requests["stopped"]), "container 1 downloaded nothing"
    repo_cache = scenario.host / "hf-cache" / "hub" / ("models--" + REPO.replace("/", "--"))
    assert list(repo_cache.glob("snapshots/*/unet/diffusion_pytorch_model.safetensors")), \
        "HF_HOME=/data/hf-cache: the model must land in the mounted folder"
    # Container 2 had no network at all and found the model in the volume's cache.
    assert scenario.requests["resumed"] == []
    assert scenario.runs["resumed"].last("run_started")["family"] == "sdxl"


def test_docker_stop_exits_143_after_a_checkpoint_on_the_host(scenario):
    run = scenario.runs["stopped"]
    assert run.stop_returncode == 0, "docker stop failed"
    assert run.returncode == 128 + signal.SIGTERM, f"exit {run.returncode}\n{run.stderr[-3000:]}"
    inter = run.last("interrupted")
    assert inter["signal"] == "SIGTERM", "tini (PID 1) must pass docker stop's SIGTERM on to the trainer"
    assert inter["step"] < STEPS, "the run finished before the stop arrived"
    ckpt = run.last("checkpoint")
    assert ckpt["step"] == inter["step"] and ckpt["path"] == inter["checkpoint"]
    folder = scenario.on_host(ckpt["path"])
    assert folder.is_dir() and any(folder.iterdir()), f"{folder} is missing or empty on the host"
    assert not run.of_type("completed")


def test_a_second_container_resumes_and_the_lora_lands_on_the_host(scenario):
    from safetensors.torch import load_file

    run = scenario.runs["resumed"]
    assert run.returncode == 0, run.stderr[-3000:]
    stopped_at = scenario.runs["stopped"].last("interrupted")["step"]
    resumed = run.last("resumed")
    assert resumed["step"] == stopped_at
    assert resumed["checkpoint"] == scenario.runs["stopped"].last("interrupted")["checkpoint"]
    assert run.last("run_started")["start_step"] == stopped_at
    assert all(e["step"] > stopped_at for e in run.of_type("step"))
    done = run.last("completed")
    assert done["steps"] == STEPS
    lora = scenario.on_host(done["outputs"]["lora"])
    assert lora == scenario.host / "out" / "demo_lora.safetensors"
    tensors = load_file(lora)  # readable on the host, a complete safetensors file
    assert any(k.endswith("lora_down.weight") for k in tensors), sorted(tensors)[:5]
