"""End-to-end check of the REAL train_lora CLI on a CUDA card, in one device call (default budget 400 s).

    python3 bench/device_check.py --out $OUT/device_check.json          # on the GPU machine (see bench/RESULTS.md)
    python3 bench/device_check.py --device cpu --tiny                   # dry run without a GPU (~2-3 minutes)

CI runs only on the CPU, so nothing there exercises CUDA (autocast, the fp16 grad scaler, CUDA RNG state in
checkpoints, SIGTERM timing on a card, DoRA on a GPU, "auto" precision). This runs `train_lora.py --config ...` on
lora_trainer.testing.tiny's random models as a parent process would (every stdout line a schema-valid JSON event, seq without
gaps) and checks exit codes, events and outputs; each check_* function says what it checks. Checks run in order of
value; those that would overrun --budget-s are reported as skipped. Progress goes to stderr, the markdown table to
stdout; --out gets JSON (rewritten after every check, so a killed call leaves partial results) and a .md beside it.
Exit 0 when every check that ran passed, else 1.

The FLUX check (``flux1-dev/full``) is the one full-size model: FLUX.1-dev's published transformer (11.9B), VAE
and CLIP-L configs with random weights, built on the card directly in bf16 (bench/models.py, seconds; no fp32 or
host copy) and saved once (24 GB), plus a 2-layer T5 stand-in of the real output width 4096 (the trainer caches
T5's output once and moves the encoder off the card, so T5's size changes set-up time, not training memory or
speed). Then the real CLI trains a short run at 512 px and, when time is left, one at 1024 px (batch 1, rank 16,
default FLUX targets, bf16, no gradient checkpointing): s/step from the step events (the trainer syncs every
step), peak GPU memory (``memory.gpu_peak_gb`` = torch.cuda.max_memory_allocated over training), model load and
cache times, LoRA files. An out-of-memory exit at 1024 px is recorded as a result, not a failure.
``--tiny`` swaps in lora_trainer.testing.tiny's flux1-dev at 64 / 128 px (the CPU dry run).
The newer families (``--families``, default all; bench/device_families.py --list) each build their published
architecture with random weights on the card in a child (FLUX.2 klein 9B, Z-Image, Qwen-Image ...) and train it at
1024 px in bf16, with a quantised base and with gradient checkpointing: s/step and peak memory beside the memory
plan's figure, both LoRA files, and an MFU estimate per run (``add_mfu``: 4 x parameters x tokens per step over the
bf16 matmul ceiling the environment check measures). ``--tiny`` runs their tiny variants at 64 px instead.
``--flux-dir DIR`` builds the model there and keeps it (bench/bench_gpu.py --model flux --model-dir DIR reuses it).

Right after the environment, three in-process checks (bench/device_paths.py, seconds each) run the paths only a
card executes: ``quantized_autocast`` (bf16 autocast over fp8 / int8 / NF4 weights), ``fsdp_bf16_lora`` (FSDP2 with
a bf16 base and fp32 LoRA in one unit, one process over NCCL) and ``pinned_streaming`` (offload_blocks' page-locked,
non-blocking copies). With ``--device cpu`` those that need CUDA run their code on the CPU as a stand-in and report
"skipped: needs CUDA". ``--only NAME,...`` runs the environment and the named checks only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import jsonschema  # the trainer needs it too: on any machine that can train, it is there
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.device_families import FAMILY_BENCHES, check_family as run_family_check  # noqa: E402
from bench.device_flux1 import check_flux1  # noqa: E402
from bench.device_paths import check_fsdp_bf16_lora, check_pinned_streaming, check_quantized_autocast  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the device has no network; fail fast instead of retrying the hub
T0 = time.monotonic()
# CUDA kernels (atomics in some backward passes) may differ run to run, so a resumed LoRA need not be bitwise equal
# to the uninterrupted one on a GPU; only a difference above this (relative to the tensor's largest value) fails.
RESUME_REL_TOL = 1e-2


def log(msg: str) -> None:
    print(f"[device_check {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Check:
    name: str
    status: str = "skipped"  # passed | failed | skipped
    numbers: dict = field(default_factory=dict)  # short values, shown in the table
    problems: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # longer data, JSON only
    seconds: float = 0.0

    def require(self, ok, msg: str) -> bool:  # records msg as a problem unless ok
        if not ok:
            self.problems.append(msg)
        return bool(ok)


@dataclass
class Run:  # one CLI process
    rc: int
    events: list[dict]
    problems: list[str]
    stderr_tail: str
    wall_s: float
    signal_to_exit_s: float | None = None
    arrivals: list[float] = field(default_factory=list)  # seconds after spawn at which each event arrived

    def at(self, pred) -> float | None:
        """Arrival time of the first event for which pred(event) holds."""
        return next((t for t, e in zip(self.arrivals, self.events) if pred(e)), None)

    def of(self, type_: str) -> list[dict]:
        return [e for e in self.events if e.get("type") == type_]

    def last(self, type_: str) -> dict:
        return (self.of(type_) or [{}])[-1]


class Ctx:
    def __init__(self, args):
        self.args, self.device = args, args.device
        self.cuda = args.device == "cuda"
        self.tmp = Path(tempfile.mkdtemp(prefix="device_check_"))
        self.steps = args.steps or (30 if self.cuda else 12)
        self.flux_dir = Path(args.flux_dir) if args.flux_dir else self.tmp / "model-flux1-dev"
        self.flux_size = args.flux_size or ("tiny" if args.tiny else "full")
        self.families = [f for f in args.families.split(",") if f]
        unknown = sorted(set(self.families) - set(FAMILY_BENCHES))
        if unknown:
            raise SystemExit(f"unknown --families {unknown}; known: {', '.join(FAMILY_BENCHES)}")
        # bf16 is the H100's natural precision; on the CPU fp32 ("no") is the default and much faster.
        self.main_precision = "bf16" if self.cuda else "no"
        self.models: dict[str, Path] = {}
        self.dataset: Path | None = None
        self.reference: tuple[dict, Run, Path] | None = None  # the sd15 main-precision run, reused by sigterm_resume
        self.run_times: list[float] = []
        self.validator = jsonschema.Draft7Validator(json.loads((ROOT / "events_schema.json").read_text()))
        if not self.cuda:  # this process's own inference (diffusers_load) too: see OMP_NUM_THREADS in run_cli
            torch.set_num_threads(1)

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - T0)

    def est_run_s(self) -> float:
        return max(self.run_times) if self.run_times else (25.0 if self.cuda else 20.0)

    def config(self, name: str, family: str, precision: str, *, samples: bool = False, **extra) -> tuple[Path, dict]:
        out = self.tmp / name
        cfg = {"dataset_path": str(self.dataset), "base_model": str(self.models[family]), "output_path": str(out),
               "trigger_words": ["ohwx"], "resolution": 64, "min_bucket_resolution": 64, "batch_size": 2,
               "max_train_steps": self.steps, "checkpointing_steps": max(1, self.steps // 3), "lora_rank": 4,
               "learning_rate": 1e-3, "log_every_n_steps": 1, "seed": 7, "device": self.device,
               "mixed_precision": precision, "caption_dropout_rate": 0.1, "lora_dropout": 0.1}
        if samples:  # at step 0 and at the end only: sampling is cheap on tiny models, but not free
            cfg.update(validation_prompts=["ohwx, a red circle, blue background"], validation_steps=self.steps,
                       validation_inference_steps=4)
        cfg.update(extra)
        path = self.tmp / f"{name}.json"
        path.write_text(json.dumps(cfg, indent=1))
        return path, cfg


def run_cli(ctx: Ctx, cfg: Path, name: str, stop_after: int | None = None, *, record: bool = True,
            max_timeout: float = 300.0) -> Run:
    """Run train_lora.py like a parent process would; SIGTERM once a step event >= stop_after arrives.
    record=False keeps the run out of the time estimate of the small-model checks."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if not ctx.cuda:  # a shared CPU box: torch's all-cores threads collapse under contention (bench/RESULTS.md)
        env.setdefault("OMP_NUM_THREADS", "1")
    timeout = max(60.0, min(max_timeout, ctx.remaining() + 60))
    killed = threading.Event()
    events, problems, sent, arrivals = [], [], None, []
    t0 = time.monotonic()
    # stderr to a file, not a pipe: an unread stderr pipe fills up (64 KiB) and blocks the child.
    with open(ctx.tmp / f"{name.replace('/', '-')}.stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_lora.py"), "--config", str(cfg)], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        timer = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
        timer.start()
        try:
            for n, line in enumerate(proc.stdout, 1):
                try:
                    ev = json.loads(line)
                    assert isinstance(ev, dict)
                except (ValueError, AssertionError):
                    problems.append(f"stdout line {n} is not a JSON object: {line[:200]!r}")
                    continue
                events.append(ev)
                arrivals.append(time.monotonic() - t0)
                bad = next(iter(ctx.validator.iter_errors(ev)), None)
                if bad is not None and len(problems) < 5:
                    problems.append(f"event {ev.get('seq')} ({ev.get('type')}) violates the schema: {bad.message}")
                if stop_after is not None and sent is None and ev.get("type") == "step" and ev["step"] >= stop_after:
                    proc.send_signal(signal.SIGTERM)
                    sent = time.monotonic()
            rc = proc.wait()
        finally:
            timer.cancel()
        done = time.monotonic()
        err.seek(0)
        stderr = err.read()
    if killed.is_set():
        problems.append(f"killed after {timeout:.0f} s (timeout)")
    seqs = [e.get("seq") for e in events]
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"seq is not 1..{len(seqs)} without gaps: {seqs[:20]}")
    if len({e.get("run_id") for e in events}) > 1:
        problems.append("more than one run_id")
    if "Traceback (most recent call last)" in stderr:
        problems.append("a Python traceback on stderr (only --debug may print one)")
    if record:
        ctx.run_times.append(done - t0)
    log(f"  {name}: exit {rc} in {done - t0:.1f} s, {len(events)} events")
    return Run(rc, events, problems, stderr[-2500:], done - t0, (done - sent) if sent else None, arrivals)


