"""How long SIGTERM takes to stop a run (finish the step, save the checkpoint, exit 143): docker stop waits 10 s
by default before SIGKILL. A benchmark, not a test: the figure depends on the machine and its neighbours.

    python3 bench/bench_stop.py [--family sd15] [--rounds 5] [--after-step 3]

Builds a tiny random pipeline (lora_trainer.testing.tiny), trains it through the real CLI, sends SIGTERM once the
`step` event of --after-step arrives, and times signal -> exit. Prints the table last.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sd15")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--after-step", type=int, default=3)
    args = ap.parse_args(argv)
    from lora_trainer.testing.tiny import make_dataset, make_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="bench_stop_"))
    model = make_tiny_pipeline(work / "model", args.family)
    data = make_dataset(work / "data", n=4, trigger="ohwx")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    took, codes, ckpt_bytes = [], set(), []
    for r in range(args.rounds):
        cfg = work / f"c{r}.json"
        cfg.write_text(json.dumps({"dataset_path": str(data), "base_model": str(model), "output_path": str(work / f"o{r}"),
                                   "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64,
                                   "max_train_steps": 10000, "log_every_n_steps": 1, "lora_rank": 4,
                                   "checkpointing_steps": None}))
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        sent = None
        for line in proc.stdout:
            ev = json.loads(line)
            if sent is None and ev["type"] == "step" and ev["step"] >= args.after_step:
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)
            if ev["type"] == "checkpoint":
                ckpt_bytes.append(ev["size_bytes"])
        codes.add(proc.wait())
        took.append(time.monotonic() - sent)
    rows = [("machine", f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, torch threads "
                        f"{os.environ.get('OMP_NUM_THREADS', 'auto')}"),
            ("model", f"tiny {args.family} (lora_trainer.testing.tiny), rank 4, 64 px"),
            ("rounds", str(args.rounds)), ("exit codes", ", ".join(map(str, sorted(codes)))),
            ("SIGTERM -> exit median", f"{statistics.median(took):.3f} s"),
            ("min / max", f"{min(took):.3f} s / {max(took):.3f} s"),
            ("checkpoint size", f"{statistics.median(ckpt_bytes) / 1024:.0f} KiB" if ckpt_bytes else "n/a")]
    width = max(len(k) for k, _ in rows)
    print(f"\n{'stop benchmark':<{width}} | docker stop's default grace period is 10 s")
    print("-" * (width + 50))
    for k, v in rows:
        print(f"{k:<{width}} | {v}")
    return 0 if codes == {128 + signal.SIGTERM} else 1


if __name__ == "__main__":
    sys.exit(main())
