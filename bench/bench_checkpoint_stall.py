"""What an interval checkpoint costs the step loop: steps with a checkpoint every --every steps against none, through
the real CLI on a tiny model with a LoRA large enough for the write to matter. A benchmark, not a test.

    python3 bench/bench_checkpoint_stall.py [--family sd15] [--steps 17] [--every 4] [--rank 128] [--rounds 2] [--cli PATH]

The stall per checkpoint is (training time with checkpoints - without) / checkpoints, from the `step` events'
arrival times (the first step, warm-up, excluded). ``--cli`` times another checkout's train_lora.py (e.g.
one from before the background writer) on the same model and data. Prints the table last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _train(cli: Path, work: Path, model: Path, data: Path, name: str, steps: int, rank: int, every: int | None,
           background=None):
    cfg = work / f"{name}.json"
    cfg.write_text(json.dumps({"dataset_path": str(data), "base_model": str(model), "output_path": str(work / name),
                               "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64,
                               "max_train_steps": steps, "log_every_n_steps": 1, "lora_rank": rank,
                               "target_modules": "all_linear", "checkpointing_steps": every,
                               "checkpoints_total_limit": 2,
                               **({} if background is None else {"background_checkpoints": background})}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(cli), "--config", str(cfg)], cwd=cli.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    arrivals, size = {}, 0
    for line in proc.stdout:
        ev = json.loads(line)
        if ev["type"] == "step":
            arrivals[ev["step"]] = time.monotonic()
        elif ev["type"] == "checkpoint":
            size = ev.get("size_bytes") or size
    if proc.wait() != 0:
        raise SystemExit(f"{cli} failed on {name}")
    return (arrivals[steps] - arrivals[1]) / (steps - 1), size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sd15")
    ap.add_argument("--steps", type=int, default=17)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cli", action="append", default=[], help="another train_lora.py to time beside this one")
    args = ap.parse_args(argv)
    from lora_trainer.testing.tiny import make_dataset, make_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    model = make_tiny_pipeline(work / "model", args.family)
    data = make_dataset(work / "data", n=4, trigger="ohwx")
    # (label, train_lora.py, background_checkpoints): this checkout written in place and on the writer thread,
    # then any other checkout as it is
    runs = [("here, in place", ROOT / "train_lora.py", False), ("here, background", ROOT / "train_lora.py", True),
            *((str(Path(c).resolve().parent), Path(c).resolve(), None) for c in args.cli)]
    rows = []
    for i, (label, cli, background) in enumerate(runs):
        plain, every, size = [], [], 0
        for r in range(args.rounds):  # alternated, so the neighbours' load hits both alike
            plain.append(_train(cli, work, model, data, f"p{i}_{r}", args.steps, args.rank, None, background)[0])
            s, size = _train(cli, work, model, data, f"e{i}_{r}", args.steps, args.rank, args.every, background)
            every.append(s)
        p, e = statistics.median(plain), statistics.median(every)
        checkpoints = len(range(args.every, args.steps, args.every))  # the last step's is the final save: not timed
        rows.append((label, p, e, (e - p) * (args.steps - 1) / checkpoints, size))
    print(f"\n{'checkout':<40} | s/step, no checkpoints | s/step, one per {args.every} | stall/checkpoint | checkpoint")
    for name, p, e, stall, size in rows:
        print(f"{name[-40:]:<40} | {p:22.3f} | {e:16.3f} | {stall:14.3f} s | {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
