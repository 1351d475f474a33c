"""Device detection and the mixed-precision choice, reported in the run_started event."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, replace

import torch

from ..contract.errors import ConfigError
from .cpu_load import busy_cores_now, usable_cores


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cuda" | "cpu"
    name: str
    memory_gb: float | None
    capability: str | None
    torch: str
    cuda: str | None
    mixed_precision: str  # resolved: "no" | "fp16" | "bf16"
    # torch's intra-op threads (choose_cpu_threads): CPU kernels split their sums by it, so on the CPU it is part
    # of what produced a LoRA, and the manifest records it with the device.
    cpu_threads: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def with_threads(self, chosen: dict) -> "DeviceInfo":
        return replace(self, cpu_threads=chosen["threads"])


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


def choose_cpu_threads(requested: int | None, *, saved: int | None = None) -> dict:
    """Set torch's intra-op thread count and say why. Order: the config's cpu_threads, then OMP_NUM_THREADS, then the
    count a resumed checkpoint was trained with, then one thread per usable core. CPU kernels split their sums by
    the thread count, so the count is part of what a run computes (with 1 or 2 threads the tiny SD1.5 LoRA differs
    in half its tensors): it must never follow the neighbours' load, or two runs of one config give two LoRAs. The
    load decides only how idle OpenMP threads wait (cpu_load.prepare_openmp, before torch was imported), which
    changes no result; busy cores are reported (cpu_cores_busy) because cpu_threads can trade the match for speed."""
    cores = usable_cores()
    busy = None
    if requested:
        threads, source = requested, "config"
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads, source = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    elif saved:
        threads, source = int(saved), "checkpoint"
    else:
        threads, source = cores, "auto"
        busy = busy_cores_now()
    torch.set_num_threads(threads)
    return {"threads": torch.get_num_threads(), "cores": cores, "busy_cores": None if busy is None else
            round(busy, 2), "source": source, "wait_policy": os.environ.get("OMP_WAIT_POLICY") or None}


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


def cpu_warnings(device_type: str, precision: str, threads: dict | None = None) -> list[dict]:
    """The warnings a CPU run starts with; ``threads``: choose_cpu_threads' answer."""
    warnings: list[dict] = []
    if device_type != "cpu":
        return warnings
    warnings.append({"code": "no_gpu", "message": "no CUDA GPU in use: training runs on the CPU, which is slow"})
    busy = round((threads or {}).get("busy_cores") or 0)
    if busy and threads["source"] == "auto":
        idle = max(1, threads["cores"] - busy)
        warnings.append({"code": "cpu_cores_busy", "path": "cpu_threads",
                         "message": f"other processes keep {threads['busy_cores']} of the {threads['cores']} usable "
                                    f"cores busy; training still uses {threads['threads']} threads, one per core, so "
                                    "that its LoRA does not depend on their load (with OMP_WAIT_POLICY="
                                    f"{threads.get('wait_policy') or 'default'}: idle threads "
                                    f"{'sleep' if threads.get('wait_policy') == 'PASSIVE' else 'spin'}), and its "
                                    "steps wait for the busy cores: measured 1.1-1.3x slower than fewer threads "
                                    "with sleeping threads, up to 16x with spinning ones (bench/RESULTS.md). "
                                    f"Set cpu_threads to {idle} to use only the idle cores (the LoRA is then the "
                                    "same for every run with that count)"})
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
