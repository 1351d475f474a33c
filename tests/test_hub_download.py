"""base_model as a hub id, end to end through the real CLI, against tests/fake_hub.py (a local stand-in for the
Hugging Face Hub: HF_ENDPOINT points at it, HF_HOME at a temporary cache).

The repo served is the tiny SD1.5 pipeline plus decoys a real repo has and the trainer must never fetch: pickles
(unet/diffusion_pytorch_model.bin, text_encoder/pytorch_model.bin, a root .ckpt, even one inside tokenizer/),
a root-level single-file checkpoint, an fp16 variant and a safety_checker, none of which the loader reads.

One module-scoped scenario runs in order on one cache: --validate-only before anything is cached, then a training
run that downloads the model; the tests below assert on its events and on what the hub saw. Then an offline rerun
from the cache, and a gated (401) repo in its own cache.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub, Request
from safetensors.torch import load_file

from conftest import CliResult, run_cli, write_config
from lora_trainer.contract.errors import EXIT_MODEL_LOAD

REPO = "fake-org/tiny-sd15"
TOKEN = "hf_fake_secret_123"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
DECOYS = {
    "unet/diffusion_pytorch_model.bin": b"\x80\x04decoy unet pickle" * 64,
    "text_encoder/pytorch_model.bin": b"\x80\x04decoy text encoder pickle" * 64,
    "tokenizer/pytorch_model.bin": b"\x80\x04decoy pickle in a tokenizer folder" * 8,
    "v1-5-pruned-emaonly.ckpt": b"\x80\x04decoy root checkpoint" * 64,
    "v1-5-pruned-emaonly.safetensors": b"decoy root single-file checkpoint" * 64,
    "unet/diffusion_pytorch_model.fp16.safetensors": b"decoy fp16 variant" * 64,
    "safety_checker/config.json": b'{"decoy": "safety checker, not a component the trainer loads"}',
    "safety_checker/model.safetensors": b"decoy safety checker weights" * 64,
}

def hub_env(hub: FakeHub, hf_home: Path, *, offline: bool = False) -> dict:
    return {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
            "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1" if offline else "0",
            "TRANSFORMERS_OFFLINE": "0", "HF_TOKEN": TOKEN,
            # An HTTP(S)_PROXY in the environment must not swallow the requests to the local fake hub.
            **{var: ",".join(filter(None, [os.environ.get(var), "127.0.0.1"])) for var in ("NO_PROXY", "no_proxy")}}


def download_in_child(hub: FakeHub, hf_home: Path, repo: str) -> subprocess.CompletedProcess:
    """runtime.loading.download_from_hub(repo) in a child process against the fake hub (the product's download
    filter, HF_HOME pointing into the test's folder)."""
    code = ("import sys; from lora_trainer.runtime.loading import download_from_hub; "
            "print(download_from_hub(sys.argv[1], lambda *a: None))")
    with hub:
        return subprocess.run([sys.executable, "-c", code, repo], env={**os.environ, **hub_env(hub, hf_home)},
                              cwd=Path(__file__).resolve().parents[1], check=False, capture_output=True, text=True,
                              timeout=180)


def seed_partial_snapshot(hub: FakeHub, hf_home: Path) -> None:
    """The configs only, as a download interrupted before the weights leaves the cache."""
    code = ("import sys; from huggingface_hub import snapshot_download; "
            "snapshot_download(sys.argv[1], allow_patterns=['model_index.json', 'scheduler/*', "
            "'unet/config.json', 'vae/config.json', 'text_encoder/config.json'])")
    proc = subprocess.run([sys.executable, "-c", code, REPO], env={**os.environ, **hub_env(hub, hf_home)},
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def hub_config(path: Path, data: Path, out: Path, **extra) -> Path:
    return write_config(path, dataset_path=str(data), base_model=REPO, output_path=str(out), trigger_words=["ohwx"],
                        resolution=64, min_bucket_resolution=64, max_train_steps=2, log_every_n_steps=1, lora_rank=4,
                        **extra)


def assert_no_secret(res: CliResult) -> None:
    assert TOKEN not in res.stdout, "HF_TOKEN leaked into the event stream"
    assert TOKEN not in res.stderr, "HF_TOKEN leaked into stderr"


def snapshot_files(repo_cache: Path) -> set[str]:
    snaps = list((repo_cache / "snapshots").iterdir())
    assert len(snaps) == 1, snaps
    return {p.relative_to(snaps[0]).as_posix() for p in snaps[0].rglob("*") if p.is_file()}


@dataclass
class Scenario:
    hub: FakeHub
    hf_home: Path
    root: Path
    data: Path
    model_files: set[str]  # what the tiny pipeline folder holds: exactly what must be downloaded
    runs: dict[str, CliResult] = field(default_factory=dict)
    requests: dict[str, list[Request]] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    cached_after_validate: bool | None = None

    @property
    def repo_cache(self) -> Path:
        return self.hf_home / "hub" / ("models--" + REPO.replace("/", "--"))

    def run(self, name: str, *args: str, offline: bool = False, **cfg) -> CliResult:
        self.outputs[name] = self.root / f"out_{name}"
        config = hub_config(self.root / f"{name}.json", self.data, self.outputs[name], **cfg)
        res = run_cli("--config", str(config), *args, env=hub_env(self.hub, self.hf_home, offline=offline))
        self.runs[name] = res
        self.requests[name] = self.hub.take()
        return res


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, tiny_models):
    from lora_trainer.testing.tiny import make_dataset

    root = tmp_path_factory.mktemp("hub_download")
    model = Path(tiny_models["sd15"])
    hub = FakeHub()
    hub.add_repo(REPO, model, DECOYS)
    with hub:
        sc = Scenario(hub, root / "hf_home", root, Path(make_dataset(root / "data", n=4, trigger="ohwx")),
                      {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()})
        sc.run("validate", "--validate-only")
        sc.cached_after_validate = sc.repo_cache.exists()
        fresh = sc.run("fresh")
        sc.runs["train"], sc.requests["train"], sc.outputs["train"] = fresh, sc.requests["fresh"], sc.outputs["fresh"]
        yield sc
    assert not hub.unexpected, f"requests FakeHub does not emulate: {hub.unexpected}"


def test_validate_only_warns_hub_not_cached_and_downloads_nothing(scenario):
    res = scenario.runs["validate"]
    assert res.returncode == 0, res.stderr[-3000:]
    val = res.last("validation")
    assert val["ok"] is True and not val["errors"]
    assert "hub_not_cached" in [w["code"] for w in val["warnings"]]
    assert val["summary"]["model"]["in_cache"] is False and val["summary"]["model"]["kind"] == "hub"
    assert scenario.requests["validate"] == [], "--validate-only must never contact the hub"
    assert scenario.cached_after_validate is False
    assert_no_secret(res)


def test_training_from_an_empty_cache_detects_the_family_after_download(scenario):
    res = scenario.runs["fresh"]
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.last("run_started")["family"] == "sd15"
    assert any(e["phase"] == "downloading" for e in res.of_type("progress"))


def test_training_downloads_the_model_with_progress_and_writes_the_lora(scenario):
    res, reqs, hub = scenario.runs["train"], scenario.requests["train"], scenario.hub
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.last("run_started")["family"] == "sd15"
    lora = scenario.outputs["train"] / "lora.safetensors"
    assert lora.is_file() and res.last("completed")["outputs"]["lora"] == str(lora)

    # Downloaded: exactly the pipeline's files (those already in the cache excepted), from the hub and its CDN.
    assert snapshot_files(scenario.repo_cache) == scenario.model_files
    fetched = hub.downloaded_files(REPO, reqs)
    assert fetched and fetched <= scenario.model_files
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= fetched

    # One monotonic series of bytes against one total known from the start (huggingface_hub's dry run, not the
    # total that grows as parallel downloads start), ending at 100 %, all before training starts.
    events = res.events
    prog = [e for e in events if e["type"] == "progress" and e["phase"] == "downloading"]
    assert prog, "no progress event with phase 'downloading'"
    cur, tot = [e["current"] for e in prog], [e["total"] for e in prog]
    assert {e["unit"] for e in prog} == {"B"}
    assert cur == sorted(cur) and tot == sorted(tot), list(zip(cur, tot))
    assert all(t is not None and 0 < c <= t for c, t in zip(cur, tot)), list(zip(cur, tot))
    expected_bytes = sum(len(hub.repos[REPO].files[p].data) for p in fetched)
    assert cur[-1] == tot[-1] == expected_bytes and set(tot) == {expected_bytes}, list(zip(cur, tot))
    assert prog[-1]["seq"] < res.last("run_started")["seq"]
    assert len([e for e in res.of_type("status") if e["phase"] == "downloading"]) == 1  # not again at model load
    assert all(REPO in e.get("message", "") for e in prog)

    # The token goes to the hub's API, never to the CDN (another origin), and never into the output.
    for r in reqs:
        if r.server == "cdn":
            assert r.authorization is None, r
        elif r.path.startswith(("/api/models/", f"/{REPO}/resolve/")):
            assert r.authorization == f"Bearer {TOKEN}", r
    assert_no_secret(res)


def test_pickles_and_unused_weights_are_never_requested(scenario):
    hub = scenario.hub
    product_requests = [r for name, reqs in scenario.requests.items() if name != "seed" for r in reqs]
    asked = hub.requested_files(REPO, product_requests)
    assert asked, "the scenario downloaded nothing"
    assert not asked & set(DECOYS), f"decoys requested: {sorted(asked & set(DECOYS))}"
    assert not [r.path for r in product_requests if r.path.endswith(PICKLE_SUFFIXES)]
    assert not hub.unexpected, hub.unexpected


def test_offline_rerun_uses_the_cache_without_any_request(scenario):
    first = scenario.runs["train"]
    assert first.returncode == 0, "needs the download of the training test"
    res = scenario.run("offline", offline=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert scenario.requests["offline"] == [], "HF_HUB_OFFLINE=1 must not contact the hub"
    assert "hub_not_cached" not in [w["code"] for w in res.of_type("warning")]
    assert res.last("run_started")["family"] == "sd15"
    assert not [e for e in res.of_type("progress") if e["phase"] == "downloading"]
    # Same cached model, same seed: the same LoRA as the run that downloaded it.
    a = load_file(scenario.outputs["train"] / "lora.safetensors")
    b = load_file(scenario.outputs["offline"] / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_no_secret(res)


@pytest.mark.parametrize("cache", ["empty", "partial"])
def test_gated_repo_is_a_model_load_error_with_an_hf_token_hint(tmp_path, tiny_models, dataset, cache):
    hf_home = tmp_path / "hf_home"
    hub = FakeHub()
    hub.add_repo(REPO, tiny_models["sd15"])
    with hub:
        if cache == "partial":  # configs cached by an earlier, interrupted download; the token has since lapsed
            seed_partial_snapshot(hub, hf_home)
            hub.take()
        hub.mode = "gated"
        config = hub_config(tmp_path / "c.json", dataset, tmp_path / "out")
        res = run_cli("--config", str(config), env=hub_env(hub, hf_home))
    assert res.returncode == EXIT_MODEL_LOAD, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.last("error")
    assert err["code"] == "model_load_failed" and err["exit_code"] == EXIT_MODEL_LOAD
    assert REPO in err["message"] and "HF_TOKEN" in err["hint"], err
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    assert not res.of_type("run_started")
    # The hub was asked (with the token) and said 401; the token appears nowhere in what the run printed.
    assert hub.requests and all(r.status == 401 for r in hub.requests)
    assert any(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    assert not hub.unexpected, hub.unexpected
    assert_no_secret(res)


# FLUX.1 / SD3 repos: what a diffusers-format repo of those families holds next to the pipeline (root single-file
# releases, the SAI text_encoders/ folder, fp16/bf16 shards, pickled T5 shards). Only the pipeline may be fetched.
FLOW_DECOYS = {
    "flux1-dev.safetensors": b"decoy root single-file transformer" * 64,
    "ae.safetensors": b"decoy root BFL autoencoder" * 64,
    "sd3.5_large.safetensors": b"decoy root SAI checkpoint" * 64,
    "text_encoders/t5xxl_fp16.safetensors": b"decoy SAI text encoder" * 64,
    "text_encoders/clip_l.safetensors": b"decoy SAI text encoder" * 64,
    "transformer/diffusion_pytorch_model.fp16-00001-of-00002.safetensors": b"decoy fp16 shard" * 64,
    "transformer/diffusion_pytorch_model.fp16.safetensors.index.json": b'{"weight_map": {}}',
    "text_encoder_2/model.bf16-00001-of-00002.safetensors": b"decoy bf16 shard" * 64,
    "text_encoder_2/pytorch_model-00001-of-00002.bin": b"\x80\x04decoy T5 pickle shard" * 64,
    "text_encoder_2/pytorch_model.bin.index.json": b'{"weight_map": {}}',
    "tokenizer_2/pytorch_model.bin": b"\x80\x04decoy pickle in a tokenizer folder" * 8,
    "dev_grid.jpg": b"\xff\xd8decoy image" * 64,
}


@pytest.mark.parametrize("cls,repo,variant", [("FluxPipeline", "fake-org/tiny-flux1-dev", "dev"),
                                              ("StableDiffusion3Pipeline", "fake-org/tiny-sd35-medium", "sd3.5-medium")])
def test_flow_family_repo_downloads_only_the_pipeline(tmp_path, cls, repo, variant):
    from test_model_probe import write_flow_pipeline

    from lora_trainer.preflight.probe import probe_model

    tcfg = {"guidance_embeds": True} if cls == "FluxPipeline" else {"qk_norm": "rms_norm", "dual_attention_layers": [0]}
    model = write_flow_pipeline(tmp_path / "model", cls, tcfg)
    # the transformer sharded too, as the real 12 B / 8 B ones are
    t = model / "transformer"
    (t / "diffusion_pytorch_model.safetensors").rename(t / "diffusion_pytorch_model-00001-of-00002.safetensors")
    (t / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes((t / "diffusion_pytorch_model-00001-of-00002.safetensors").read_bytes())
    (t / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "diffusion_pytorch_model-00001-of-00002.safetensors", '
        '"v": "diffusion_pytorch_model-00002-of-00002.safetensors"}}')
    model_files = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()}
    t5, t5_tok = ("text_encoder_2", "tokenizer_2") if cls == "FluxPipeline" else ("text_encoder_3", "tokenizer_3")
    assert {"transformer/diffusion_pytorch_model-00002-of-00002.safetensors", f"{t5}/model-00002-of-00002.safetensors",
            f"{t5}/model.safetensors.index.json", f"{t5_tok}/spiece.model", f"{t5_tok}/tokenizer.json"} <= model_files
    hf_home = tmp_path / "hf_home"
    hub = FakeHub()
    hub.add_repo(repo, model, FLOW_DECOYS)
    proc = download_in_child(hub, hf_home, repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    repo_cache = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snaps = list((repo_cache / "snapshots").iterdir())
    assert len(snaps) == 1
    assert {p.relative_to(snaps[0]).as_posix() for p in snaps[0].rglob("*") if p.is_file()} == model_files
    asked = hub.requested_files(repo)
    assert not asked & set(FLOW_DECOYS), f"decoys requested: {sorted(asked & set(FLOW_DECOYS))}"
    assert not hub.unexpected, hub.unexpected
    # what was fetched is exactly what the probe needs
    p = probe_model(str(snaps[0]))
    assert p.ok and (p.family, p.variant) == ("flux1" if cls == "FluxPipeline" else "sd3", variant), p.problems


def test_unreachable_hub_is_a_model_load_error_with_a_network_hint(tmp_path, dataset):
    """No network: the endpoint refuses connections (a port nothing listens on), the cache is empty."""
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: connecting to it is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hf_home = tmp_path / "hf_home"
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
           "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "5",
           "HF_HUB_DOWNLOAD_TIMEOUT": "5",
           **{var: ",".join(filter(None, [os.environ.get(var), "127.0.0.1"])) for var in ("NO_PROXY", "no_proxy")}}
    res = run_cli("--config", str(hub_config(tmp_path / "c.json", dataset, tmp_path / "out")), env=env, timeout=300)
    assert res.returncode == EXIT_MODEL_LOAD, res.stdout[-2000:] + res.stderr[-2000:]
    err = res.last("error")
    assert err["code"] == "model_load_failed" and REPO in err["message"], err
    assert err["hint"] and any(w in err["hint"].lower() for w in ("network", "connection", "offline")), err
    assert "Traceback" not in res.stderr and not res.of_type("run_started")


def test_a_download_cut_mid_file_is_completed_by_the_next_run(tmp_path, tiny_models, dataset):
    """The network drops halfway through the UNet's weights: the run fails (exit 4 with a hint, nothing trained). The
    files that did arrive stay in the cache; the next run fetches only the missing one (huggingface_hub 2.x
    downloads each file to a per-process temp file and discards it on failure, so that one starts over) and
    trains."""
    hf_home = tmp_path / "hf_home"
    hub = FakeHub()
    repo = hub.add_repo(REPO, tiny_models["sd15"])
    unet = repo.files["unet/diffusion_pytorch_model.safetensors"]
    half = len(unet.data) // 2
    config = hub_config(tmp_path / "c.json", dataset, tmp_path / "out")
    with hub:
        env = {**hub_env(hub, hf_home), "HF_HUB_DOWNLOAD_TIMEOUT": "5"}  # the endpoint exists once started
        hub.cut[unet.sha256] = half
        first = run_cli("--config", str(config), env=env)
        cut_run = hub.take()
        del hub.cut[unet.sha256]
        second = run_cli("--config", str(config), env=env)
        next_run = hub.take()
    assert first.returncode == EXIT_MODEL_LOAD, first.stdout[-2000:] + first.stderr[-2000:]
    err = first.last("error")
    assert err["code"] == "model_load_failed" and err["hint"] and not first.of_type("run_started")
    cut_gets = {r.path for r in cut_run if r.server == "cdn" and r.method == "GET"}
    assert f"/cdn/{unet.sha256}" in cut_gets and len(cut_gets) > 1  # the cut hit one of several weight files
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    fetched = {r.path for r in next_run if r.server == "cdn" and r.method == "GET"}
    assert fetched == {f"/cdn/{unet.sha256}"}, "files that arrived before the cut must not be fetched again"
    snaps = list((hf_home / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots").iterdir())
    assert (snaps[0] / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet.data
    assert not list((hf_home / "hub").rglob("*.incomplete"))
    assert not hub.unexpected, hub.unexpected