def mem_max(run: Run, prefix: str) -> float | None:
    """Largest step-event memory figure whose key starts with prefix (gpu_peak_gb today; the schema says gpu_peak)."""
    vals = [v for e in run.of("step") for k, v in (e.get("memory") or {}).items()
            if k.startswith(prefix) and isinstance(v, (int, float))]
    return max(vals) if vals else None


def expect_completed(c: Check, run: Run, precision: str, device: str) -> bool:
    """The checks every finished run must pass; adds the run's numbers to the check."""
    c.problems += run.problems
    if not c.require(run.rc == 0, f"exit code {run.rc}, expected 0; stderr tail:\n{run.stderr_tail}"):
        if (err := run.last("error")):
            c.problems.append(f"error event: {err.get('code')}: {err.get('message')}")
        return False
    started = run.last("run_started")
    dev = started.get("device") or {}
    c.require(dev.get("type") == device, f"run_started.device.type {dev.get('type')!r}, expected {device!r}")
    c.require(started.get("mixed_precision") == precision,
              f"run_started.mixed_precision {started.get('mixed_precision')!r}, expected {precision!r}")
    losses = [e.get("loss") for e in run.of("step")]
    finite = [v for v in losses if isinstance(v, (int, float)) and math.isfinite(v)]
    c.require(losses and len(finite) == len(losses),
              f"non-finite or missing losses: {[v if v is None else round(v, 4) for v in losses][:10]}")
    warnings = sorted({w.get("code") for w in run.of("warning")})
    c.numbers.update(device=dev.get("type"), precision=started.get("mixed_precision"), wall_s=round(run.wall_s, 1),
                     loss_first=round(finite[0], 4) if finite else None,
                     loss_last=round(finite[-1], 4) if finite else None,
                     gpu_peak_gb=mem_max(run, "gpu_peak"), rss_peak_gb=mem_max(run, "rss"),
                     img_per_s=round(run.last("step").get("images_per_sec") or 0, 1))
    c.details["warnings"] = warnings
    return not c.problems


