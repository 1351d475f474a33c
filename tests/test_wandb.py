"""report_to "wandb" with the real wandb package, offline: the run folder holds the loss, the learning rate and
the sample images (read back with wandb's own record format), nothing touches the network, and the API key
appears in no event, log or output."""
from __future__ import annotations

import json
import socket
import struct
import threading

import pytest

from conftest import run_cli, write_config

wandb = pytest.importorskip("wandb", reason="wandb is in requirements-dev.txt; CI installs it")

SECRET = "wandb_SECRETkey_0123456789abcdef0123456789"


def _records(path):
    """wandb's transaction log: a 7-byte header (':W&B', magic, version), then LevelDB-log framed protobuf Records
    (32 KiB blocks; chunk header crc32c(4) length(2) type(1): 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


@pytest.fixture()
def no_network():
    """A local listener standing in for every address wandb could try (proxy and base URL): it counts attempts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    attempts, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                attempts.append(conn.recv(200))
                conn.close()
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    yield {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url, "WANDB_BASE_URL": url}, attempts
    stop.set()
    t.join(timeout=5)
    server.close()


def test_wandb_offline_run_holds_loss_lr_and_samples(tmp_path, tiny_models, dataset, no_network):
    proxy_env, attempts = no_network
    cfg = write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models["sd15"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64, max_train_steps=3,
                       log_every_n_steps=1, lora_rank=4, report_to="wandb", validation_steps=3,
                       validation_inference_steps=2)
    res = run_cli("--config", str(cfg), env={**proxy_env, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                                             "WANDB_API_KEY": SECRET, "WANDB_SILENT": "true"})
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    history: dict[int, dict[str, str]] = {}
    config_keys: set[str] = set()
    for record in _records(next(runs[0].glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}  # images nest
            history.setdefault(int(items.get("_step", "-1")), {}).update(items)
        elif kind == "config":
            config_keys |= {i.key for i in record.config.update}
    assert {"loss", "lr"} <= set(history[1]) and {"loss", "lr"} <= set(history[3])
    assert float(history[1]["lr"]) == pytest.approx(1e-4)
    assert history[0]["samples/_type"] == '"images/separated"'  # the base model's samples, before training
    (grid,) = json.loads(history[3]["samples/filenames"])
    assert (runs[0] / "files" / grid).is_file(), "the step-3 sample grid is not in the run folder"
    assert "learning_rate" in config_keys and "lora_rank" in config_keys
    assert attempts == [], f"wandb tried the network in offline mode: {attempts[:2]}"
    assert SECRET not in res.stdout and SECRET not in res.stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
