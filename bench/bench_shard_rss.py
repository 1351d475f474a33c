"""Host memory of shard_base at load: each of two CPU processes (gloo) loads a FLUX.1-shaped transformer, adds LoRA
and shards it (lora_trainer.distributed.shard), reporting its anonymous (private) and file-backed (page cache, shared) resident
memory after each phase. Prints a table.

    python bench/bench_shard_rss.py [--layers 4 --single-layers 8 --heads 8]

When the file holds the training dtype, the loaded parameters are memory-mapped from it (file-backed, shared by the
processes) and each process's private memory grows by its shard only; a file in another dtype is cast whole in every
process first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _mib() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) // 1024
    return out


def worker(folder: str, dtype_name: str) -> None:
    import torch
    import torch.distributed as dist
    from diffusers import FluxTransformer2DModel

    from lora_trainer.families import SPECS
    from lora_trainer.adapters.lora import add_lora
    from lora_trainer.distributed.shard import shard_denoisers

    dist.init_process_group("gloo")
    phases = {"start": _mib()}
    model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=getattr(torch, dtype_name))
    phases["loaded"] = _mib()
    add_lora(model, rank=16, alpha=16, dropout=0.0, targets=SPECS["flux1"].targets("all_linear"), use_dora=False,
             path="target_modules")
    model.enable_gradient_checkpointing()
    shard_denoisers({"transformer": model}, SPECS["flux1"].blocks, torch.device("cpu"), dist.get_world_size())
    phases["sharded"] = _mib()
    print("RESULT " + json.dumps({"rank": dist.get_rank(), "phases": phases}), flush=True)
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--single-layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    args = ap.parse_args(argv)
    import torch
    from diffusers import FluxTransformer2DModel

    rows, whole, params = [], {"float32": 4, "bfloat16": 2}, 0
    with tempfile.TemporaryDirectory(prefix="bench_shard_rss_") as work:
        for file_dtype, train_dtype in (("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")):
            folder = Path(work) / file_dtype
            if not folder.exists():
                torch.manual_seed(0)
                model = FluxTransformer2DModel(num_layers=args.layers, num_single_layers=args.single_layers,
                                               attention_head_dim=64, num_attention_heads=args.heads,
                                               joint_attention_dim=256, pooled_projection_dim=128, in_channels=16)
                model.to(getattr(torch, file_dtype)).save_pretrained(folder)
                params = sum(p.numel() for p in model.parameters())
                del model
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                   __file__, "--worker", str(folder), train_dtype], capture_output=True, text=True,
                                  env=env, timeout=900)
            results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or len(results) != 2:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            base_mib = params * whole[train_dtype] / 2 ** 20
            for r in sorted(results, key=lambda r: r["rank"]):
                ph = r["phases"]
                rows.append((f"{file_dtype} file, {train_dtype} training", r["rank"], f"{base_mib:.0f}",
                             ph["loaded"]["RssAnon"] - ph["start"]["RssAnon"],
                             ph["sharded"]["RssAnon"] - ph["start"]["RssAnon"], ph["sharded"]["RssFile"],
                             ph["sharded"]["VmHWM"]))
    head = ("case", "rank", "base MiB", "private after load", "private after shard", "file-backed after",
            "peak RSS")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print(f"\nshard_base host memory at load, 2 CPU processes, {params / 1e6:.1f} M parameters (MiB per process)")
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