def load_lora(c: Check, path: str | None, label: str) -> dict:
    if not c.require(path and Path(path).is_file(), f"{label} file missing: {path}"):
        return {}
    sd = load_file(path)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(v.float().isfinite().all())]
    c.require(not bad, f"{label}: non-finite tensors {bad[:3]}")
    c.numbers[f"{label}_tensors"] = len(sd)
    return sd


def diffusers_load(ctx: Ctx, family: str, path: str) -> dict:
    """load_lora_weights into a fresh pipeline, count the adapted layers, run 2 denoising steps on the device."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as dlog
    from peft.tuners.tuners_utils import BaseTunerLayer

    dlog.disable_progress_bar()
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(ctx.models[family], **kwargs)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(path)
    comps = [m for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    layers = [m for comp in comps for m in comp.modules() if isinstance(m, BaseTunerLayer)]
    dora = sum(1 for m in layers if any(getattr(m, "use_dora", {}).values()))
    pipe.to(ctx.device)
    gen = torch.Generator(ctx.device).manual_seed(0)
    img = pipe("ohwx, a red circle", num_inference_steps=2, height=64, width=64, output_type="np", generator=gen).images
    return {"layers": len(layers), "dora_layers": dora, "image_finite": bool(math.isfinite(float(img.sum())))}


def kohya_modules(sd: dict) -> int:
    return sum(1 for k in sd if k.endswith(".lora_down.weight"))


# ------------------------------------------------------------------------------------------------------ checks
def _matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    """The card's dense bf16 ceiling, measured (bench_gpu.py's denominator of MFU, in brief)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return round(2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3) / 1e12, 1)


