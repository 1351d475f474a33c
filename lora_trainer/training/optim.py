"""Optimizers and learning-rate schedules. Optional packages are imported only when chosen."""
from __future__ import annotations

import torch

from ..contract.errors import ConfigError


def _missing(package: str, optimizer: str, extra: str) -> ConfigError:
    return ConfigError(f"optimizer '{optimizer}' needs the '{package}' package, which is not installed",
                       [{"path": "optimizer", "value": optimizer, "message": f"{package} is not installed",
                         "allowed": "adamw, or install the package"}],
                       hint=f"pip install {extra}")


def build_optimizer(name: str, param_groups: list[dict], *, lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    if name == "adamw":
        # Fused AdamW: one kernel per step on CUDA, and on the CPU it beat foreach too (bench/RESULTS.md:
        # optimizer 46 -> 13 ms per step on the quarter-width SDXL, 3-5% of the whole step).
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "adamw8bit":
        if device.type != "cuda":
            raise ConfigError("the 8-bit AdamW of bitsandbytes needs a CUDA GPU",
                              [{"path": "optimizer", "value": name, "message": "training runs on the CPU",
                                "allowed": "adamw, prodigy or adafactor"}])
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise _missing("bitsandbytes", name, "bitsandbytes") from None
        return bnb.optim.AdamW8bit(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise _missing("prodigyopt", name, "prodigyopt") from None
        return Prodigy(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # With an explicit lr Adafactor must not pick its own relative step size.
        return Adafactor(param_groups, lr=lr, weight_decay=weight_decay, relative_step=False, scale_parameter=False,
                         warmup_init=False)
    raise ConfigError(f"unknown optimizer {name!r}", [{"path": "optimizer", "value": name, "message": "unknown",
                                                       "allowed": "adamw, adamw8bit, prodigy, adafactor"}])


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
