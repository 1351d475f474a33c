"""Test helpers that conftest.py does not have: a probe that records, from inside a real CLI process, what the
events and files cannot show (the optimizer class and its groups' learning rates, gradient checkpointing calls,
each rank's batches, the captions and augmentations a step used), and that can inject real host allocator failures
into a step (TRAIN_LORA_PROBE_HOST_OOM_STEP, TRAIN_LORA_PROBE_MEMORYERROR_STEP), a bug (TRAIN_LORA_PROBE_BUG_STEP), or hold the latent caching after
its first entry until a signal comes (TRAIN_LORA_PROBE_HOLD_CACHING).

The probe is a ``sitecustomize`` module on PYTHONPATH, so the process under test is the unmodified
``train_lora.py``; it patches only by wrapping (the wrapped code still runs) and writes one JSON file per process
at exit: ``<dir>/probe.<pid>.json``."""
from __future__ import annotations

import json
import os
from pathlib import Path

PROBE = r'''
import atexit, importlib.abc, importlib.machinery, json, os, sys

_OUT = os.environ["TRAIN_LORA_PROBE_DIR"]
_rec = {"rank": int(os.environ.get("RANK", "0") or 0), "argv": list(sys.argv), "optimizers": [], "checkpoint_calls": 0,
        "gradient_checkpointing": {}, "batches": [], "captions": [], "pixels": []}


def _dump():
    with open(os.path.join(_OUT, f"probe.{os.getpid()}.json"), "w") as fh:
        json.dump(_rec, fh)


atexit.register(_dump)


def _patch_torch():
    import torch.utils.checkpoint as ckpt
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    real = ckpt.checkpoint

    def counting(*a, **k):
        _rec["checkpoint_calls"] += 1
        return real(*a, **k)

    ckpt.checkpoint = counting

    def pre_step(opt, args, kwargs):
        entry = {"class": f"{type(opt).__module__}.{type(opt).__qualname__}",
                 "lrs": [g["lr"] for g in opt.param_groups], "sizes": [len(g["params"]) for g in opt.param_groups]}
        if entry not in _rec["optimizers"]:
            _rec["optimizers"].append(entry)

    register_optimizer_step_pre_hook(pre_step)


def _patch_trainer(mod):
    import lora_trainer.training.batch as inputs  # where _loss's captions and pixels come from

    real_caption = inputs.build_caption

    def build_caption(*a, **k):
        out = real_caption(*a, **k)
        _rec["captions"].append(out)
        return out

    inputs.build_caption = build_caption
    real_pixels = inputs.load_pixels

    def load_pixels(img, *, random_crop, rng, flip=False):
        arr, tids = real_pixels(img, random_crop=random_crop, rng=rng, flip=flip)
        _rec["pixels"].append({"rel": img.rel, "flip": bool(flip), "shape": list(arr.shape),
                               "crop": [int(tids[2]), int(tids[3])],
                               "left": float(arr[:, :, 0].sum()), "right": float(arr[:, :, -1].sum())})
        return arr, tids

    inputs.load_pixels = load_pixels
    real_loss, real_train = mod.Trainer._loss, mod.Trainer.train

    def _loss(self, batch, epoch, batch_index):
        # Real allocator failures inside a step: torch's CPU allocator refusing 1 EiB, Python's MemoryError.
        if self.progress.global_step + 1 == int(os.environ.get("TRAIN_LORA_PROBE_HOST_OOM_STEP", "0")):
            import torch

            torch.empty(1 << 60, dtype=torch.uint8)
        if self.progress.global_step + 1 == int(os.environ.get("TRAIN_LORA_PROBE_MEMORYERROR_STEP", "0")):
            bytearray(1 << 60)
        if self.progress.global_step + 1 == int(os.environ.get("TRAIN_LORA_PROBE_BUG_STEP", "0")):
            {}["a key that is not there"]  # a plain bug (KeyError) inside a step
        _rec["batches"].append({"epoch": epoch, "batch_index": batch_index, "batch": list(batch),
                                "buckets": [list(self.by_index[i].bucket) for i in batch]})
        return real_loss(self, batch, epoch, batch_index)

    def train(self):
        _rec["gradient_checkpointing"] = {n: bool(getattr(m, "is_gradient_checkpointing", False))
                                          for n, m in self.comps.denoisers.items()}
        _rec["world"] = self.world
        return real_train(self)

    mod.Trainer._loss, mod.Trainer.train = _loss, train
    import lora_trainer.data.images as data

    real_build = data.LatentCache.build

    def build(self, vae, images, *, progress, **k):
        def hold_after_first(done, total):
            progress(done, total)
            if done >= 1 and os.environ.get("TRAIN_LORA_PROBE_HOLD_CACHING") and not _rec.get("held"):
                # Mid-caching (one entry encoded, more to come): announce, then wait for the test's signal; the
                # trainer's handler runs in this thread during the wait, and raises if it means to stop.
                _rec["held"] = True
                print("probe hold: caching_latents", file=sys.stderr, flush=True)
                import threading

                threading.Event().wait(60)

        return real_build(self, vae, images, progress=hold_after_first, **k)

    data.LatentCache.build = build  # the class, wherever the trainer reaches it from


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patch lora_trainer.training.trainer once it has been imported, without importing it earlier than the CLI does."""

    def find_spec(self, name, path, target=None):
        if name != "lora_trainer.training.trainer":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _patch_torch()
            _patch_trainer(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterImport())
'''