def check_env(ctx: Ctx, c: Check) -> None:
    """Record the machine and versions; build the tiny models and the dataset."""
    import importlib.metadata as md

    n = c.numbers
    n.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
             cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    for pkg in ("diffusers", "transformers", "peft", "accelerate", "safetensors", "jsonschema"):
        n[pkg] = getattr(next(iter(md.distributions(name=pkg)), None), "version", None)
    if ctx.cuda:
        if not c.require(torch.cuda.is_available(), "torch.cuda.is_available() is False (use --device cpu?)"):
            return
        p = torch.cuda.get_device_properties(0)
        n.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                 bf16=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count())
        smi = shutil.which("nvidia-smi")
        n["driver"] = smi and subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=20, check=False).stdout.strip()
        ctx.peak_tflops = n["bf16_matmul_tflops"] = _matmul_tflops()
    else:
        n.update(cpu=f"{platform.machine()} ({os.cpu_count()} cores)", gpu_visible=torch.cuda.is_available())
    n["host_ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    n["tmp_free_gib"] = round(shutil.disk_usage(ctx.tmp).free / 2**30, 1)
    from lora_trainer.testing.tiny import make_dataset, make_tiny_pipeline

    t = time.monotonic()
    for fam in ["sd15"] + ([] if ctx.args.no_sdxl else ["sdxl"]):
        ctx.models[fam] = make_tiny_pipeline(ctx.tmp / f"model-{fam}", fam)
    ctx.dataset = make_dataset(ctx.tmp / "data", n=8, trigger="ohwx")
    n["build_models_s"] = round(time.monotonic() - t, 1)


def check_train(ctx: Ctx, c: Check, family: str, precision: str) -> None:
    """A full run with samples and checkpoints; its LoRA files load (safetensors, diffusers) and infer on the device."""
    # fp32 files for the main precision: the resume check compares them, and fp16 rounding would hide differences.
    extra = {"save_precision": "fp32"} if precision == ctx.main_precision else {}
    cfg_path, cfg = ctx.config(c.name.replace("/", "-"), family, precision, samples=True, **extra)
    run = run_cli(ctx, cfg_path, c.name)
    if not expect_completed(c, run, precision, ctx.device):
        return
    c.require(len(run.of("step")) == ctx.steps, f"{len(run.of('step'))} step events, expected {ctx.steps}")
    reasons = [e.get("reason") for e in run.of("checkpoint")]
    c.require("interval" in reasons and "final" in reasons, f"checkpoint reasons {reasons}")
    samples = run.of("sample")
    c.require(len(samples) >= 2 and all(Path(s["path"]).is_file() for s in samples), f"samples: {samples[:2]}")
    outputs = run.last("completed").get("outputs") or {}
    kohya = load_lora(c, outputs.get("lora"), "kohya")
    load_lora(c, outputs.get("peft_lora"), "peft")
    if kohya:
        got = diffusers_load(ctx, family, outputs["lora"])
        c.numbers.update(diffusers_layers=got["layers"], kohya_modules=kohya_modules(kohya))
        c.require(got["layers"] == kohya_modules(kohya),
                  f"diffusers adapted {got['layers']} layers, the kohya file has {kohya_modules(kohya)} modules")
        c.require(got["image_finite"], "inference with the LoRA gave non-finite pixels")
    if family == "sd15" and precision == ctx.main_precision and not c.problems:
        ctx.reference = (cfg, run, Path(cfg["output_path"]))


def _steady(xs: list[float], skip: int) -> float | None:
    xs = xs[skip:] or xs
    return round(sorted(xs)[len(xs) // 2], 4) if xs else None


def check_flux(ctx: Ctx, c: Check) -> None:
    check_flux1(ctx, sys.modules[__name__], c)


def check_family(ctx: Ctx, bench, c: Check) -> None:
    run_family_check(ctx, sys.modules[__name__], c, bench, tiny=ctx.flux_size == "tiny")


def check_sigterm_resume(ctx: Ctx, c: Check) -> None:
    """SIGTERM after step N: exit 143, `interrupted` + checkpoint, time to exit; resume "auto" vs uninterrupted."""
    if ctx.reference is None:  # the train check did not run or failed: make an uninterrupted run of our own
        ref_path, _ = ctx.config("resume-reference", "sd15", ctx.main_precision, samples=True, save_precision="fp32")
        ref_run = run_cli(ctx, ref_path, "resume-reference")
        if not expect_completed(c, ref_run, ctx.main_precision, ctx.device):
            return
        ctx.reference = (json.loads(ref_path.read_text()), ref_run, ctx.tmp / "resume-reference")
    ref_cfg, ref_run, ref_out = ctx.reference
    # The same config except where it writes, so the two runs must train the same weights.
    cfg = {**ref_cfg, "output_path": str(ctx.tmp / "resume"), "resume": "auto"}
    cfg_path = ctx.tmp / "resume.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    stop_after = max(1, ctx.steps // 2 - 1)  # between two interval checkpoints: the interrupt one is the newest
    first = run_cli(ctx, cfg_path, "sigterm", stop_after=stop_after)
    c.problems += first.problems
    inter = first.last("interrupted")
    c.numbers.update(stop_after_step=stop_after, stopped_at=inter.get("step"),
                     signal_to_exit_s=round(first.signal_to_exit_s, 2) if first.signal_to_exit_s else None)
    if not c.require(first.rc == 143, f"exit code {first.rc} after SIGTERM, expected 143\n{first.stderr_tail}"):
        return
    c.require(inter.get("signal") == "SIGTERM" and inter.get("checkpoint") and Path(inter["checkpoint"]).is_dir(),
              f"interrupted event without a checkpoint on disk: {inter}")
    c.require(first.last("checkpoint").get("reason") == "interrupt", "the last checkpoint is not reason=interrupt")
    # README: one step + the checkpoint; docker stop's default grace period is 10 s.
    c.require((first.signal_to_exit_s or 0) < 10, f"SIGTERM to exit took {first.signal_to_exit_s:.1f} s (>= 10 s)")
    second = run_cli(ctx, cfg_path, "resume")
    if not expect_completed(c, second, ctx.main_precision, ctx.device):
        return
    for k in ("wall_s", "loss_first", "loss_last", "img_per_s", "rss_peak_gb"):  # the resumed run's: noise here
        c.numbers.pop(k, None)
    start = second.last("resumed").get("step")
    c.require(start == inter.get("step") == second.last("run_started").get("start_step"),
              f"resumed at {start}, interrupted at {inter.get('step')}")
    ref_losses = {e["step"]: e["loss"] for e in ref_run.of("step")}
    loss_diffs = [abs(e["loss"] - ref_losses[e["step"]]) for e in second.of("step") if e["step"] in ref_losses]
    c.require(len(loss_diffs) == ctx.steps - (start or 0), f"{len(loss_diffs)} post-resume step losses compared")
    ref, got = load_file(ref_out / "lora.safetensors"), load_file(Path(cfg["output_path"]) / "lora.safetensors")
    if not c.require(ref.keys() == got.keys(), "the resumed LoRA has different keys"):
        return
    diffs, worst_rel = {}, 0.0
    for k in ref:
        d = (ref[k].float() - got[k].float()).abs().max().item()
        if d:
            diffs[k] = d
            worst_rel = max(worst_rel, d / max(ref[k].float().abs().max().item(), 1e-12))
    c.numbers.update(lora_bitwise_equal=not diffs, tensors_differing=f"{len(diffs)}/{len(ref)}",
                     lora_max_abs_diff=max(diffs.values(), default=0.0), lora_max_rel_diff=round(worst_rel, 6),
                     losses_equal=not any(loss_diffs), loss_max_abs_diff=max(loss_diffs, default=0.0))
    c.details["max_abs_diff_per_tensor"] = dict(sorted(diffs.items(), key=lambda kv: -kv[1]))
    c.require(worst_rel <= RESUME_REL_TOL, f"resumed LoRA differs by {worst_rel:.3g} (relative) > {RESUME_REL_TOL}")


def check_dora(ctx: Ctx, c: Check) -> None:
    """use_dora + train_text_encoder: .dora_scale in the kohya file, the PEFT file loads as DoRA in diffusers."""
    cfg_path, _ = ctx.config("dora", "sd15", ctx.main_precision, use_dora=True, train_text_encoder=True)
    run = run_cli(ctx, cfg_path, "dora")
    if not expect_completed(c, run, ctx.main_precision, ctx.device):
        return
    c.require("dora_loaders" in c.details["warnings"], "no dora_loaders warning event")
    outputs = run.last("completed").get("outputs") or {}
    kohya, peft = load_lora(c, outputs.get("lora"), "kohya"), load_lora(c, outputs.get("peft_lora"), "peft")
    scales = [k for k in kohya if k.endswith(".dora_scale")]
    c.numbers.update(dora_scale_keys=len(scales), te_modules=sum(1 for k in scales if k.startswith("lora_te")))
    c.require(scales and len(scales) == kohya_modules(kohya), f"{len(scales)} .dora_scale keys for "
              f"{kohya_modules(kohya)} modules")
    c.require(any(k.startswith("lora_te") for k in scales), "no text-encoder DoRA modules (train_text_encoder)")
    if peft:
        got = diffusers_load(ctx, "sd15", outputs["peft_lora"])
        peft_modules = sum(1 for k in peft if ".lora_A." in k)
        c.numbers.update(diffusers_dora_layers=got["dora_layers"], peft_modules=peft_modules)
        c.require(got["dora_layers"] == peft_modules, f"diffusers made {got['dora_layers']} DoRA layers of "
                  f"{peft_modules} in the PEFT file")
        c.require(got["image_finite"], "inference with the DoRA gave non-finite pixels")
    if outputs.get("manifest") and Path(outputs["manifest"]).is_file():
        manifest = json.loads(Path(outputs["manifest"]).read_text())
        c.details["dora_comfyui_row_scale"] = manifest.get("dora_comfyui_row_scale")


def check_auto_precision(ctx: Ctx, c: Check) -> None:
    """mixed_precision "auto": bf16 on a card that has it (H100), "no" on the CPU."""
    want = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if ctx.cuda else "no"
    cfg_path, _ = ctx.config("auto", "sd15", "auto", max_train_steps=4, checkpointing_steps=None)
    expect_completed(c, run_cli(ctx, cfg_path, "auto"), want, ctx.device)
    c.numbers["expected"] = want


def check_cpu_device(ctx: Ctx, c: Check) -> None:
    """device "cpu" beside a visible GPU: trains on the CPU in fp32."""
    cfg_path, _ = ctx.config("cpu", "sd15", "auto", device="cpu", max_train_steps=4, checkpointing_steps=None)
    run = run_cli(ctx, cfg_path, "cpu")
    if expect_completed(c, run, "no", "cpu"):
        c.require(not any("gpu_peak_gb" in (e.get("memory") or {}) for e in run.of("step")),
                  "step events report GPU memory on a CPU run")


def check_upcast_copies(ctx: Ctx, c: Check) -> None:
    """What autograd keeps of an fp8 / int8 / NF4 base on the device (bf16 autocast, the trainer's quantize + LoRA
    path, tiny FLUX.1) against the memory plan's weight_copies: fp8 and int8 keep a bf16 copy per Linear, NF4 none
    (tests/test_memory_plan.py measures the same on the CPU)."""
    from lora_trainer.preflight.memory_plan import DRIFT
    from lora_trainer.runtime.quantize import backend_problem
    from lora_trainer.testing.memory import copies_against_plan
    from lora_trainer.testing.tiny import make_tiny_pipeline

    folder = make_tiny_pipeline(ctx.tmp / "model-flux1-copies", "flux1-dev") / "transformer"
    formats = tuple(f for f in ("fp8", "int8", "nf4") if backend_problem(f) is None)
    rows = copies_against_plan(folder, ctx.device, formats)
    c.details["copies"] = rows
    for r in rows:
        key = f"{r['format']}{'_gc' if r['checkpointing'] else ''}"
        c.numbers[key] = f"{r['measured']}/{r['planned']}"
        c.require(abs(r["measured"] - r["planned"]) <= DRIFT * r["fp8_planned"],
                  f"{key}: autograd keeps {r['measured']} bytes of copies, the plan says {r['planned']}")


# ------------------------------------------------------------------------------------------------------ driver
def plan(ctx: Ctx) -> list[tuple[str, int, object]]:
    """(name, CLI runs it makes, function) in order of value: what is skipped when time runs out comes last.
    The FLUX check's runs are not tiny-model runs: its time is estimated apart (flux_need_s)."""
    main, other = ctx.main_precision, "fp16" if ctx.cuda else "bf16"  # the trainer refuses fp16 on the CPU
    items = [("environment", 0, partial(check_env, ctx)),
             ("quantized_autocast", 0, partial(check_quantized_autocast, ctx)),
             ("fsdp_bf16_lora", 0, partial(check_fsdp_bf16_lora, ctx)),
             ("pinned_streaming", 0, partial(check_pinned_streaming, ctx)),
             (f"train/sd15/{main}", 1, partial(check_train, ctx, family="sd15", precision=main))]
    if not ctx.args.no_flux:
        items.append((f"flux1-dev/{ctx.flux_size}", -1, partial(check_flux, ctx)))
    for label in ctx.families:  # bench/device_families.py: full size unless --tiny; time estimated per row
        bench = FAMILY_BENCHES[label]
        items.append((f"{label}/{'tiny' if ctx.flux_size == 'tiny' else 'full'}", -2 - len(items),
                      partial(check_family, ctx, bench)))
    items += [("sigterm_resume", 2, partial(check_sigterm_resume, ctx)),
             (f"train/sd15/{other}", 1, partial(check_train, ctx, family="sd15", precision=other)),
             ("dora", 1, partial(check_dora, ctx)),
             ("auto_precision", 1, partial(check_auto_precision, ctx))]
    if not ctx.args.no_sdxl:
        items += [(f"train/sdxl/{p}", 1, partial(check_train, ctx, family="sdxl", precision=p)) for p in (main, other)]
    if ctx.cuda:
        items.append(("cpu_device", 1, partial(check_cpu_device, ctx)))
    items.append(("upcast_copies", 0, partial(check_upcast_copies, ctx)))
    if ctx.args.only:
        keep = {"environment", *ctx.args.only.split(",")}
        items = [item for item in items if item[0] in keep]
    return items


def flux_need_s(ctx: Ctx) -> float:
    """Time the FLUX check needs for its build and the first (512 px) run; the 1024 px run is skipped inside the
    check when too little is left. Full size on an H200, estimated (not yet measured on a card): build on the
    card + save 24 GB ~60-90 s; a CLI run ~60-90 s (imports, reading 24 GB, caching, 8 steps, export)."""
    if ctx.flux_size != "full":
        return 30.0 if ctx.flux_size == "tiny" else 90.0
    return (0.0 if (ctx.flux_dir / "model_index.json").is_file() else 90.0) + 90.0


def family_need_s(ctx: Ctx, name: str) -> float:
    """A family row's build and first run (its later runs are skipped inside when time is short)."""
    return 30.0 if ctx.flux_size == "tiny" else FAMILY_BENCHES[name.split("/")[0]].need_s


def render(ctx: Ctx, checks: list[Check]) -> str:
    env = checks[0].numbers
    head = (f"device_check {time.strftime('%Y-%m-%d %H:%M')}: {env.get('gpu') or env.get('cpu')}, torch "
            f"{env.get('torch')} (CUDA {env.get('cuda')}), diffusers {env.get('diffusers')}, peft {env.get('peft')}; "
            f"{ctx.steps} steps per run, budget {ctx.args.budget_s:.0f} s, took {time.monotonic() - T0:.0f} s")
    rows = ["| check | result | numbers |", "| --- | --- | --- |"]
    for c in checks:
        nums = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.numbers.items()
                         if v is not None)
        why = [p.splitlines()[0][:160] for p in c.problems] + [c.details.get("skipped_because", "")]
        result = c.status + (": " + "; ".join(w for w in why if w) if any(why) else "")
        rows.append(f"| {c.name} | {result.replace('|', '/')} | {nums.replace('|', '/')} |")
    return head + "\n\n" + "\n".join(rows) + "\n"


def save(ctx: Ctx, checks: list[Check], out: Path) -> None:
    data = {"device": ctx.device, "steps": ctx.steps, "budget_s": ctx.args.budget_s,
            "elapsed_s": round(time.monotonic() - T0, 1), "checks": [asdict(c) for c in checks]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=str))
    out.with_suffix(".md").write_text(render(ctx, checks))


def main() -> int:
    default_out = Path(os.environ["OUT"]) / "device_check.json" if os.environ.get("OUT") else Path("device_check.json")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--budget-s", type=float, default=400.0, help="skip the remaining checks past this (default 400)")
    ap.add_argument("--steps", type=int, default=0, help="training steps per full run (default 30 cuda, 12 cpu)")
    ap.add_argument("--no-sdxl", action="store_true", help="skip the SDXL runs (saves time on the CPU)")
    ap.add_argument("--tiny", action="store_true",
                    help="FLUX check on lora_trainer.testing.tiny's flux1-dev at 64/128 px instead of full size (dry run)")
    ap.add_argument("--flux-size", choices=("tiny", "reduced", "full"),
                    help="FLUX model: full (default on a card), tiny (= --tiny), reduced (bench/models.py's CPU "
                         "stand-in with a 2-layer T5, built in bf16, 128/256 px: the full-size code path on the CPU)")
    ap.add_argument("--no-flux", action="store_true", help="skip the FLUX check")
    ap.add_argument("--families", default=",".join(FAMILY_BENCHES),
                    help="comma-separated full-size family checks (bench/device_families.py --list; default all, "
                         "in that order; '' for none)")
    ap.add_argument("--flux-steps", type=int, default=0, help="steps per FLUX run (default 8 at 512 px, 6 at 1024)")
    ap.add_argument("--flux-dir", help="where the FLUX model is built (reused if there, and kept); default: the "
                                       "temp folder")
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (models, configs, outputs, stderr logs)")
    ap.add_argument("--only", help="comma-separated check names to run (with the environment), e.g. "
                                   "quantized_autocast,fsdp_bf16_lora,pinned_streaming")
    args = ap.parse_args()
    ctx = Ctx(args)
    log(f"device {args.device}, budget {args.budget_s:.0f} s, work dir {ctx.tmp}")
    items = plan(ctx)
    checks = [Check(name) for name, _, _ in items]
    for c, (_, runs, fn) in zip(checks, items):
        if checks[0].status == "failed":
            c.problems.append("environment check failed")
            continue
        need = (flux_need_s(ctx) if runs == -1 else family_need_s(ctx, c.name) if runs < -1
                else runs * ctx.est_run_s() + (10 if runs else 0))  # + diffusers load
        if runs and ctx.remaining() < need:
            c.details["skipped_because"] = f"{ctx.remaining():.0f} s left, ~{need:.0f} s needed"
            log(f"skip {c.name}: {c.details['skipped_because']}")
            continue
        log(f"check {c.name}")
        t = time.monotonic()
        try:
            fn(c)
        except Exception:  # noqa: BLE001 - a crash in one check is its failure, not the end of the others
            c.details["traceback"] = traceback.format_exc()[-3000:]
            c.problems.append("check crashed: " + c.details["traceback"].strip().splitlines()[-1])
        c.seconds = round(time.monotonic() - t, 1)
        if ctx.cuda:  # what an in-process check left in the caching allocator is not the next CLI run's to lose
            torch.cuda.empty_cache()
        # a check whose path needs what this machine lacks says so (skipped_because) unless its own code failed
        c.status = "failed" if c.problems else "skipped" if c.details.get("skipped_because") else "passed"
        why = f": {c.details['skipped_because']}" if c.status == "skipped" else ""
        log(f"  {c.name}: {c.status}{why}" + "".join(f"\n    - {p}" for p in c.problems))
        save(ctx, checks, args.out)
    save(ctx, checks, args.out)
    print(render(ctx, checks), flush=True)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}" + (f"; kept {ctx.tmp}" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(ctx.tmp, ignore_errors=True)  # an explicit --flux-dir outside it stays
    return 1 if any(c.status == "failed" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
