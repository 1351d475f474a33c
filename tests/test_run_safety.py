"""One run per output folder, retries that finish, outputs others can read: through the real CLI, with real
processes (a second trainer started while the first runs, SIGKILL of the holder, a kill between export and
`completed`, and kills between the export's own writes: after the LoRA files, after the manifest)."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import ROOT, parse_events, run_cli, write_config
from lora_trainer.outputs.final import MANIFEST_NAME
from lora_trainer.outputs.model_card import CARD_NAME
from lora_trainer.runtime.run_lock import LINEAGE_KEY, LOCK_NAME


def _cfg(tmp_path: Path, model, dataset, name="c.json", out="out", **extra) -> Path:
    fields = dict(dataset_path=str(dataset), base_model=str(model), output_path=str(tmp_path / out),
                  trigger_words=["ohwx"], resolution=64, max_train_steps=3, log_every_n_steps=1, lora_rank=4,
                  checkpointing_steps=2)
    return write_config(tmp_path / name, **{**fields, **extra})


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_run_on_the_same_output_is_refused_and_a_killed_holder_never_blocks(tmp_path, tiny_models, dataset):
    cfg = _cfg(tmp_path, tiny_models["sd15"], dataset, max_train_steps=400, checkpointing_steps=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    holder = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg), "--run-id", "first"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in holder.stdout:  # handshake: the holder has written a checkpoint, so the folder has content
            if json.loads(line)["type"] == "checkpoint":
                break
        before = _snapshot(tmp_path / "out")
        second = run_cli("--config", str(cfg), "--run-id", "second")
        assert second.returncode == 8, second.stderr[-3000:]
        err = second.last("error")
        assert err["code"] == "output_in_use" and err["exit_code"] == 8
        assert err["details"]["holder"]["pid"] == holder.pid and err["details"]["holder"]["run_id"] == "first"
        assert str(holder.pid) in err["message"]
        assert [e["type"] for e in second.events] == ["error"]  # refused before preflight, loading or writing
        # The holder keeps writing checkpoints meanwhile; what the second run must not have touched is what existed.
        after = _snapshot(tmp_path / "out")
        assert {k: v for k, v in after.items() if k in before and not k.startswith("checkpoints/")} == \
            {k: v for k, v in before.items() if not k.startswith("checkpoints/")}

        check = run_cli("--config", str(cfg), "--validate-only")  # takes no lock; reports the holder
        busy = [w for w in check.last("validation")["warnings"] if w["code"] == "output_in_use"]
        assert busy and str(holder.pid) in busy[0]["message"]
        assert check.last("validation")["summary"]["output"]["in_use_by"]["run_id"] == "first"
    finally:
        holder.send_signal(signal.SIGKILL)  # no handler runs: only the kernel can release the lock
        holder.communicate(timeout=60)
    assert (tmp_path / "out" / LOCK_NAME).exists()  # the file stays; the lock died with its process
    check = run_cli("--config", str(cfg), "--validate-only")
    assert not [w for w in check.last("validation")["warnings"] if w["code"] == "output_in_use"]
    newest = max(int(p.name.split("-")[1]) for p in (tmp_path / "out" / "checkpoints").glob("step-*"))
    resumed = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, name="r.json",
                                           max_train_steps=newest + 1, resume="auto")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.last("resumed")["step"] == newest and resumed.last("completed")["steps"] == newest + 1


def test_a_run_killed_after_its_export_is_finished_by_a_retry_bitwise(tmp_path, tiny_models, dataset):
    old = os.umask(0o027)  # the outputs must follow the umask, not keep the temp file's 0600
    try:
        cfg = _cfg(tmp_path, tiny_models["sd15"], dataset, resume="auto")
        killed = run_cli("--config", str(cfg), env={"TRAIN_LORA_TEST_KILL_AFTER_EXPORT": "1"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert not killed.of_type("completed")
        out = tmp_path / "out"
        lora, peft = out / "lora.safetensors", out / "pytorch_lora_weights.safetensors"
        first = lora.read_bytes(), peft.read_bytes()
        with safe_open(str(lora), "pt") as f:
            lineage = f.metadata()[LINEAGE_KEY]
        assert json.loads((out / "training_manifest.json").read_text())["lineage"] == lineage

        retry = run_cli("--config", str(cfg))
        assert retry.returncode == 0, retry.stderr[-3000:]
        done = retry.last("completed")
        assert done["steps"] == 3 and retry.last("resumed")["step"] == 3
        assert not retry.of_type("step")  # nothing trained again
        assert [e for e in retry.of_type("checkpoint")] == []  # the final checkpoint is already this state
        assert (lora.read_bytes(), peft.read_bytes()) == first, "a retry must rewrite the same files"
        validation = retry.last("run_started")
        assert validation["start_step"] == 3
        for path in (lora, peft, out / "training_manifest.json"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o640, (path, oct(path.stat().st_mode))
    finally:
        os.umask(old)

    # A LoRA of another run (another lineage) in a folder whose checkpoints are this run's is never overwritten.
    other = run_cli("--config", str(_cfg(tmp_path, tiny_models["sd15"], dataset, name="o.json", out="other")))
    assert other.returncode == 0, other.stderr[-3000:]
    foreign = (tmp_path / "other" / "lora.safetensors").read_bytes()
    lora.write_bytes(foreign)
    refused = run_cli("--config", str(cfg))
    assert refused.returncode == 2
    assert [p["code"] for p in refused.last("error")["details"]["problems"]] == ["output_exists"]
    assert lora.read_bytes() == foreign


def _killed_at(cfg: Path, point: str) -> tuple[list[dict], str]:
    """Run the CLI until it announces the TRAIN_LORA_TEST_HOLD point (runtime/signals.py), then SIGKILL it there:
    no handler runs, as with an OOM killer or a pulled plug. Returns (events, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TRAIN_LORA_TEST_HOLD": point}
    with open(cfg.with_suffix(".stdout"), "w+") as out:  # a file: nobody reads stdout while we wait on stderr
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg)],
                                stdout=out, stderr=subprocess.PIPE, text=True, env=env)
        stderr, held = [], False
        for line in proc.stderr:
            stderr.append(line)
            if line.strip() == f"train_lora test hold: {point}":
                held = True
                proc.send_signal(signal.SIGKILL)
                break
        stderr.append(proc.communicate(timeout=120)[1])
        assert held and proc.returncode == -signal.SIGKILL, "".join(stderr)[-3000:]
        out.seek(0)
        return parse_events(out.read()), "".join(stderr)


