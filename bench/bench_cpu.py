"""CPU speed benchmark: train_lora (its real CLI) against the naive diffusers-example loop, interleaved.

    python3 bench/bench_cpu.py [--model sdxl|flux] [--steps 14] [--rounds 2] [--skip 3] [--profile auto|on|off]
                               [--tiny] [--keep DIR] [--t5-layers N]

Models (``--model``, random weights, bench/models.py):
- ``sdxl`` (default): the quarter-width SDXL (UNet ~160M parameters), LoRA rank 16 on to_q/to_k/to_v/to_out.0;
  target train_lora <= 0.8x naive.
- ``flux``: the reduced FLUX.1-dev (transformer 6 heads x 128, 2 double + 4 single blocks, 82M; VAE, CLIP-L and T5
  at a quarter of their widths, full depths; ``--t5-layers`` overrides the T5 depth), LoRA rank 16 on the FLUX
  family's default targets (preset attention_mlp); naive = bench/naive_flux.py (diffusers'
  train_dreambooth_lora_flux.py step: VAE + CLIP + T5 every step); target train_lora <= 0.5x naive.
Both at 256 px, batch 1, fp32. Data: 8 generated 256x256 images with captions
(lora_trainer.testing.tiny.make_dataset). Both trainers run as subprocesses, alternating A, B, A, B, ... (``--rounds``
pairs), so machine noise (other processes on the box) hits both; nothing else of ours runs meanwhile.
Both children get OMP_NUM_THREADS=1 by default (``--threads``): on a shared 2-core machine, a process with two
OpenMP threads stalls at every parallel region whenever anything else is runnable (measured 3-35x slower
steps), which buries the comparison in noise; ``--threads 0`` leaves torch's default.

- train_lora: ``train_lora.py --config c.json`` with log_every_n_steps 1, checkpointing_steps null,
  cache_latents true (and its default cache_text_embeddings true), resolution 256, min_bucket_resolution 64,
  lora_rank 16. Step time = difference of consecutive ``step`` events' ``elapsed_s`` (time spent in the
  optimizer step, measured by the trainer).
- naive: bench/naive_loop.py (SDXL) or bench/naive_flux.py (FLUX): VAE + text encoders + denoiser every step,
  per-part timers.

Reported: median steady-state step time (the first ``--skip`` steps of each run left out), the minimum, the
per-step CPU time of the child (from /proc, sampled when each step line arrives: waiting for the CPU does not
count, spinning does), time from process start to the first finished step, total wall time, peak RSS (wait4),
the ratios train_lora / naive, the naive step's breakdown, and ``--validate-only`` latency on 1,000 images
(bench/bench_validate_only.py as a subprocess). With ``--profile auto`` (default) the in-process profile of
train_lora's step (bench/profile_step.py) runs when the model's target is missed. The table is the last output.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = {"sdxl": 0.8, "flux": 0.5}
TARGET = TARGETS["sdxl"]  # set from --model in main()
NAIVE = {"sdxl": "naive_loop.py", "flux": "naive_flux.py"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench_cpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- setup
def model_dir_name(kind: str, tiny: bool, t5_layers: int | None) -> str:
    if kind == "sdxl":
        return "model-tiny" if tiny else "model"  # "model": the name --keep folders of earlier sessions use
    return "model-flux-tiny" if tiny else f"model-flux-reduced{f'-t5x{t5_layers}' if t5_layers else ''}"


def prepare(work: Path, *, tiny: bool, n_images: int, resolution: int, kind: str = "sdxl",
            t5_layers: int | None = None) -> tuple[Path, Path]:
    from lora_trainer.testing.tiny import make_dataset

    sys.path.insert(0, str(BENCH))
    from models import make_flux_model, make_model

    model, data = work / model_dir_name(kind, tiny, t5_layers), work / f"data-{resolution}"
    if not (model / "model_index.json").is_file():
        if kind == "flux":
            make_flux_model(model, "tiny" if tiny else "reduced", t5_layers=t5_layers)
        else:
            make_model(model, "tiny" if tiny else "quarter")
    if not data.is_dir():
        make_dataset(data, n_images, sizes=[(resolution, resolution)])
    return model, data


def train_lora_config(work: Path, model: Path, data: Path, out: Path, *, steps: int, resolution: int,
                      compile_blocks: bool = False) -> Path:
    cfg = {"dataset_path": str(data), "base_model": str(model), "output_path": str(out), "trigger_words": ["ohwx"],
           "max_train_steps": steps, "batch_size": 1, "log_every_n_steps": 1, "checkpointing_steps": None,
           "cache_latents": True, "resolution": resolution, "min_bucket_resolution": 64, "lora_rank": 16,
           "heartbeat_seconds": 600, "overwrite_output": True}
    if compile_blocks:
        cfg["compile"] = True
    path = work / f"config_{out.name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


# ------------------------------------------------------------------------------------------- children
def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads
    except (OSError, IndexError, ValueError):
        return None


def _runnable() -> int | None:
    """Tasks currently runnable on the box (/proc/loadavg's 4th field), ours included."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def run_child(cmd: list[str], *, step_re: re.Pattern, stream: str, env: dict, timeout: float) -> dict:
    """Run cmd; timestamp every line; sample the child's CPU time whenever a step line arrives."""
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    lines = {"stdout": [], "stderr": []}
    step_marks: list[tuple[float, float | None]] = []
    runnable: list[int] = []

    def reader(name: str, fh) -> None:
        for line in fh:
            now = time.monotonic()
            lines[name].append((now - t0, line.rstrip("\n")))
            if name == stream and step_re.search(line):
                step_marks.append((now - t0, _cpu_seconds(proc.pid)))
                r = _runnable()
                if r is not None:
                    runnable.append(r)

    threads = [threading.Thread(target=reader, args=(n, getattr(proc, n)), daemon=True) for n in lines]
    for th in threads:
        th.start()
    deadline = t0 + timeout
    status = rusage = None
    while status is None:
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status, rusage = st, ru
            break
        if time.monotonic() > deadline:
            proc.kill()
            _, status, rusage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    wall = time.monotonic() - t0
    for th in threads:
        th.join(timeout=10)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": wall, "maxrss_gib": rusage.ru_maxrss / 2**20,
            "cpu_s": rusage.ru_utime + rusage.ru_stime, "stdout": lines["stdout"], "stderr": lines["stderr"],
            "step_marks": step_marks, "load_start": load0, "load_end": os.getloadavg()[0],
            "runnable_mean": statistics.mean(runnable) if runnable else None}


