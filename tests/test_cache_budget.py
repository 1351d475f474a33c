"""Caches over the host-memory budget stay on disk and are read per step, and train the same LoRA.

The reads are observed from outside the trainer with inotify on the cache folders, counted as each step event
arrives (an open queues its event before the step that made it is reported). A read is a run of IN_OPEN events on
an entry ended by its IN_CLOSE_NOWRITE: safetensors opens a file twice per load, and inotify merges an event with
an identical one still unread, so opens alone count neither once per load nor reliably. Caching writes under a
temporary name (a leading dot) and renames, so in a fresh run every open of an entry's own name is a read. inotify
does not watch subfolders: the text cache's 256 (text_cache.path_for: the key's first two hex digits) are made and
watched beforehand."""
from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, parse_events, write_config

IN_OPEN, IN_CLOSE_NOWRITE = 0x20, 0x10
STEPS = 6  # more steps than the 4 images: a cache that kept what it read would read fewer files than steps


class Reads:
    """The entries read in some folders (not temporary files: a leading dot), by a name for each (inotify)."""

    def __init__(self, folders: dict[Path, str]):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip(f"inotify unavailable: errno {ctypes.get_errno()}")
        self.names = {}
        for folder, name in folders.items():
            folder.mkdir(parents=True, exist_ok=True)
            wd = libc.inotify_add_watch(self.fd, str(folder).encode(), IN_OPEN | IN_CLOSE_NOWRITE)
            assert wd >= 0, f"inotify_add_watch {folder}: errno {ctypes.get_errno()}"
            self.names[wd] = name
        self.files: dict[str, list[str]] = {name: [] for name in self.names.values()}
        self._open: set[tuple[int, str]] = set()  # entries inside a run of opens

    def drain(self) -> dict[str, int]:
        """Reads so far (cumulative), per folder name."""
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return {name: len(files) for name, files in self.files.items()}
            at = 0
            while at < len(buf):
                wd, mask, _cookie, n = struct.unpack_from("iIII", buf, at)
                name = buf[at + 16:at + 16 + n].rstrip(b"\0").decode()
                at += 16 + n
                if not name or name.startswith("."):  # the folder itself, a temporary file
                    continue
                if mask & IN_OPEN and (wd, name) not in self._open:
                    self._open.add((wd, name))
                    self.files[self.names[wd]].append(name)
                elif mask & IN_CLOSE_NOWRITE:
                    self._open.discard((wd, name))

    def close(self) -> None:
        os.close(self.fd)


def _run(tmp_path: Path, name: str, model: Path, dataset: Path, **extra):
    """The CLI, with the reads in its cache folders counted as each step event arrives: (events, LoRA, reads after
    each step, the files read)."""
    out = tmp_path / name
    cfg = write_config(tmp_path / f"{name}.json", dataset_path=str(dataset), base_model=str(model),
                       output_path=str(out), trigger_words=["ohwx"], resolution=64, lora_rank=4, batch_size=1,
                       max_train_steps=STEPS, log_every_n_steps=1, caption_dropout_rate=0.5, **extra)
    text = out / "cache" / "text_embeddings"
    reads = Reads({out / "cache" / "latents": "latents", **{text / f"{i:02x}": "text" for i in range(256)}})
    try:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        lines, per_step = [], {}
        for line in proc.stdout:
            lines.append(line)
            event = json.loads(line)
            if event["type"] == "run_started":
                per_step[0] = reads.drain()
            if event["type"] == "step":  # its reads happened before the trainer reported it
                per_step[event["step"]] = reads.drain()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=120) == 0, stderr[-3000:]
        per_step["end"] = reads.drain()
        return parse_events("".join(lines)), load_file(out / "lora.safetensors"), per_step, reads.files
    finally:
        reads.close()


def test_caches_over_the_budget_are_read_from_disk_and_train_the_same_lora(tmp_path, tiny_models, dataset):
    events, ref, per_step, _ = _run(tmp_path, "memory", tiny_models["sd15"], dataset)
    plan = [e for e in events if e["type"] == "run_started"][-1]["latent_cache"]
    assert plan["placement"] == "host" and plan["total_bytes"] == 4 * 4 * 8 * 8 * 4  # 4 images, 4x8x8 fp32
    assert per_step["end"] == {"latents": 0, "text": 0}, "host caches: no step reads a file"

    events, got, per_step, files = _run(tmp_path, "disk", tiny_models["sd15"], dataset, cache_host_budget_gb=1e-9)
    started = [e for e in events if e["type"] == "run_started"][-1]
    assert started["latent_cache"]["placement"] == "disk" and started["text_cache"]["placement"] == "disk"
    entries = {p.name for p in (tmp_path / "disk" / "cache" / "latents").glob("*.safetensors")}
    assert len(entries) == 4
    # Every step read its image's latents from disk (batch 1: one file a step), none were kept after a read.
    assert [per_step[k]["latents"] >= k for k in range(1, STEPS + 1)] == [True] * STEPS, per_step
    assert per_step["end"]["latents"] == STEPS and set(files["latents"]) <= entries, files["latents"]
    # Text entries are read at the step that first needs them and then kept in the small LRU: step 1 read one,
    # no file twice.
    text = files["text"]
    assert per_step[1]["text"] >= 1 and len(text) == len(set(text)), per_step
    assert all(name.endswith(".safetensors") for name in text), text
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_validate_only_plans_both_caches(tmp_path):
    import dataclasses

    from lora_trainer.preflight.run import run_preflight
    from tests.test_dataset_scan import cfg_for
    from tests.test_preflight import standin_model
    from lora_trainer.testing.tiny import make_dataset

    data = make_dataset(tmp_path / "data", n=5, sizes=[(96, 64), (64, 96)])
    model = standin_model(tmp_path / "model", family="sdxl")
    cfg = dataclasses.replace(cfg_for(tmp_path, data, resolution=64, caption_dropout_rate=0.1),
                              base_model=str(model))
    caches = run_preflight(cfg).summary["caches"]
    # 64 px buckets of 96x64 / 64x96 images: 64x64 (the only shape at that budget), 4 channels, fp32
    assert caches["latents"] == {"total_bytes": 5 * 4 * 8 * 8 * 4, "placement": "host"}
    text = caches["text"]
    assert text["entries"] == len({p.read_text() for p in data.glob("*.txt")}) + 1  # + "" for caption dropout
    assert text["bytes_per_entry"] == (77 * 2048 + 1280) * 2 and text["placement"] == "host"
    tiny = run_preflight(dataclasses.replace(cfg, cache_host_budget_gb=1e-9)).summary["caches"]
    assert tiny["latents"]["placement"] == "disk" and tiny["text"]["placement"] == "disk"
