"""What goes into a checkpoint and how a run continues from one.

A checkpoint holds the LoRA weights, optimizer, LR scheduler and every RNG state plus the TrainingProgress
record, so that a resumed run draws exactly the numbers the uninterrupted run would have drawn. Settings that
would make the continuation a different run (model, rank, targets, data) must match; the rest may change
and is reported in the `resumed` event.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .checkpoint import (TrainingProgress, find_latest_checkpoint, flatten_state, load_checkpoint,
                         save_checkpoint, unflatten_state, verify_checkpoint)
from .errors import ConfigError
from .lora import load_lora_state, lora_state

if TYPE_CHECKING:
    from .trainer import Trainer

MUST_MATCH = ("family", "prediction_type", "base_model", "lora_rank", "lora_alpha", "target_modules", "text_encoder_target_modules",
              "train_text_encoder", "use_dora", "dataset_fingerprint", "resolution", "bucketing", "batch_size",
              "gradient_accumulation_steps", "seed", "optimizer", "world_size", "cache_latents")
MAY_CHANGE = ("max_train_steps", "num_epochs", "learning_rate", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps",
              "checkpointing_steps", "checkpoints_total_limit", "log_every_n_steps", "validation_steps",
              "mixed_precision")


def checkpoints_root(trainer: "Trainer") -> Path:
    return trainer.cfg.output_path / "checkpoints"


def _run_identity(t: "Trainer") -> dict[str, Any]:
    cfg = t.cfg
    ident = {k: getattr(cfg, k) for k in MUST_MATCH + MAY_CHANGE if hasattr(cfg, k)}
    ident.update(family=t.family.name, prediction_type=t.comps.prediction_type, lora_alpha=cfg.alpha,
                 dataset_fingerprint=t.scan.fingerprint, resolution=t.resolution, bucketing=t.bucketing, world_size=t.world,
                 mixed_precision=t.device_info.mixed_precision)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ident.items()}


def _components(t: "Trainer") -> dict[str, torch.nn.Module]:
    return dict(t.lora_modules)  # plain (unwrapped) modules: their parameters are the ones DDP trains


def _own_rng(t: "Trainer") -> list[torch.Tensor]:
    """The generators that differ between ranks: noise/timesteps, and torch's default ones (LoRA dropout)."""
    states = [t.noise_gen.get_state(), torch.get_rng_state()]
    if torch.cuda.is_available():
        states.append(torch.cuda.get_rng_state())
    return [s.to(torch.uint8).flatten() for s in states]


def _gather_rank_rng(t: "Trainer") -> torch.Tensor | None:
    """[world, n] uint8: every rank's _own_rng, concatenated (a collective: every rank must call it). The states
    have the same size on every rank, so one tensor all-gather carries them, without pickling objects."""
    if t.world == 1:
        return None
    mine = torch.cat(_own_rng(t)).to(t.device)
    return t.accelerator.gather(mine[None]).cpu()


def _restore_rank_rng(t: "Trainer", table: torch.Tensor) -> None:
    row = table[t.accelerator.process_index]
    sizes = [s.numel() for s in _own_rng(t)]
    if row.numel() != sum(sizes):
        raise ConfigError("the checkpoint's per-process random states do not fit this machine's devices",
                          [{"path": "resume", "value": str(t.cfg.resume), "message": "saved on other devices",
                            "allowed": "resume on the same kind of devices, or resume: false"}])
    parts = list(torch.split(row, sizes))
    t.noise_gen.set_state(parts[0].clone())
    torch.set_rng_state(parts[1].clone())
    if len(parts) > 2:
        torch.cuda.set_rng_state(parts[2].clone())