def _cpu_per_step(marks: list[tuple[float, float | None]]) -> list[float]:
    cpu = [c for _, c in marks]
    return [b - a for a, b in zip(cpu, cpu[1:]) if a is not None and b is not None]


def parse_train_lora(res: dict) -> dict:
    events = []
    for _, line in res["stdout"]:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    steps = [e for e in events if e.get("type") == "step"]
    elapsed = [e["elapsed_s"] for e in steps]
    step_s = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    first = next((t for t, line in res["stdout"] if '"type":"step"' in line), None)
    err = next((e for e in events if e.get("type") == "error"), None)
    # Arrival time (s after spawn) of the first event of each setup phase: where start-up time goes.
    phases: dict[str, float] = {}
    for (t, line), e in zip([x for x in res["stdout"] if x[1].startswith("{")], events):
        key = e.get("phase") if e.get("type") in ("status", "progress") else e.get("type")
        if key in ("loading_model", "caching_latents", "caching_text", "run_started", "step") and key not in phases:
            phases[key] = t
    return {"step_s": step_s, "first_step_s": first, "cpu_step_s": _cpu_per_step(res["step_marks"]),
            "error": err, "final_loss": steps[-1]["loss"] if steps else None, "phases": phases}


def parse_naive(res: dict) -> dict:
    steps = []
    for _, line in res["stderr"]:
        if line.startswith("STEP "):
            steps.append(json.loads(line[5:]))
    first = next((t for t, line in res["stderr"] if line.startswith("STEP ")), None)
    summary = None
    for _, line in res["stdout"]:
        try:
            summary = json.loads(line)
        except json.JSONDecodeError:
            pass
    return {"step_s": [s["step"] for s in steps], "parts": steps, "first_step_s": first,
            "cpu_step_s": _cpu_per_step(res["step_marks"]), "summary": summary,
            "final_loss": steps[-1]["loss"] if steps else None}


