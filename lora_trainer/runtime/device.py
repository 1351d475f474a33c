"""Device detection and the mixed-precision choice, reported in the run_started event."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from ..contract.errors import ConfigError


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cuda" | "cpu"
    name: str
    memory_gb: float | None
    capability: str | None
    torch: str
    cuda: str | None
    mixed_precision: str  # resolved: "no" | "fp16" | "bf16"

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str, mixed_precision: str) -> DeviceInfo:
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ConfigError("device is 'cuda' but no CUDA GPU is available",
                          [{"path": "device", "value": "cuda", "message": "no CUDA GPU visible to torch",
                            "allowed": "\"auto\" or \"cpu\" on this machine"}],
                          hint="check `nvidia-smi`, the container's --gpus flag, and that torch is a CUDA build")
    use_cuda = has_cuda and device != "cpu"
    if use_cuda:
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        bf16_ok = torch.cuda.is_bf16_supported()
        precision = mixed_precision if mixed_precision != "auto" else ("bf16" if bf16_ok else "fp16")
        if precision == "bf16" and not bf16_ok:
            raise ConfigError("this GPU does not support bf16",
                              [{"path": "mixed_precision", "value": "bf16", "message": f"{props.name} has no bf16 support",
                                "allowed": "\"fp16\", \"no\" or \"auto\""}])
        return DeviceInfo("cuda", props.name, round(props.total_memory / 2**30, 2), f"{props.major}.{props.minor}",
                          torch.__version__, torch.version.cuda, precision)
    # On the CPU, autocast buys little and fp16 has no gradient scaler: fp32 unless bf16 was asked for.
    precision = "no" if mixed_precision in ("auto", "no") else mixed_precision
    if precision == "fp16":
        raise ConfigError("fp16 mixed precision needs a CUDA GPU",
                          [{"path": "mixed_precision", "value": "fp16", "message": "no CUDA GPU in use",
                            "allowed": "\"no\", \"bf16\" or \"auto\" on the CPU"}])
    name = platform.processor() or platform.machine() or "cpu"
    return DeviceInfo("cpu", f"{name} ({os.cpu_count()} cores)", None, None, torch.__version__, None, precision)


def gpu_memory(index: int) -> dict:
    """CUDA device ``index`` (this process's: LOCAL_RANK) as torch sees it, for the memory plan when torch is loaded
    (the trainer's preflight): a MIG instance is the device it is, and mem_get_info gives its free memory. That
    measurement already lacks this process's CUDA context (created by the call if not before), which the plan counts
    among its parts, so the room the plan may fill (memory_bytes) adds it back."""
    from ..preflight.memory_plan import CONTEXT_BYTES

    count = torch.cuda.device_count()
    if index >= count:
        return {"name": None, "index": index, "uuid": None, "total_bytes": None, "free_bytes": None,
                "memory_bytes": None, "source": "torch", "known": False,
                "reason": f"LOCAL_RANK is {index} but torch sees {count} GPU(s)"}
    free, total = torch.cuda.mem_get_info(index)
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    return {"name": props.name, "index": index, "uuid": str(uuid) if uuid is not None else None, "total_bytes": total,
            "free_bytes": free, "memory_bytes": min(total, free + CONTEXT_BYTES), "source": "torch", "known": True}


def _busy_cores(cores: list[int], window_s: float = 0.1) -> float | None:
    """How many of ``cores`` other processes keep busy now: /proc/stat sampled over ``window_s`` (this process
    sleeps meanwhile, so the figure is the neighbours'). None where /proc/stat is not available."""
    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                name, *vals = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    ticks = [int(v) for v in vals]
                    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
                    out[int(name[3:])] = (sum(ticks), idle)
        return out

    try:
        first = sample()
        time.sleep(window_s)
        second = sample()
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for c, (total, idle) in second.items():
        d_total, d_idle = total - first[c][0], idle - first[c][1]
        busy += (1 - d_idle / d_total) if d_total > 0 else 0.0
    return busy


def choose_cpu_threads(requested: int | None, *, saved: int | None = None) -> dict:
    """Set torch's intra-op thread count and say why. torch takes one thread per core; on cores shared with
    another busy process its spinning threads wait on each other and a step gets up to 15x slower
    (bench/RESULTS.md), so "auto" leaves the cores that others keep busy. Order: the config's cpu_threads, then
    OMP_NUM_THREADS, then the count a resumed checkpoint was trained with (CPU kernels may reduce in another order
    with another count, and a resume must end bitwise equal), then the idle cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    busy = None
    if requested:
        threads, source = requested, "config"
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads, source = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    elif saved:
        threads, source = int(saved), "checkpoint"
    else:
        busy = _busy_cores(cores)
        threads, source = max(1, len(cores) - round(busy or 0.0)), "auto"
    torch.set_num_threads(threads)
    return {"threads": torch.get_num_threads(), "cores": len(cores), "busy_cores": None if busy is None else
            round(busy, 2), "source": source}


def weight_dtype(precision: str) -> torch.dtype:
    """Frozen weights are stored in the compute precision; trainable LoRA weights stay fp32 (see trainer)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def memory_stats(device: torch.device) -> dict:
    stats: dict = {}
    try:
        import resource

        stats["rss_peak_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    except (ImportError, OSError):
        pass
    if device.type == "cuda":
        stats["gpu_allocated_gb"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)
        stats["gpu_reserved_gb"] = round(torch.cuda.memory_reserved(device) / 2**30, 3)
        stats["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        stats["gpu_reserved_peak_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    return stats


def cpu_warnings(device_type: str, precision: str) -> list[dict]:
    """The warnings a CPU run starts with."""
    warnings: list[dict] = []
    if device_type != "cpu":
        return warnings
    warnings.append({"code": "no_gpu", "message": "no CUDA GPU in use: training runs on the CPU, which is slow"})
    if precision == "bf16":  # measured: bench/RESULTS.md, "Profile of train_lora's step"
        warnings.append({"code": "cpu_bf16_slow", "path": "mixed_precision",
                         "message": "bf16 on the CPU: measured 1.1-1.3x slower than fp32 for SDXL but 2.3-2.9x faster "
                                    "for FLUX.1, with LoRA gradients that drift from fp32 (bench/RESULTS.md); \"auto\" "
                                    "or \"no\" trains in fp32"})
    return warnings


class StepMemory:
    """The step event's memory figures beside the memory plan; a drift over 15% is a warning, once."""

    def __init__(self, plan: dict | None, events):
        self.plan, self.events, self.warned = plan, events, False

    def stats(self, device: torch.device) -> dict:
        from ..preflight.memory_plan import drift_warning

        mem = memory_stats(device)
        if self.plan:
            mem["plan_gb"] = self.plan["total_gib"]
            message = None if self.warned else drift_warning(self.plan, mem)
            if message:
                self.warned = True
                self.events.emit("warning", code="memory_plan_drift", message=message)
        return mem
