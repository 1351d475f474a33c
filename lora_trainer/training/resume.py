"""What goes into a checkpoint and how a run continues from one.

A checkpoint holds the LoRA weights, optimizer, LR scheduler and every RNG state plus the TrainingProgress
record, so that a resumed run draws exactly the numbers the uninterrupted run would have drawn. Settings that
would make the continuation a different run (model, rank, targets, data) must match; the rest may change
and is reported in the `resumed` event.
"""
from __future__ import annotations

import copy
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import (TrainingProgress, find_latest_checkpoint, flatten_state, load_checkpoint,
                         save_checkpoint, unflatten_state, verify_checkpoint)
from ..adapters.lora import peft_state
from ..contract.errors import ConfigError
from ..preflight.checkpoints import quick_check, rejection_message
from ..distributed.shard import full_tensors, is_sharded, load_lora_state, lora_state, shard_optimizer_state

MUST_MATCH = ("family", "prediction_type", "base_model", "lora_rank", "lora_alpha", "target_modules", "text_encoder_target_modules",
              "train_text_encoder", "use_dora", "network_type", "lokr_factor", "lokr_decompose_both",
              "lycoris_effective_conv", "dataset_fingerprint", "resolution", "bucketing", "batch_size",
              "gradient_accumulation_steps", "seed", "optimizer", "world_size", "cache_latents", "merge_lora",
              "merge_lora_scale", "train_experts")
# The rest of the recipe may change: the checkpoint stays valid, the following steps train differently, so each
# change is listed in `resumed.changed` (noise, caption and dropout settings included: before, they changed the
# run silently).
MAY_CHANGE = ("max_train_steps", "num_epochs", "learning_rate", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps",
              "checkpointing_steps", "checkpoints_total_limit", "log_every_n_steps", "validation_steps",
              "mixed_precision", "noise_offset", "min_snr_gamma", "caption_dropout_rate", "shuffle_tags",
              "keep_tokens", "lora_dropout", "weight_decay", "max_grad_norm", "flip_aug", "random_crop",
              "flow_sigma_sampling", "flow_logit_mean", "flow_logit_std", "flow_mode_scale", "flow_sigmoid_scale",
              "flow_shift", "flow_shift_value", "flow_loss_weighting", "flow_precondition_outputs",
              "train_guidance_scale", "shard_base", "ema_decay", "ema_device", "ema_update_interval", "ema_warmup",
              "ema_sampling", "eval_dataset_path", "eval_split", "eval_steps", "eval_timesteps",
              "eval_seed", "eval_max_images",
              "masked_loss", "mask_path", "alpha_mask", "require_masks",
              "mask_min_value", "mask_normalize")


@dataclass
class TrainState:
    """What changes while training and is saved with the LoRA weights: the progress record, the optimizer and its
    LR schedule, the noise/timestep generator, the loss EMA and the loss history."""

    progress: TrainingProgress = field(default_factory=TrainingProgress)
    optimizer: Any = None
    lr_scheduler: Any = None
    noise_gen: torch.Generator | None = None
    loss_ema: torch.Tensor | None = None
    loss_history: list = field(default_factory=list)
    weights_ema: Any = None  # training/ema.py AdapterEMA (ema_decay), or None
    eval_history: list = field(default_factory=list)  # (step, mean, per-level losses): eval_loss.py
    # Which run this is, across resumes: made at a fresh start, restored from checkpoints. The outputs record it, so
    # a retry can tell its own finished LoRA (rewrite it, bitwise the same) from another run's (never overwrite);
    # its times make the LoRA's metadata the same however often the run was resumed.
    lineage: dict = field(default_factory=lambda: new_lineage())


def new_lineage() -> dict:
    return {"id": uuid.uuid4().hex, "started_at": time.time(), "finished_at": None}


