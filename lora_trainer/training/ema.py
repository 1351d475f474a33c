"""EMA of the adapter weights (config ``ema_decay``): an exponential moving average of every trained tensor.

The maths and its state are diffusers' ``training_utils.EMAModel`` (what diffusers' and SimpleTuner's training
scripts use), so the schedule is the documented one: after optimizer update ``n`` (counted in EMA updates)

    EMA <- d_n * EMA + (1 - d_n) * W,   d_1 = 0 (the first update copies W),
    d_n = min(ema_decay, n / (n + 9)) with ema_warmup, else ema_decay            (n >= 2)

Here the shadow tensors are kept in fp32 on the accelerator or in host memory (``ema_device``), an update follows
only an optimizer step that really changed the weights (a step skipped by the NaN guard leaves the EMA as it was),
and every ``ema_update_interval``-th step. The shadows are read and written by PEFT names through the modules
themselves (``applied``: the EMA swapped into the parameters, then the raw weights copied back bit for bit), so
the checkpoint's ``ema_<component>`` files and the exported LoRA have exactly the layout of the raw weights, for
LoRA, DoRA or any PEFT adapter, on any family, without knowing which.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..distributed.shard import load_lora_state, lora_state


class AdapterEMA:
    def __init__(self, cfg: Any, params: list[torch.nn.Parameter], modules: dict[str, torch.nn.Module],
                 device: torch.device):
        from diffusers.training_utils import EMAModel

        self.params, self.modules = list(params), modules
        self.interval, self.sampling = cfg.ema_update_interval, cfg.ema_sampling
        self.device = torch.device("cpu") if cfg.ema_device == "cpu" else torch.device(device)
        # min_decay == decay turns EMAModel's (1+s)/(10+s) warm-up off: a constant decay (after the first copy).
        self.model = EMAModel(self.params, decay=cfg.ema_decay, min_decay=0.0 if cfg.ema_warmup else cfg.ema_decay,
                              foreach=True)
        self.model.to(device=self.device, dtype=torch.float32)
        if self.model.shadow_params:  # "cuda" resolved to "cuda:0": what update() compares the weights' devices with
            self.device = self.model.shadow_params[0].device

    @property
    def updates(self) -> int:
        return self.model.optimization_step

    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based) changed the weights."""
        if step % self.interval:
            return
        # EMAModel averages tensors on one device and dtype: parameters elsewhere (host shadows, offloaded
        # blocks, non-fp32 adapters) are copied, as trainable leaves so that EMAModel averages rather than copies them.
        params = [p if p.device == self.device and p.dtype == torch.float32
                  else p.detach().to(self.device, torch.float32).requires_grad_() for p in self.params]
        self.model.step(params)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the modules for the duration (sampling, reading the states); the raw ones after."""
        self.model.store(self.params)
        try:
            self.model.copy_to(self.params)
            yield
        finally:
            self.model.restore(self.params)

    def states(self) -> dict[str, dict[str, torch.Tensor]]:
        """{component: {PEFT key: EMA tensor}} (host copies), as distributed.shard.lora_state gives the raw ones."""
        with self.applied():
            return {name: {k: v.to("cpu") for k, v in lora_state(m).items()} for name, m in self.modules.items()}

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """(files {"ema_<component>": tensors}, JSON state): what a checkpoint adds for exact resume."""
        files = {f"ema_{name}": state for name, state in self.states().items()}
        return files, {"updates": self.updates, "decay": self.model.decay, "min_decay": self.model.min_decay}

    def restore(self, tensors: dict[str, dict[str, torch.Tensor]], meta: dict | None) -> None:
        """From a checkpoint's files; a checkpoint without an EMA (the run turned it on at resume) starts it from
        the resumed weights, as a fresh run starts it from the initial ones."""
        if meta is None:
            self.model.shadow_params = [p.detach().to(self.device, torch.float32, copy=True) for p in self.params]
            self.model.optimization_step = 0
            return
        self.model.store(self.params)
        try:
            for name, module in self.modules.items():
                load_lora_state(module, {k: v.to(self.params[0].device) for k, v in tensors[f"ema_{name}"].items()})
            self.model.shadow_params = [p.detach().to(self.device, torch.float32, copy=True) for p in self.params]
        finally:
            self.model.restore(self.params)
        self.model.optimization_step = int(meta["updates"])

    # ------------------------------------------------------------------------------------------ sampling
    def sample_sets(self) -> list[tuple[str, str | None, Any]]:
        """[(weights, subfolder, context)] for one round of samples, per ema_sampling. The step's folder holds the
        set of the kind the exported LoRA is (EMA) or the one asked for; "both" adds the raw set in ``raw/``, as the
        export does. Before the first update the EMA equals the raw weights: one set."""
        ema, raw = ("ema", None, self.applied()), ("raw", None, contextlib.nullcontext())
        if self.sampling == "raw":
            return [raw]
        return [ema] if self.sampling == "ema" or self.updates == 0 else [ema, ("raw", "raw", raw[2])]


def build(cfg: Any, params: list[torch.nn.Parameter], modules: dict[str, torch.nn.Module],
          device: torch.device) -> AdapterEMA | None:
    return AdapterEMA(cfg, params, modules, device) if cfg.ema_decay is not None else None


def sample_sets(ema: AdapterEMA | None) -> list[tuple[str | None, str | None, Any]]:
    """AdapterEMA.sample_sets, or one unlabelled set of the model as it is without EMA."""
    return ema.sample_sets() if ema is not None else [(None, None, contextlib.nullcontext())]


def update(ema: AdapterEMA | None, step_ok: bool, step: int) -> None:
    """After optimizer step ``step``; ``step_ok`` false (skipped by the NaN guard or the fp16 grad scaler): the
    weights did not change, and neither does the EMA."""
    if ema is not None and step_ok:
        ema.update(step)


def summary(cfg: Any, ema: AdapterEMA | None) -> dict | None:
    """The manifest's ``ema`` record: the settings and how many updates the exported weights average."""
    if ema is None:
        return None
    return {"decay": cfg.ema_decay, "warmup": cfg.ema_warmup, "update_interval": cfg.ema_update_interval,
            "device": cfg.ema_device, "updates": ema.updates, "sampling": cfg.ema_sampling}