# ------------------------------------------------------------------------------------------- validate-only
def validate_only(images: int, runs: int, env: dict) -> dict:
    cmd = [sys.executable, str(BENCH / "bench_validate_only.py"), "--images", str(images), "--runs", str(runs)]
    t = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = {"rc": proc.returncode, "wall_s": time.monotonic() - t}
    for line in proc.stdout.splitlines():
        if "|" in line:
            k, _, v = line.partition("|")
            out[k.strip()] = v.strip()
    return out


# ------------------------------------------------------------------------------------------- report
def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _fmt(v, unit: str = "", nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}{unit}"


def _ratio(a, b) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def build_table(res: dict, args) -> list[tuple[str, str, str, str]]:
    a, b = res["train_lora"], res["naive"]

    def pooled(runs: list[dict], key: str, skip: int) -> list[float]:
        return [x for r in runs for x in r[key][skip:]]

    skip = args.skip
    rows = []
    for label, key, s in (("steady step, median (s)", "step_s", skip),
                          ("steady step, min (s)", "step_s", skip),
                          ("steady step CPU time, median (s)", "cpu_step_s", max(0, skip - 1))):
        fa, fb = pooled(a, key, s), pooled(b, key, s)
        fn = min if "min" in label else _med
        va, vb = (fn(fa) if fa else None), (fn(fb) if fb else None)
        rows.append((label, _fmt(va, nd=3), _fmt(vb, nd=3), _ratio(va, vb)))
    for label, key, unit in (("process start -> first step done (s)", "first_step_s", ""),
                             ("total wall time (s)", "wall_s", ""),
                             ("peak RSS (GiB)", "maxrss_gib", "")):
        va, vb = _med([r[key] for r in a if r.get(key) is not None]), _med([r[key] for r in b if r.get(key) is not None])
        rows.append((label + " [median of runs]", _fmt(va, unit), _fmt(vb, unit), _ratio(va, vb)))
    rows.append(("per-run steady medians (s)", " ".join(_fmt(_med(r["step_s"][skip:]), nd=2) for r in a),
                 " ".join(_fmt(_med(r["step_s"][skip:]), nd=2) for r in b), ""))
    rows.append(("load average at start-end of each run", " ".join(f"{r['load_start']:.1f}-{r['load_end']:.1f}" for r in a),
                 " ".join(f"{r['load_start']:.1f}-{r['load_end']:.1f}" for r in b), ""))
    rows.append(("runnable tasks at step ends (mean per run)", " ".join(_fmt(r.get("runnable_mean"), nd=1) for r in a),
                 " ".join(_fmt(r.get("runnable_mean"), nd=1) for r in b), ""))
    rows.append(("final loss (last run)", _fmt(a[-1].get("final_loss"), nd=4), _fmt(b[-1].get("final_loss"), nd=4), ""))
    return rows


def naive_breakdown(runs: list[dict], skip: int) -> str:
    parts = [p for r in runs for p in r["parts"][skip:]]
    total = sum(p["step"] for p in parts)
    if not total:
        return "n/a"
    flux = any("transformer" in p for p in parts)
    names = ((("transformer", "transformer fwd+bwd") if flux else ("unet", "UNet fwd+bwd")), ("vae", "VAE encode"),
             ("text", "text encoders" + (" (CLIP + T5)" if flux else "")), ("optim", "optimizer"),
             ("data", "image load" if not flux else "batch (pre-loaded)"),
             ("other", "noise/sigmas/ids/packing" if flux else "noise/ids"))
    return ", ".join(f"{label} {100 * sum(p.get(k, 0.0) for p in parts) / total:.0f}% "
                     f"({statistics.median(p.get(k, 0.0) for p in parts):.3f} s)" for k, label in names)