def _whole_lora(path: Path) -> dict[str, str]:
    """Every tensor of the file reads back (a torn file fails here); returns its metadata."""
    with safe_open(str(path), "pt") as f:
        assert all(f.get_tensor(k).numel() for k in f.keys())  # noqa: SIM118 - not a dict
        return f.metadata()


@pytest.mark.parametrize("point", ["export_lora", "export_manifest"])
def test_a_kill_between_the_export_writes_leaves_whole_files_and_a_retry_completes(tmp_path, tiny_models, dataset,
                                                                                   point):
    """README, "A retry always finishes": a run killed while exporting leaves no torn file (each is written to a temp
    name and renamed), and a retry with resume "auto" trains nothing and writes the outputs the kill cut short."""
    cfg = _cfg(tmp_path, tiny_models["sd15"], dataset, resume="auto")
    events, stderr = _killed_at(cfg, point)
    assert not [e for e in events if e["type"] in ("completed", "error")] and "Traceback" not in stderr
    out = tmp_path / "out"
    lora, peft = out / "lora.safetensors", out / "pytorch_lora_weights.safetensors"
    manifest, card = out / MANIFEST_NAME, out / CARD_NAME
    lineage = _whole_lora(lora)[LINEAGE_KEY]
    _whole_lora(peft)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "a temporary file was left"
    if point == "export_lora":
        assert not manifest.exists() and not card.exists()
    else:  # the manifest is whole and this run's; the model card was not written yet
        assert json.loads(manifest.read_text())["lineage"] == lineage and not card.exists()
    first = lora.read_bytes(), peft.read_bytes()

    retry = run_cli("--config", str(cfg))
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert retry.last("resumed")["step"] == 3 and not retry.of_type("step"), "nothing is trained again"
    done = retry.last("completed")
    assert manifest.is_file() and card.is_file(), "the retry wrote what the kill cut short"
    assert done["steps"] == 3 and all(Path(p).is_file() for p in done["outputs"].values()), done["outputs"]
    assert {k: Path(done["outputs"][k]) for k in ("lora", "peft_lora", "manifest", "model_card")} == \
        {"lora": lora, "peft_lora": peft, "manifest": manifest, "model_card": card}
    assert (lora.read_bytes(), peft.read_bytes()) == first, "a retry must rewrite the same LoRA files"
    assert json.loads(manifest.read_text())["lineage"] == lineage and card.read_text().startswith("---")
