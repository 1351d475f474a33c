"""Device detection and the mixed-precision choice, reported in the run_started event."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

import torch

from .errors import ConfigError


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
    return stats