def print_table(res: dict, args, meta: dict) -> dict:
    rows = build_table(res, args)
    steady = rows[0]
    a_med = _med([x for r in res["train_lora"] for x in r["step_s"][args.skip:]])
    b_med = _med([x for r in res["naive"] for x in r["step_s"][args.skip:]])
    ratio = a_med / b_med if a_med and b_med else None
    verdict = "n/a" if ratio is None else (f"MET ({ratio:.2f}x <= {TARGET}x)" if ratio <= TARGET
                                           else f"MISSED ({ratio:.2f}x > {TARGET}x)")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(12, *(len(r[1]) for r in rows))
    w2 = max(12, *(len(r[2]) for r in rows))
    lines = [f"CPU benchmark {meta['date']}: {meta['model']}, {args.resolution} px, batch 1, rank 16, fp32, "
             f"{'train_lora compile: true, ' if args.compile else ''}"
             f"{meta['torch']} ({meta['threads']} thread(s) per process) on {meta['cpu']}",
             f"{args.rounds} run(s) of {args.steps} steps each, alternating train_lora/naive; steady = steps "
             f"{args.skip + 1}..{args.steps}",
             f"{'metric':<{w0}} | {'train_lora':<{w1}} | {'naive':<{w2}} | train_lora/naive",
             "-" * (w0 + w1 + w2 + 26)]
    for r in rows:
        lines.append(f"{r[0]:<{w0}} | {r[1]:<{w1}} | {r[2]:<{w2}} | {r[3]}")
    lines.append("-" * (w0 + w1 + w2 + 26))
    lines.append(f"target: train_lora steady step <= {TARGET}x naive: {verdict}")
    lines.append(f"naive step breakdown (steady, share of step time; median per step): "
                 f"{naive_breakdown(res['naive'], args.skip)}")
    ph = res["train_lora"][-1].get("phases") or {}
    if ph:
        lines.append("train_lora start-up, first event of each phase (s after spawn, last run): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in sorted(ph.items(), key=lambda kv: kv[1])))
    v = res.get("validate")
    if v:
        lines.append(f"--validate-only on {args.validate_images} images: median {v.get('wall median', 'n/a')} "
                     f"(preflight only {v.get('preflight only (median)', 'n/a')}); heavy imports: "
                     f"{v.get('heavy imports', 'n/a')}; exit codes {v.get('exit codes', 'n/a')}")
    if res.get("profile_summary"):
        lines.append("train_lora step profile: see the profile table above (bench/profile_step.py)")
    print("\n" + "\n".join(lines), flush=True)
    return {"ratio": ratio, "verdict": verdict, "rows": rows, "lines": lines}


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=14, help="optimizer steps per run (default 14)")
    ap.add_argument("--rounds", type=int, default=3, help="train_lora/naive pairs, alternating (default 3)")
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps per run left out of the steady state")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--model", choices=("sdxl", "flux"), default="sdxl",
                    help="sdxl: quarter-width SDXL (target 0.8x); flux: reduced FLUX.1-dev (target 0.5x)")
    ap.add_argument("--t5-layers", type=int, help="flux: T5 depth of the reduced model (default 24, the real depth)")
    ap.add_argument("--tiny", action="store_true",
                    help="lora_trainer.testing.tiny's sdxl / flux1-dev at 64 px: a quick check")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS for both children (default 1; 0 = torch's own choice, all cores). On a "
                         "shared 2-core box, two OpenMP threads per process slow down 3-35x whenever another "
                         "process is runnable; one thread is within 1.4x of two on an idle box and stable")
    ap.add_argument("--validate-images", type=int, default=1000)
    ap.add_argument("--validate-runs", type=int, default=3)
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--profile", choices=("auto", "on", "off"), default="auto",
                    help="profile train_lora's step in-process: always, never, or when the target is missed")
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--compile", action="store_true",
                    help="train_lora with compile: true (its first step compiles; --skip leaves it out)")
    ap.add_argument("--keep", metavar="DIR", help="work folder to keep (model and data are reused)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    ap.add_argument("--timeout", type=float, default=900, help="per child process, seconds")
    args = ap.parse_args(argv)
    if args.tiny and args.resolution == 256:
        args.resolution = 64
    global TARGET
    TARGET = TARGETS[args.model]

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_cpu_"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    try:
        what = {"sdxl": "quarter-width SDXL", "flux": "reduced FLUX.1-dev"}[args.model]
        log(f"building {'tiny' if args.tiny else what} and {args.images} images in {work}")
        model, data = prepare(work, tiny=args.tiny, n_images=args.images, resolution=args.resolution,
                              kind=args.model, t5_layers=args.t5_layers)
        res: dict = {"train_lora": [], "naive": []}
        step_event = re.compile(r'"type":\s*"step"')
        naive_step = re.compile(r"^STEP ")
        for r in range(args.rounds):
            out = work / f"out_{r}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = train_lora_config(work, model, data, out, steps=args.steps, resolution=args.resolution,
                                    compile_blocks=args.compile)
            log(f"round {r + 1}/{args.rounds}: train_lora")
            run = run_child([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg)],
                            step_re=step_event, stream="stdout", env=env, timeout=args.timeout)
            run.update(parse_train_lora(run))
            if run["rc"] != 0 or not run["step_s"]:
                tail = "\n".join(line for _, line in run["stderr"][-20:])
                raise SystemExit(f"train_lora failed (exit {run['rc']}): {run.get('error')}\n{tail}")
            log(f"  train_lora steps: {' '.join(f'{x:.2f}' for x in run['step_s'])}")
            res["train_lora"].append(run)
            log(f"round {r + 1}/{args.rounds}: naive loop")
            run = run_child([sys.executable, str(BENCH / NAIVE[args.model]), "--model", str(model), "--data", str(data),
                             "--resolution", str(args.resolution), "--batch-size", "1", "--steps", str(args.steps),
                             "--skip", str(args.skip)],
                            step_re=naive_step, stream="stderr", env=env, timeout=args.timeout)
            run.update(parse_naive(run))
            if run["rc"] != 0 or not run["step_s"]:
                tail = "\n".join(line for _, line in run["stderr"][-20:])
                raise SystemExit(f"naive loop failed (exit {run['rc']})\n{tail}")
            log(f"  naive steps: {' '.join(f'{x:.2f}' for x in run['step_s'])}")
            res["naive"].append(run)

        if not args.no_validate:
            log(f"--validate-only on {args.validate_images} images ({args.validate_runs} runs)")
            res["validate"] = validate_only(args.validate_images, args.validate_runs, env)

        a_med = _med([x for r in res["train_lora"] for x in r["step_s"][args.skip:]])
        b_med = _med([x for r in res["naive"] for x in r["step_s"][args.skip:]])
        missed = a_med is not None and b_med is not None and a_med > TARGET * b_med
        if args.profile == "on" or (args.profile == "auto" and missed):
            log("profiling train_lora's step in-process (bench/profile_step.py)")
            cfg = train_lora_config(work, model, data, work / "out_profile", steps=1000, resolution=args.resolution)
            proc = subprocess.run([sys.executable, str(BENCH / "profile_step.py"), "--config", str(cfg),
                                   "--steps", str(args.profile_steps), "--quick"],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            print(proc.stdout, flush=True)
            if proc.returncode != 0:
                log(f"profile_step.py failed (exit {proc.returncode}):\n" + "\n".join(proc.stderr.splitlines()[-15:]))
            res["profile_summary"] = proc.returncode == 0

        import torch

        if args.model == "flux":
            from models import flux_description

            model_desc = "tiny FLUX.1-dev (lora_trainer.testing.tiny)" if args.tiny else \
                flux_description("reduced", t5_layers=args.t5_layers) + " (transformer 82.3M)"
        else:
            model_desc = "tiny SDXL" if args.tiny else "quarter-width SDXL (UNet 160.8M)"
        meta = {"date": date.today().isoformat(), "model": model_desc,
                "torch": f"torch {torch.__version__}", "threads": args.threads or torch.get_num_threads(),
                "cpu": f"{os.cpu_count()}-core CPU"}
        log(f"total benchmark time {time.monotonic() - t_all:.0f} s")
        report = print_table(res, args, meta)
        if args.json:
            slim = {k: [{kk: vv for kk, vv in run.items() if kk not in ("stdout", "stderr")} for run in v]
                    if isinstance(v, list) else v for k, v in res.items()}
            Path(args.json).write_text(json.dumps({"meta": meta, "report": report, "results": slim}, indent=1,
                                                  default=str))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
