"""The training recipe: setup -> train -> save_final -> cleanup.

The loop knows nothing about model families (they sit behind ModelFamily), nothing about file formats
(export.py, checkpoint.py) and nothing about the objective's maths (objective.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch

from .. import __version__
from ..outputs import final as outputs
from . import ema as ema_mod, resume as resume_mod
from .background import BackgroundWriter
from .checkpoint import checkpoint_dir
from .eval_loss import HeldOutLoss
from .resume import CheckpointRun, TrainState
from ..config.config import TrainConfig
from ..data.datasets import build_run_images, describe, run_plan
from ..data.images import decode_failures
from ..data.masks import MaskSet
from ..runtime.device import StepMemory, choose_cpu_threads, cpu_warnings, resolve_device, weight_dtype
from ..contract.errors import DatasetError, Interrupted
from ..contract.events import EventStream
from .guards import NonFiniteGuard, is_out_of_memory, oom_error
from ..families import get_family
from ..families.adapter import Components
from ..families.spec import objective_summary
from ..runtime.offload import summary as offload_summary
from ..distributed.routed import broadcast_weights, reduce_gradients, routed_denoisers
from ..distributed.shard import local_value, no_sync, summary as shard_summary
from ..outputs.report import tracker_for
from ..runtime.signals import GracefulStop, stop_agreed

log = logging.getLogger("train_lora")
# Test hook: steps whose loss is replaced by NaN, to exercise the non-finite path through the real CLI.
_FAULT_NAN_STEPS = {int(s) for s in os.environ.get("TRAIN_LORA_TEST_NAN_STEPS", "").split(",") if s.strip()}
_FAULT_OOM_STEP = int(os.environ.get("TRAIN_LORA_TEST_OOM_STEP", "0") or 0)
_FAULT_SIGTERM_STEP = int(os.environ.get("TRAIN_LORA_TEST_SIGTERM_STEP", "0") or 0)  # as if `kill` came mid-step
_FAULT_KILL_AFTER_EXPORT = os.environ.get("TRAIN_LORA_TEST_KILL_AFTER_EXPORT") == "1"  # SIGKILL before `completed`


class Trainer:
    def __init__(self, cfg: TrainConfig, events: EventStream, *, stop: GracefulStop | None = None, debug: bool = False):
        self.cfg = cfg
        self.events = events
        self.stop = stop or GracefulStop()
        self.debug = debug
        self.started = time.monotonic()
        self.state = TrainState()
        self.comps: Components | None = None
        self.last_loss: float | None = None
        self.resumed_from: Path | None = None
        self.last_saved: tuple[int, Path | None] | None = None  # (step, path) of the newest checkpoint written
        self.writer = BackgroundWriter()  # interval checkpoints are written while training goes on

    # The training state lives in one TrainState (what a checkpoint saves); these read and write it.
    progress = property(lambda self: self.state.progress, lambda self, v: setattr(self.state, "progress", v))
    optimizer = property(lambda self: self.state.optimizer, lambda self, v: setattr(self.state, "optimizer", v))
    lr_scheduler = property(lambda self: self.state.lr_scheduler,
                            lambda self, v: setattr(self.state, "lr_scheduler", v))
    noise_gen = property(lambda self: self.state.noise_gen, lambda self, v: setattr(self.state, "noise_gen", v))
    loss_ema = property(lambda self: self.state.loss_ema, lambda self, v: setattr(self.state, "loss_ema", v))
    loss_history = property(lambda self: self.state.loss_history,
                            lambda self, v: setattr(self.state, "loss_history", v))

    # ---------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, ev = self.cfg, self.events
        ev.start_heartbeat(cfg.heartbeat_seconds)
        from ..runtime.loading import preflight_for_training

        pre, self.downloaded = preflight_for_training(cfg, ev)
        self.probe, self.scan = pre.probe, pre.scan
        self.memory_plan = pre.summary.get("memory")
        self.step_memory = StepMemory(self.memory_plan, ev)

        self.device_info = resolve_device(cfg.device, cfg.mixed_precision)
        self.cpu_threads = choose_cpu_threads(
            cfg.cpu_threads, saved=resume_mod.saved_identity(pre.summary.get("resume")).get("cpu_threads"))
        self.device_info = self.device_info.with_threads(self.cpu_threads)
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.accelerator = Accelerator(mixed_precision=self.device_info.mixed_precision,
                                       cpu=self.device_info.type == "cpu", log_with=tracker_for(cfg),
                                       project_dir=str(cfg.output_path / "logs"))
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        bg = cfg.background_checkpoints
        self.background_checkpoints = self.device.type != "cpu" if bg == "auto" else bool(bg)
        self.events.enabled = self.events.enabled and self.is_main
        for warning in cpu_warnings(self.device.type, self.device_info.mixed_precision, self.cpu_threads):
            ev.emit("warning", **warning)
        set_seed(cfg.seed)

        self.family = get_family(self.probe.family, cfg)
        self.resolution, self.bucketing = self.scan.resolution, self.scan.bucketing
        from ..runtime.loading import load_components

        self.comps = load_components(cfg, self.family, self.probe, ev, downloaded=self.downloaded,
                                     dtype=weight_dtype(self.device_info.mixed_precision))
        self._prepare_data()
        self._attach_lora()
        self._build_optimizer()
        self.state.weights_ema = ema_mod.build(cfg, self.denoiser_params + self.te_params, self.lora_modules, self.device)
        self.resumed_from = resume_mod.maybe_resume(self._checkpoint_run())
        if self.resumed_from is not None:
            self.last_saved = (self.progress.global_step, self.resumed_from)
            self.last_loss = next((h[1] for h in reversed(self.loss_history) if h[1] is not None), None)
        if cfg.report_to != "none":
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}
            self.accelerator.init_trackers("train_lora", config=flat)
        ev.emit("run_started", version=__version__, pid=os.getpid(), family=self.family.name,
                config=cfg.to_dict(), device=self.device_info.to_dict(), mixed_precision=self.device_info.mixed_precision,
                world_size=self.accelerator.num_processes, total_steps=self.total_steps,
                start_step=self.progress.global_step, num_images=len(self.images),
                num_clips=sum(img.is_clip for img in self.images),
                samples_per_epoch=self.samples_per_epoch, effective_batch_size=self.effective_batch,
                resume_from=str(self.resumed_from) if self.resumed_from else None,
                resolution=self.resolution, bucketing=self.bucketing, prediction_type=self.comps.prediction_type,
                datasets=describe(cfg, self.scan, self.images),
                variant=self.comps.variant,
                objective=objective_summary(self.cfg, self.family.spec, self.comps.variant),
                cpu_threads=self.cpu_threads, latent_cache=self.latent_plan, memory_plan=self.memory_plan,
                offload=offload_summary(self.streamers), shard=shard_summary(self.shards),
                compile=self.compiled.summary() if self.compiled else None, lora_forward=self.lora_forward,
                text_cache={**self.text_cache.plan(), "text_encoders_released": not self.comps.text_encoders}
                if self.text_cache is not None else None)

    def _prepare_data(self) -> None:
        # Unreadable images were already reported by preflight's image_unreadable warning (with the files), and
        # "no usable image" is a preflight error: the scan's usable records are all that is left to train on.
        cfg, ev, scan = self.cfg, self.events, self.scan
        self.world = self.accelerator.num_processes
        images = build_run_images(cfg, scan, self.resolution, self.bucketing, self.family.name, self.comps.variant)
        comps = self.comps
        self.masks = MaskSet.for_run(cfg, scan, images)  # None unless masked_loss
        self.latent_cache = self.latent_plan = None
        if cfg.cache_latents:
            from ..data.images import build_latent_cache

            ev.set_phase("caching_latents")
            self.latent_cache, self.latent_plan, failed = build_latent_cache(
                cfg, self.family, comps, images, device=self.device, world=self.world,
                source=self.downloaded or self.probe.path, events=ev, masks=self.masks)
        else:
            failed = decode_failures(images, cfg)
            comps.vae.to(self.device)
        if failed:
            # The header scan passed these, but their pixels do not decode: skip them, once, loudly.
            ev.emit("warning", code="images_skipped", message=f"{len(failed)} image(s) failed to decode and are skipped",
                    files=[f"{img.rel}: {msg}" for img, msg in failed[:50]])
            bad = {img.index for img, _ in failed}
            images = [img for img in images if img.index not in bad]
        if not any(img.role == "train" for img in images):  # regularisation alone would plan empty epochs
            raise DatasetError(f"no train image in {cfg.dataset_path or 'the train datasets'} could be decoded",
                               hint="re-export the images as PNG or JPEG")
        self.images = images
        self.by_index = {img.index: img for img in images}
        self.samples_per_epoch, batches = sum(map(len, epoch0 := run_plan(cfg, images, 0))), len(epoch0)  # + reg
        # Each rank takes every world-th batch; an optimizer step consumes grad_accum batches per rank.
        per_rank = -(-batches // self.world)
        self.steps_per_epoch = max(1, -(-per_rank // cfg.gradient_accumulation_steps))
        self.total_steps = cfg.max_train_steps or cfg.num_epochs * self.steps_per_epoch
        self.effective_batch = cfg.batch_size * cfg.gradient_accumulation_steps * self.world

        self.text_cache, self.held_out = None, HeldOutLoss.prepare(self)  # validation loss's held-out set (eval_*)
        for te in comps.text_encoders.values():
            te.to(self.device)
        # Without tag shuffling a step's caption is its image's built caption, or "" when caption dropout fires:
        # a finite set, all cached.
        if cfg.cache_text_embeddings and not cfg.train_text_encoder and not cfg.shuffle_tags:
            self._cache_text()
            for te in comps.text_encoders.values():
                te.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _cache_text(self) -> None:
        from ..data.text_cache import build_run_cache

        self.events.set_phase("caching_text")
        source = self.downloaded or (Path(self.probe.path) if self.probe.path else None)
        self.text_cache = build_run_cache(self.cfg, self.family, self.comps, self.images, device=self.device,
                                          world=self.world, source=source, events=self.events)

    def _attach_lora(self) -> None:
        from .attach import attach_adapters

        a = attach_adapters(self.cfg, self.family, self.comps, self.device, self.events, world=self.world)
        # lora_modules: the modules that carry LoRA, by component name: what checkpoints, resume and export read.
        self.lora_modules, self.streamers, self.shards, self.compiled = a.lora_modules, a.streamers, a.shards, a.compiled
        self.lora_forward = a.lora_forward
        self.denoiser_params, self.te_params = a.denoiser_params, a.te_params

    def _build_optimizer(self) -> None:
        from .optim import build_lr_scheduler, build_optimizer

        cfg = self.cfg
        groups = [{"params": self.denoiser_params, "lr": cfg.learning_rate}]
        if self.te_params:
            groups.append({"params": self.te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
        self.optimizer = build_optimizer(cfg.optimizer, groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                         device=self.device)
        self.lr_scheduler = build_lr_scheduler(cfg.lr_scheduler, self.optimizer, warmup_steps=cfg.lr_warmup_steps,
                                               total_steps=self.total_steps)
        # Sharded denoisers (shard_base) reduce their own gradients, and so do routed ones (distributed/routed.py:
        # a step may not run them all): DDP must not wrap them too.
        self.routed = routed_denoisers(self.family, self.comps, self.world, self.shards)
        names = [n for n in self.lora_modules if n not in self.shards and n not in self.routed]
        prepared = self.accelerator.prepare(*(self.lora_modules[n] for n in names), self.optimizer)
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)  # prepare(x) returns x itself
        self.optimizer = prepared[-1]
        wrapped = {**dict(zip(names, prepared[:-1])),
                   **{n: self.lora_modules[n] for n in (*self.shards, *self.routed)}}
        broadcast_weights([self.lora_modules[n] for n in self.routed])
        # Denoisers and trained text encoders run through their prepared (DDP) wrappers so their LoRA gradients
        # are averaged across ranks; the plain modules stay in comps (and lora_modules) for sampling and saving.
        self.denoisers = {n: wrapped[n] for n in self.comps.denoisers}
        self.train_comps = dataclasses.replace(
            self.comps, text_encoders={n: wrapped.get(n, te) for n, te in self.comps.text_encoders.items()})
        self.objective = self.family.objective(self.comps)
        # A dedicated generator for noise and timesteps: its state is saved in checkpoints for exact resume.
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + self.accelerator.process_index)
        self.loss_ema = torch.zeros((), device=self.device, dtype=torch.float32)
        self.loss_history: list[tuple[int, float | None, float]] = []  # (step, loss or None if skipped, lr)
        self.step_ok, self.step_loss = True, float("nan")
        self.nonfinite = NonFiniteGuard(self.events)

    # ---------------------------------------------------------------------------------------- train
    def train(self) -> None:
        cfg, ev, prog = self.cfg, self.events, self.progress
        ev.set_phase("training")
        ev.emit("status", phase="training", message=f"training {self.total_steps - prog.global_step} step(s)")
        self.stop.set_deferred(True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # gpu_peak_gb then means training, not VAE caching
        session_start, session_step0 = time.monotonic(), prog.global_step
        if cfg.validation_steps and prog.global_step == 0:
            self._sample(0)  # the base model's images, for comparison
        self.held_out.maybe(self, prog.global_step)  # step 0: the base model's (a resume has it in the history)
        window_start, window_samples = time.monotonic(), 0
        accum = cfg.gradient_accumulation_steps
        try:
            while prog.global_step < self.total_steps:
                batches = run_plan(cfg, self.images, prog.epoch)
                mine = batches[self.accelerator.process_index::self.world]
                while prog.batch_in_epoch < len(mine) and prog.global_step < self.total_steps:
                    group = mine[prog.batch_in_epoch:prog.batch_in_epoch + accum]
                    t0 = time.monotonic()
                    loss = self._optimizer_step(group, prog.epoch, prog.batch_in_epoch)
                    self.writer.check()  # a failed background write (disk full) stops the run here
                    prog.batch_in_epoch += len(group)
                    prog.global_step += 1
                    prog.samples_seen += sum(len(b) for b in group) * self.world
                    prog.elapsed_s += time.monotonic() - t0
                    window_samples += sum(len(b) for b in group) * self.world
                    self.loss_history.append((prog.global_step, self.step_loss if self.step_ok else None,
                                              self.lr_scheduler.get_last_lr()[0]))
                    ema_mod.update(self.state.weights_ema, self.step_ok, prog.global_step)
                    if self.step_ok:  # a skipped non-finite step must not poison the smoothed loss
                        if prog.global_step > 1:
                            self.loss_ema.mul_(0.9).add_(loss.detach().float(), alpha=0.1)
                        else:
                            self.loss_ema.copy_(loss.detach().float())
                    step = prog.global_step
                    if step % cfg.log_every_n_steps == 0 or step == session_step0 + 1 or step == self.total_steps:
                        self._emit_step(window_samples, time.monotonic() - window_start,
                                        (time.monotonic() - session_start) / max(1, step - session_step0))
                        window_start, window_samples = time.monotonic(), 0
                    if cfg.validation_steps and (step % cfg.validation_steps == 0 or step == self.total_steps):
                        self._sample(step)
                    self.held_out.maybe(self, step)  # before the checkpoint, which then keeps this step's value
                    if cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0 and step < self.total_steps:
                        self.save_checkpoint("interval", background=self.background_checkpoints)
                    if stop_agreed(self.stop, self.accelerator, self.device):
                        self._stop_now()
                if prog.batch_in_epoch >= len(mine):
                    prog.epoch += 1
                    prog.batch_in_epoch = 0
        except Interrupted:
            # Only rank 0 writes events: every rank logs (stderr) where it stopped, so that "all ranks stop at the
            # same step" can be checked from outside.
            log.info("rank %d stopped after step %d", self.accelerator.process_index, prog.global_step)
            raise
        except (RuntimeError, MemoryError) as exc:  # CUDA's OutOfMemoryError is a RuntimeError
            if is_out_of_memory(exc):  # GPU or host allocator (guards.py)
                raise oom_error(exc, prog.global_step + 1, self.device) from None
            raise
        finally:
            self.stop.set_deferred(False)

    def _sample(self, step: int) -> None:
        from .sampling import generate_samples, validation_model

        generate_samples(self.cfg, self.family, self.comps, accelerator=self.accelerator, events=self.events,
                         resolution=self.resolution, step=step, every_rank=bool(self.shards), validation_model=validation_model(self),
                         cached=self.text_cache.batch if self.text_cache is not None and not self.comps.text_encoders
                         else None, ema=self.state.weights_ema)
        self.accelerator.wait_for_everyone()

    def _optimizer_step(self, group: list[list[int]], epoch: int, first_batch: int) -> torch.Tensor:
        total_samples = sum(len(b) for b in group)
        loss_sum = torch.zeros((), device=self.device)
        for j, batch in enumerate(group):
            last = j == len(group) - 1
            with contextlib.ExitStack() as ctx:
                if not last:  # gradients are all-reduced once, on the group's last micro-batch
                    for denoiser in self.denoisers.values():
                        ctx.enter_context(no_sync(denoiser, self.accelerator))
                with self.accelerator.autocast():
                    loss = self._loss(batch, epoch, first_batch + j)
                    if self.progress.global_step + 1 in _FAULT_NAN_STEPS:
                        loss = loss * float("nan")
                    if self.progress.global_step + 1 == _FAULT_SIGTERM_STEP and j == 0:
                        os.kill(os.getpid(), signal.SIGTERM)
                    if self.progress.global_step + 1 == _FAULT_OOM_STEP:
                        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by TRAIN_LORA_TEST_OOM_STEP)")
                # Weight each micro-batch by its share of samples: a short last batch counts less.
                scaled = loss * (len(batch) / total_samples)
                self.accelerator.backward(scaled)
            loss_sum += scaled.detach()
        reduce_gradients([self.lora_modules[n] for n in self.routed], self.world)
        params = self.denoiser_params + self.te_params
        if self.cfg.max_grad_norm > 0:
            grad_norm = local_value(self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            grad_norm = local_value(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        # One host sync per step: the price of never letting a NaN/inf reach the weights (it would then be
        # in every later checkpoint). The scalar is tiny; the wait is for the step's own kernels.
        if self.world > 1:
            # The mean over ranks: what the step optimised, and the same on every rank, so that all ranks take the
            # same skip-or-step decision below (DDP weights would drift apart otherwise).
            loss_sum = self.accelerator.reduce(loss_sum.detach().float(), reduction="mean")
        loss_value, norm_value = torch.stack([loss_sum.float(), grad_norm.float()]).tolist()
        self.step_ok = math.isfinite(loss_value) and math.isfinite(norm_value)
        self.step_loss = loss_value
        if getattr(self.accelerator, "scaler", None) is not None and math.isfinite(loss_value):
            # fp16: overflowing gradients are the grad scaler's business. Its step skips the update and lowers
            # the scale (and it must run, or the scaler's unscale bookkeeping breaks); not a divergence.
            self.optimizer.step()
        elif self.step_ok:
            self.optimizer.step()
            self.nonfinite.ok()
        else:
            self.nonfinite.skip(self.progress.global_step + 1, loss_value, norm_value)
            if getattr(self.accelerator, "scaler", None) is not None and self.cfg.max_grad_norm > 0:
                self.accelerator.scaler.update()  # clip_grad_norm_ already unscaled: close the scaler's step
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def _loss(self, batch: list[int], epoch: int, batch_index: int) -> torch.Tensor:
        from . import batch as inputs

        cfg, fam, comps = self.cfg, self.family, self.comps
        captions = inputs.captions(cfg, self.by_index, batch, epoch, batch_index)
        latents, geometry, masks = inputs.latents(cfg, fam, comps.vae, self.by_index, self.latent_cache, self.masks,
                                                  batch, epoch, batch_index, self.device)
        if self.text_cache is not None:
            cond = self.text_cache.batch(captions)  # on self.device already
        elif cfg.train_text_encoder:
            cond = fam.encode_text(self.train_comps, captions, self.device)
        else:
            with torch.no_grad():
                cond = fam.encode_text(comps, captions, self.device)

        def model_fn(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return fam.predict(self.denoisers, noisy, t, cond, geometry)

        extra = inputs.weights(self.masks, masks, latents, self.by_index, batch)
        return self.objective(model_fn, latents, generator=self.noise_gen, extra=extra)

    def _emit_step(self, samples: int, window_s: float, s_per_step: float) -> None:
        value = self.step_loss  # non-finite values are sent as null; _optimizer_step already guarded the weights
        if self.step_ok:
            self.last_loss = value
        prog = self.progress
        loss_avg = float(self.loss_ema.item())
        lr = self.lr_scheduler.get_last_lr()[0]
        images_per_sec = samples / window_s if window_s > 0 else None
        if self.cfg.report_to != "none":
            self.accelerator.log({"loss": value, "loss_avg": loss_avg, "lr": lr,
                                  "images_per_sec": images_per_sec or 0.0}, step=prog.global_step)
        self.events.emit("step", step=prog.global_step, total_steps=self.total_steps, epoch=prog.epoch,
                         loss=value, loss_avg=loss_avg, lr=lr, images_per_sec=images_per_sec,
                         eta_s=round(s_per_step * (self.total_steps - prog.global_step), 1),
                         elapsed_s=round(prog.elapsed_s, 3), memory=self.step_memory.stats(self.device),
                         **(self.compiled.step_fields(prog.global_step, self.events) if self.compiled else {}))

    def _stop_now(self) -> None:
        signum = self.stop.signum or signal.SIGTERM
        with self.stop.saving():
            self.writer.wait()  # a write in flight is finished first: it may be this very step's checkpoint
        if self.last_saved is not None and self.last_saved[0] == self.progress.global_step:
            path = self.last_saved[1]  # the interval checkpoint of this very step: saving it again only costs time
        else:
            path = self.save_checkpoint("interrupt")
        self._write_report("interrupted")
        self.events.emit("interrupted", signal=signal.Signals(signum).name, step=self.progress.global_step,
                         checkpoint=str(path) if path else None,
                         message=f"stopped after step {self.progress.global_step}; resume with \"resume\": \"auto\"")
        exc = Interrupted(signum, f"stopped by {signal.Signals(signum).name}")
        exc.reported = True
        raise exc

    # ---------------------------------------------------------------------------------------- save
    def save_checkpoint(self, reason: str, *, background: bool = False) -> Path | None:
        """The checkpoint of this step; ``background``: taken now, written while training goes on (the path is
        where it will be; its ``checkpoint`` event comes when it is durable)."""
        with self.stop.saving():
            self.writer.wait()
            write = resume_mod.snapshot(self._checkpoint_run(), reason)
            if write is not None and background:
                self.writer.submit(write)
                path = checkpoint_dir(resume_mod.checkpoints_root(self.cfg), self.progress.global_step)
            else:
                path = write() if write is not None else None
            self.accelerator.wait_for_everyone()
        self.last_saved = (self.progress.global_step, path)
        return path

    def _record(self) -> outputs.RunRecord:
        return outputs.RunRecord(cfg=self.cfg, family=self.family, comps=self.comps, run_id=self.events.run_id,
                                 device_info=self.device_info, world=self.world, started=self.started,
                                 images=self.images, scan=self.scan, resolution=self.resolution,
                                 bucketing=self.bucketing, samples_per_epoch=self.samples_per_epoch,
                                 total_steps=self.total_steps, lineage=self.state.lineage)

    def _checkpoint_run(self) -> CheckpointRun:
        from .optim import build_lr_scheduler

        cfg = self.cfg
        identity = resume_mod.run_identity(
            cfg, family=self.family.name, prediction_type=self.comps.prediction_type,
            dataset_fingerprint=self.scan.fingerprint, resolution=self.resolution, bucketing=self.bucketing,
            world_size=self.world, mixed_precision=self.device_info.mixed_precision)
        identity["cpu_threads"] = self.cpu_threads["threads"]  # what a resume reuses (device.choose_cpu_threads)
        return CheckpointRun(cfg=cfg, events=self.events, accelerator=self.accelerator, modules=dict(self.lora_modules),
                             state=self.state, identity=identity,
                             tool_file=lambda states: outputs.tool_file(self._record(), states),
                             rebuild_scheduler=lambda: build_lr_scheduler(
                                 cfg.lr_scheduler, self.optimizer, warmup_steps=cfg.lr_warmup_steps,
                                 total_steps=self.total_steps))

    def save_final(self) -> None:
        self.events.set_phase("saving")
        self.writer.wait()
        lineage = self.state.lineage
        if not (self.last_saved and self.last_saved[0] == self.progress.global_step and lineage["finished_at"]):
            lineage["finished_at"] = time.time()
            self.save_checkpoint("final")  # a finished run is resumable too, e.g. to extend it with more steps
        # else a retry of a finished run (killed while exporting): its final checkpoint is this state, and the
        # outputs are rewritten from it, bitwise as they were
        with self.stop.saving():
            paths = outputs.export_final(self._record(), modules=dict(self.lora_modules), progress=self.progress,
                                         last_loss=self.last_loss, is_main=self.is_main, ema=self.state.weights_ema)
            if _FAULT_KILL_AFTER_EXPORT:
                os.kill(os.getpid(), signal.SIGKILL)
            self.accelerator.wait_for_everyone()
            paths.update(self._write_report("completed"))
        self.events.emit("completed", outputs=paths, steps=self.progress.global_step,
                         duration_s=round(time.monotonic() - self.started, 3), final_loss=self.last_loss)

    def _write_report(self, status: str) -> dict[str, str]:
        if not self.accelerator.is_main_process:
            return {}
        from ..outputs.report import try_write_report

        return try_write_report(self.cfg, self.events, status=status, family=self.family.name,
                                step=self.progress.global_step, total_steps=self.total_steps, run_id=self.events.run_id,
                                device_info=self.device_info, loss_history=self.loss_history, final_loss=self.last_loss,
                                eval_history=self.state.eval_history, duration_s=time.monotonic() - self.started,
                                variant=self.family.variant, groups=self.family.file_groups(self.denoisers))

    def cleanup(self) -> None:
        try:
            self.writer.wait()  # never exit under a write in flight; its error is secondary to the one ending the run
        except Exception as exc:  # noqa: BLE001
            log.error("a background checkpoint write failed: %s", exc)
        if getattr(self, "accelerator", None) is not None and self.cfg.report_to != "none":
            self.accelerator.end_training()
        self.events.stop_heartbeat()
        self.stop.uninstall()
        self.comps = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