def probe_env(probe_dir: Path) -> dict[str, str]:
    """Environment for a CLI process (or a launcher and its ranks) that records into probe_dir."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (str(probe_dir), root, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "TRAIN_LORA_PROBE_DIR": str(probe_dir)}


def probe_records(probe_dir: Path) -> list[dict]:
    """One record per training process (processes that never imported the trainer, e.g. a launcher, left out)."""
    records = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("probe.*.json"))]
    return sorted((r for r in records if "world" in r), key=lambda r: r["rank"])


def assert_report(out_dir: Path, *, status: str, step: int, total_steps: int, keep_tokens: int = 1) -> None:
    """report.html and loss_curve.png as the README promises them (at the end and on interruption): the status
    and step, the loss curve drawn and embedded, and the settings shown unredacted (keep_tokens is a count)."""
    import base64
    import re

    from PIL import Image

    from lora_trainer.outputs import plots

    text = (out_dir / "report.html").read_text()
    assert re.search(rf"Status: <b>{status}</b>,\s+step {step} of {total_steps},", text), text[:3000]
    assert f"<tr><th>keep_tokens</th><td>{keep_tokens}</td></tr>" in text
    curve = (out_dir / plots.LOSS_PNG).read_bytes()
    with Image.open(out_dir / plots.LOSS_PNG) as im:
        rgb = im.convert("RGB")
        # the smoothed loss line is drawn: pixels of its colour (antialiased: near it)
        want = tuple(int(plots._SMOOTH[i:i + 2], 16) for i in (1, 3, 5))
        assert any(sum(abs(a - b) for a, b in zip(px, want)) < 24 for px in rgb.getdata()), "no loss line drawn"
    embedded = re.search(r'<img src="data:image/png;base64,([^"]+)" alt="loss_curve.png">', text)
    assert embedded and base64.b64decode(embedded.group(1)) == curve, "the loss curve is not embedded in the report"


def train_and_class_sets(root: Path, n_train: int, n_reg: int) -> Path:
    """``root/train`` (captioned with the trigger, a mask per image in ``root/masks``: the left half trains) and
    ``root/reg`` (uncaptioned: the class prompt); the issue-24 methods' tests train on them."""
    from PIL import Image

    from lora_trainer.testing.dataset import make_dataset

    make_dataset(root / "train", n=n_train, trigger="ohwx")
    make_dataset(root / "reg", n=n_reg, trigger=None, seed=5, with_captions=False)
    (root / "masks").mkdir()
    for src in sorted((root / "train").glob("img_*.*")):
        if src.suffix != ".txt":
            w, h = Image.open(src).size
            mask = Image.new("L", (w, h), 0)
            mask.paste(255, (0, 0, w // 2, h))
            mask.save(root / "masks" / f"{src.stem}.png")
    return root
