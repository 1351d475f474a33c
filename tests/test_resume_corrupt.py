"""A corrupt newest checkpoint (issue 21, item 12): resume "auto" falls back to the one before, and says so. Through
the real CLI: --validate-only names the checkpoint training will really resume from and warns about the rejected one
(from sizes and safetensors headers against the manifest, without reading tensors), and a training run warns once
with the reason, whether preflight saw the damage (a truncated file) or only the resume's full hash check did (a
flipped bit in tensor data, same size)."""
from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import pytest

from conftest import run_cli, write_config


@pytest.fixture()
def two_checkpoints(tmp_path, tiny_models, dataset) -> tuple[Path, Path]:
    """A run stopped by SIGTERM at step 4 of 6, with checkpoints at steps 2 and 4: (config, checkpoints folder)."""
    cfg = write_config(tmp_path / "c.json", dataset_path=str(dataset), base_model=str(tiny_models["sd15"]),
                       output_path=str(tmp_path / "out"), trigger_words=["ohwx"], resolution=64, max_train_steps=6,
                       checkpointing_steps=2, lora_rank=4, log_every_n_steps=1)
    res = run_cli("--config", str(cfg), env={"TRAIN_LORA_TEST_SIGTERM_STEP": "4"})
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    root = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]
    return cfg, root


def _rejections(events_or_warnings):
    return [w for w in events_or_warnings if w.get("code") == "checkpoint_rejected"]


def test_truncated_optimizer_file(two_checkpoints):
    cfg, root = two_checkpoints
    opt = root / "step-000004" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])  # a partial copy / a crash without atomic rename

    check = run_cli("--config", str(cfg), "--validate-only", "--resume")
    assert check.returncode == 0, check.stdout[-2000:]
    validation = check.last("validation")
    resume = validation["summary"]["resume"]
    assert (Path(resume["checkpoint"]).name, resume["step"], resume["action"]) == ("step-000002", 2, "resume")
    assert [Path(r["checkpoint"]).name for r in resume["rejected"]] == ["step-000004"]
    rejected, = _rejections(validation["warnings"])
    assert rejected["files"] == [str(root / "step-000004")]
    assert "optimizer.safetensors" in rejected["message"] and "truncated" in rejected["message"], rejected
    assert "step-000002" in rejected["message"]

    run = run_cli("--config", str(cfg), "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    rejected, = _rejections(run.of_type("warning"))  # once, though preflight and the resume both reject it
    assert rejected["files"] == [str(root / "step-000004")] and "truncated" in rejected["message"]
    assert run.last("resumed")["step"] == 2 and Path(run.last("run_started")["resume_from"]).name == "step-000002"
    assert [e["step"] for e in run.of_type("step")] == [3, 4, 5, 6]


def test_flipped_bit_in_tensor_data(two_checkpoints):
    """Same size, valid header: only the resume's sha256 check can tell, and it must say so too."""
    cfg, root = two_checkpoints
    opt = root / "step-000004" / "optimizer.safetensors"
    with open(opt, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0x01]))

    run = run_cli("--config", str(cfg), "--resume")
    assert run.returncode == 0, run.stderr[-3000:]
    rejected, = _rejections(run.of_type("warning"))
    assert rejected["files"] == [str(root / "step-000004")], rejected
    assert "optimizer.safetensors" in rejected["message"] and "sha256" in rejected["message"], rejected
    assert run.last("resumed")["step"] == 2


def test_quick_check_reads_headers_not_tensors(tmp_path):
    """Bit rot in a safetensors header (the size still matches the manifest) is caught by the torch-free check."""
    from lora_trainer.preflight.checkpoints import quick_check
    from lora_trainer.training.checkpoint import save_checkpoint
    import torch

    path = save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(4, 4)}}, {"progress": {"step": 1}}, keep_last=None)
    assert quick_check(path) == (True, "ok")
    model = path / "model.safetensors"
    data = bytearray(model.read_bytes())
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    header = json.loads(data[8:8 + n])
    entry = header["w"]
    assert entry["data_offsets"] == [0, 64]
    # Offsets that no longer cover the data: same length of header text, same file size.
    data[8:8 + n] = data[8:8 + n].replace(b"[0,64]", b"[0,60]")
    model.write_bytes(bytes(data))
    ok, reason = quick_check(path)
    assert not ok and "model.safetensors" in reason, reason
    data[8] ^= 0xFF  # header length
    model.write_bytes(bytes(data))
    ok, reason = quick_check(path)
    assert not ok and "model.safetensors" in reason, reason