def save(t: "Trainer", reason: str) -> Path | None:
    """Write a checkpoint of the current step (main process only); every rank waits for it."""
    from . import outputs

    path = None
    rank_rng = _gather_rank_rng(t)
    if t.accelerator.is_main_process:
        states = {name: lora_state(m) for name, m in _components(t).items()}
        outputs.check_finite(states, f"checkpoint at step {t.progress.global_step}")
        opt_tensors, opt_skel = flatten_state(t.optimizer.state_dict(), "optimizer")
        sched_tensors, sched_skel = flatten_state(t.lr_scheduler.state_dict(), "lr_scheduler")
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "noise_generator": t.noise_gen.get_state(), "loss_ema": t.loss_ema.detach().cpu()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if rank_rng is not None:
            rng["ranks"] = rank_rng
        rng_tensors, rng_skel = flatten_state(rng, "rng")
        files = {f"lora_{name}": state for name, state in states.items()}
        files["lora"] = outputs.kohya_for_checkpoint(t, states)
        files["optimizer"] = {**opt_tensors, **sched_tensors, **rng_tensors}
        json_files = {"progress": t.progress.to_json(), "run": _run_identity(t),
                      "history": {"loss": [list(p) for p in t.loss_history]},
                      "state": {"optimizer": opt_skel, "lr_scheduler": sched_skel, "rng": rng_skel}}
        path = save_checkpoint(checkpoints_root(t), t.progress.global_step, files, json_files,
                               keep_last=t.cfg.checkpoints_total_limit)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        t.events.emit("checkpoint", step=t.progress.global_step, path=str(path), reason=reason, size_bytes=size)
    t.accelerator.wait_for_everyone()
    return path


def _pick(t: "Trainer") -> Path | None:
    cfg = t.cfg
    if cfg.resume is False:
        return None
    if cfg.resume == "auto":
        return find_latest_checkpoint(checkpoints_root(t))
    path = cfg.resolve(str(cfg.resume))  # the folder preflight checked
    ok, reason = verify_checkpoint(path) if path.exists() else (False, "no such directory")
    if not ok:
        raise ConfigError(f"cannot resume from {path}: {reason}",
                          [{"path": "resume", "value": str(cfg.resume), "message": reason,
                            "allowed": "false, \"auto\", or the path of a complete checkpoint directory"}])
    return path


def maybe_resume(t: "Trainer") -> Path | None:
    path = _pick(t)
    if path is None:
        return None
    tensors, js = load_checkpoint(path)
    saved, now = js["run"], _run_identity(t)
    mismatched = [k for k in MUST_MATCH if k in saved and saved[k] != now.get(k)]
    if mismatched:
        raise ConfigError(f"checkpoint {path.name} was made with different settings: {', '.join(mismatched)}",
                          [{"path": k, "value": now.get(k), "message": f"checkpoint has {saved[k]!r}",
                            "allowed": f"{saved[k]!r} to resume, or resume: false to start over"} for k in mismatched],
                          hint="these settings must match to continue a run exactly")
    changed = {k: {"from": saved.get(k), "to": now.get(k)} for k in MAY_CHANGE if saved.get(k) != now.get(k)}
    for name, module in _components(t).items():
        load_lora_state(module, {k: v.to(t.device) for k, v in tensors[f"lora_{name}"].items()})
    skel = js["state"]
    opt_t = tensors["optimizer"]
    t.optimizer.load_state_dict(unflatten_state(skel["optimizer"], opt_t))
    t.lr_scheduler.load_state_dict(unflatten_state(skel["lr_scheduler"], opt_t))
    rng = unflatten_state(skel["rng"], opt_t)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    t.noise_gen.set_state(rng["noise_generator"])
    if "ranks" in rng and t.world > 1:  # world_size must match (MUST_MATCH), so every rank has its row
        _restore_rank_rng(t, rng["ranks"])
    t.loss_ema.copy_(rng["loss_ema"].to(t.device))
    t.progress = TrainingProgress.from_json(js["progress"])
    t.loss_history = [tuple(p) for p in js.get("history", {}).get("loss", [])]
    if "max_train_steps" in changed or "num_epochs" in changed:
        # A new length must also move the schedule's end; the restored step count stays.
        from .optim import build_lr_scheduler

        last = t.lr_scheduler.last_epoch
        t.lr_scheduler = build_lr_scheduler(t.cfg.lr_scheduler, t.optimizer, warmup_steps=t.cfg.lr_warmup_steps,
                                            total_steps=t.total_steps)
        for _ in range(last):
            t.lr_scheduler.step()
    t.events.emit("resumed", checkpoint=str(path), step=t.progress.global_step, epoch=t.progress.epoch, changed=changed)
    return path