@dataclass
class CheckpointRun:
    """What checkpointing needs from a run, and nothing else (the recipe builds it; this module never sees it).

    modules: the plain (unwrapped) modules that carry LoRA, by component: their parameters are the ones DDP trains.
    identity: run_identity(...) of this run; tool_file: PEFT states -> the ComfyUI/A1111 files' tensors by name.
    rebuild_scheduler(total_steps): a fresh LR schedule, for a resume that changes the run's length."""

    cfg: Any
    events: Any
    accelerator: Any
    modules: dict[str, torch.nn.Module]
    state: TrainState
    identity: dict[str, Any]
    tool_file: Callable[[dict], dict]
    rebuild_scheduler: Callable[[], Any]

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        return any(is_sharded(m) for m in self.modules.values())


def checkpoints_root(cfg) -> Path:
    return cfg.output_path / "checkpoints"


def run_identity(cfg, *, family: str, prediction_type: str, dataset_fingerprint: str, resolution: int,
                 bucketing: bool, world_size: int, mixed_precision: str) -> dict[str, Any]:
    ident = {k: getattr(cfg, k) for k in MUST_MATCH + MAY_CHANGE if hasattr(cfg, k)}
    ident.update(family=family, prediction_type=prediction_type, lora_alpha=cfg.alpha,
                 dataset_fingerprint=dataset_fingerprint, resolution=resolution, bucketing=bucketing,
                 world_size=world_size, mixed_precision=mixed_precision)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ident.items()}


def saved_identity(resume_summary: dict | None) -> dict:
    """The run identity stored in the checkpoint preflight picked to resume from ({} when starting fresh)."""
    folder = (resume_summary or {}).get("checkpoint") if (resume_summary or {}).get("found") else None
    try:
        data = json.loads((Path(folder) / "run.json").read_text(encoding="utf-8")) if folder else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def compare_identity(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], dict[str, dict]]:
    """(MUST_MATCH keys that differ: refused; MAY_CHANGE keys that differ: {"from", "to"}). A key an older
    checkpoint did not record is neither (nothing to compare with)."""
    mismatched = [k for k in MUST_MATCH if k in saved and saved[k] != now.get(k)]
    changed = {k: {"from": saved[k], "to": now.get(k)} for k in MAY_CHANGE if k in saved and saved[k] != now.get(k)}
    return mismatched, changed


def _own_rng(run: CheckpointRun) -> list[torch.Tensor]:
    """The generators that differ between ranks: noise/timesteps, and torch's default ones (LoRA dropout)."""
    states = [run.state.noise_gen.get_state(), torch.get_rng_state()]
    if torch.cuda.is_available():
        states.append(torch.cuda.get_rng_state())
    return [s.to(torch.uint8).flatten() for s in states]


def _gather_rank_rng(run: CheckpointRun) -> torch.Tensor | None:
    """[world, n] uint8: every rank's _own_rng, concatenated (a collective: every rank must call it). The states
    have the same size on every rank, so one tensor all-gather carries them, without pickling objects."""
    if run.world == 1:
        return None
    mine = torch.cat(_own_rng(run)).to(run.accelerator.device)
    return run.accelerator.gather(mine[None]).cpu()


def _restore_rank_rng(run: CheckpointRun, table: torch.Tensor) -> None:
    row = table[run.accelerator.process_index]
    sizes = [s.numel() for s in _own_rng(run)]
    if row.numel() != sum(sizes):
        raise ConfigError("the checkpoint's per-process random states do not fit this machine's devices",
                          [{"path": "resume", "value": str(run.cfg.resume), "message": "saved on other devices",
                            "allowed": "resume on the same kind of devices, or resume: false"}])
    parts = list(torch.split(row, sizes))
    run.state.noise_gen.set_state(parts[0].clone())
    torch.set_rng_state(parts[1].clone())
    if len(parts) > 2:
        torch.cuda.set_rng_state(parts[2].clone())


def _host_copy(obj: Any) -> Any:
    """A state's tensors copied to host memory (nested dicts, lists): the optimizer updates its state in place at
    the next step while a background write may still be reading this one."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


def snapshot(run: CheckpointRun, reason: str) -> Callable[[], Path] | None:
    """The checkpoint of the current step, taken now: every rank must call it (the collectives happen here). On
    the main process it returns the write (serialise, write atomically, emit the ``checkpoint`` event once the
    files are durable), which reads nothing of the live run and may run on another thread; None elsewhere."""
    from ..outputs import final as outputs

    st = run.state
    rank_rng = _gather_rank_rng(run)
    states = opt_state = None
    ema = st.weights_ema if run.accelerator.is_main_process else None
    ema_files, ema_json = ema.checkpoint() if ema is not None else ({}, None)
    if run.sharded or run.accelerator.is_main_process:
        # Sharded (shard_base): whole tensors are all-gathered, a collective every process joins; rank 0 writes.
        states = {name: {k: v.to("cpu") for k, v in lora_state(m).items()} for name, m in run.modules.items()}
        opt_state = st.optimizer.state_dict()
        opt_state = _host_copy(full_tensors(opt_state) if run.sharded else opt_state)
    if not run.accelerator.is_main_process:
        return None
    step = st.progress.global_step
    outputs.check_finite(states, f"checkpoint at step {step}")
    outputs.check_finite(ema_files, f"checkpoint at step {step}")
    opt_tensors, opt_skel = flatten_state(opt_state, "optimizer")
    sched_tensors, sched_skel = flatten_state(_host_copy(st.lr_scheduler.state_dict()), "lr_scheduler")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "noise_generator": st.noise_gen.get_state(), "loss_ema": st.loss_ema.detach().to("cpu", copy=True)}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if rank_rng is not None:
        rng["ranks"] = rank_rng
    rng_tensors, rng_skel = flatten_state(rng, "rng")
    files = {f"lora_{name}": state for name, state in states.items()}
    files["optimizer"] = {**opt_tensors, **sched_tensors, **rng_tensors}
    files.update(ema_files)
    json_files = copy.deepcopy({  # by value: the run goes on changing these while the write reads them
        "progress": st.progress.to_json(), "run": run.identity, "lineage": st.lineage,
        "history": {"loss": [list(p) for p in st.loss_history], "eval": [list(p) for p in st.eval_history]},
        "state": {"optimizer": opt_skel, "lr_scheduler": sched_skel, "rng": rng_skel,
                  **({"ema": ema_json} if ema_json is not None else {})}})

    def write() -> Path:
        files.update(run.tool_file(states))  # "lora" (+ "lora_<group>" per denoiser group: export_groups)
        path = save_checkpoint(checkpoints_root(run.cfg), step, files, json_files,
                               keep_last=run.cfg.checkpoints_total_limit)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        run.events.emit("checkpoint", step=step, path=str(path), reason=reason, size_bytes=size)
        return path

    return write


def save(run: CheckpointRun, reason: str) -> Path | None:
    """Write a checkpoint of the current step now (main process only); every rank waits for it."""
    write = snapshot(run, reason)
    path = write() if write is not None else None
    run.accelerator.wait_for_everyone()
    return path


def _pick(cfg, events) -> Path | None:
    if cfg.resume is False:
        return None
    if cfg.resume == "auto":
        rejected: list[tuple[Path, str]] = []
        path = find_latest_checkpoint(checkpoints_root(cfg), rejected=rejected)
        for bad, reason in rejected:
            # Damage the sizes and headers show was reported by preflight (the same warning, in this run's
            # events); what only the hashes show (a flipped bit in tensor data) is reported here.
            if quick_check(bad)[0]:
                events.emit("warning", code="checkpoint_rejected", message=rejection_message(bad, reason, path),
                            path="resume", files=[str(bad)])
        return path
    path = cfg.resolve(str(cfg.resume))  # the folder preflight checked
    ok, reason = verify_checkpoint(path) if path.exists() else (False, "no such directory")
    if not ok:
        raise ConfigError(f"cannot resume from {path}: {reason}",
                          [{"path": "resume", "value": str(cfg.resume), "message": reason,
                            "allowed": "false, \"auto\", or the path of a complete checkpoint directory"}])
    return path


def check_lora_modules(path: Path, tensors: dict, modules: dict[str, torch.nn.Module]) -> None:
    """A checkpoint whose LoRA covers modules this run does not train cannot be continued exactly (its optimizer
    state is sized for them too): a config error naming them, not a failure inside PEFT. Checkpoints written before
    LoRA left out the text-encoder layers whose output is never read (FamilySpec.text_encoder_reads) are such."""
    extra = {name: sorted(set(tensors.get(f"lora_{name}", {})) - set(peft_state(module)))
             for name, module in modules.items()}
    extra = {name: keys for name, keys in extra.items() if keys}
    if extra:
        listed = "; ".join(f"{name}: {len(keys)} tensor(s), e.g. {keys[0]}" for name, keys in extra.items())
        reason = f"it holds LoRA on modules this run does not train ({listed})"
        raise ConfigError(f"cannot resume from {path}: {reason}",
                          [{"path": "resume", "value": str(path), "message": reason,
                            "allowed": "resume: false to start over, or init_lora set to the run's exported LoRA "
                                       "(the modules this run does not train are left out)"}],
                          hint="such a checkpoint was written with other targets, or by a version that also put "
                               "LoRA on text-encoder layers whose output the model never reads")


def maybe_resume(run: CheckpointRun) -> Path | None:
    """Restore the newest (or the configured) checkpoint into run.modules and run.state; None when starting fresh."""
    path = _pick(run.cfg, run.events)
    if path is None:
        return None
    st, device = run.state, run.accelerator.device
    tensors, js = load_checkpoint(path)
    saved, now = js["run"], run.identity
    mismatched, changed = compare_identity(saved, now)
    if mismatched:
        raise ConfigError(f"checkpoint {path.name} was made with different settings: {', '.join(mismatched)}",
                          [{"path": k, "value": now.get(k), "message": f"checkpoint has {saved[k]!r}",
                            "allowed": f"{saved[k]!r} to resume, or resume: false to start over"} for k in mismatched],
                          hint="these settings must match to continue a run exactly")
    check_lora_modules(path, tensors, run.modules)
    for name, module in run.modules.items():
        load_lora_state(module, {k: v.to(device) for k, v in tensors[f"lora_{name}"].items()})
    skel = js["state"]
    opt_t = tensors["optimizer"]
    opt_state = unflatten_state(skel["optimizer"], opt_t)
    st.optimizer.load_state_dict(shard_optimizer_state(opt_state, st.optimizer) if run.sharded else opt_state)
    st.lr_scheduler.load_state_dict(unflatten_state(skel["lr_scheduler"], opt_t))
    rng = unflatten_state(skel["rng"], opt_t)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    st.noise_gen.set_state(rng["noise_generator"])
    if "ranks" in rng and run.world > 1:  # world_size must match (MUST_MATCH), so every rank has its row
        _restore_rank_rng(run, rng["ranks"])
    st.loss_ema.copy_(rng["loss_ema"].to(device))
    if st.weights_ema is not None:
        st.weights_ema.restore(tensors, skel.get("ema"))
    st.progress = TrainingProgress.from_json(js["progress"])
    st.loss_history = [tuple(p) for p in js.get("history", {}).get("loss", [])]
    st.eval_history = [tuple(p) for p in js.get("history", {}).get("eval", [])]
    if isinstance(js.get("lineage"), dict) and js["lineage"].get("id"):  # older checkpoints lack it: a new lineage
        st.lineage = dict(js["lineage"])
    if "max_train_steps" in changed or "num_epochs" in changed:
        # A new length must also move the schedule's end; the restored step count stays.
        last = st.lr_scheduler.last_epoch
        st.lr_scheduler = run.rebuild_scheduler()
        for _ in range(last):
            st.lr_scheduler.step()
    run.events.emit("resumed", checkpoint=str(path), step=st.progress.global_step, epoch=st.progress.epoch,
                    changed=changed)
    return path
