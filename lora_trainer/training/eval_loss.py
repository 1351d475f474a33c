"""Validation loss on a held-out set (the ``eval_*`` keys; "validation" elsewhere means sample images).

Every ``eval_steps`` optimizer steps, before training (step 0: the base model's loss, the reference) and at the last
step, the held-out images' loss is computed at fixed noise levels with fixed noise, so values are comparable across
steps and across a resume: the objective's ``fixed_loss`` draws nothing, the noise is one tensor per image made once
from (eval_seed, image path), and the latents (and, without a trained text encoder, the conditioning) are computed
once at setup. The pass cannot change training: it runs under no_grad in eval mode (no LoRA dropout) inside
``torch.random.fork_rng`` (the global CPU/CUDA generators come back as they were), never touches the noise generator
or Python's ``random``, and restores every module's train/eval flag. Values go to the ``eval_loss`` event, the
trackers, the TrainState (so checkpoints keep the history) and from there to the loss plot and the report.

Every process computes the whole set (a sharded denoiser needs all of them in each forward); only rank 0 reports.
"""
from __future__ import annotations

import dataclasses

import random
import time
from dataclasses import dataclass

import torch

from ..contract.errors import DatasetError


@dataclass
class _Batch:
    latents: torch.Tensor  # float32, host
    noise: torch.Tensor  # float32, host; fixed for the run
    geometry: torch.Tensor
    captions: list[str]
    cond: dict[str, torch.Tensor] | None  # None: encoded at each evaluation (the text encoder trains)


def image_noise(seed: int, key: str, shape: torch.Size) -> torch.Tensor:
    """The fixed noise of one held-out image: a function of (eval seed, its path) alone, drawn from a private CPU
    generator (the same on every device and unaffected by batch composition)."""
    gen = torch.Generator("cpu").manual_seed(random.Random(f"eval-noise:{seed}:{key}").getrandbits(63))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


class HeldOutLoss:
    def __init__(self, cfg, batches: list[_Batch], images: int):
        self.cfg = cfg
        self.batches = batches
        self.images = images

    @classmethod
    def prepare(cls, trainer) -> "HeldOutLoss":
        """Encode the held-out set once (the VAE, and the text encoders unless they train); without a held-out set,
        one that never runs. Called before the text cache may release the text encoders; puts them on the device
        (where the trainer puts them next anyway)."""
        from ..data.captions import build_caption
        from ..data.images import LatentCache, model_key

        cfg, fam, comps, ev = trainer.cfg, trainer.family, trainer.comps, trainer.events
        records = trainer.scan.held_out
        if not records:
            return cls(cfg, [], 0)
        from ..data import clips
        from ..data.samples import clip_geometry, images_at

        # A held-out clip is evaluated on its first window only: the same frames at every evaluation.
        vcfg = dataclasses.replace(cfg, video_windows=1, video_start="first")
        images = images_at(cfg, records, trainer.resolution, trainer.bucketing, clip_geometry(fam.name, comps.variant))
        ev.emit("status", phase="caching_latents", message=f"encoding {len(images)} held-out image(s) (eval_loss)")
        disk = cfg.output_path / "cache" / "latents" if cfg.cache_latents_to_disk else None
        cache = LatentCache(disk, model_key(cfg.base_model, comps.vae, trainer.downloaded or trainer.probe.path))
        vae_device = next(comps.vae.parameters()).device
        comps.vae.to(trainer.device)
        with torch.no_grad():  # a centre crop, never flipped: the same pixels at every evaluation
            failed = cache.build(lambda pix: fam.encode_latents(comps.vae, pix), images, device=trainer.device,
                                 seed=cfg.seed, random_crop=False, batch_size=max(1, cfg.batch_size),
                                 progress=lambda n, t: None, cfg=vcfg)
        comps.vae.to(vae_device)
        if failed:
            ev.emit("warning", code="eval_image_unreadable", path="eval_dataset_path",
                    message=f"{len(failed)} held-out image(s) failed to decode and are left out",
                    files=[f"{img.rel}: {msg}" for img, msg in failed[:50]])
            bad = {img.index for img, _ in failed}
            images = [img for img in images if img.index not in bad]
        if not images:
            raise DatasetError("no held-out image could be decoded", hint="replace the held-out images, or turn "
                               "the validation loss off (eval_dataset_path null, eval_split 0)")
        seed = cfg.seed if cfg.eval_seed is None else cfg.eval_seed
        by_bucket: dict[tuple[int, int], list] = {}
        for img in images:
            by_bucket.setdefault((img.frames, *img.bucket), []).append(img)
        batches = []
        live_text = cfg.train_text_encoder
        for te in comps.text_encoders.values():
            te.to(trainer.device)
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for i in range(0, len(group), max(1, cfg.batch_size)):
                chunk = group[i:i + max(1, cfg.batch_size)]
                latents, geometry = cache.batch([clips.slot(vcfg, img, 0) for img in chunk], torch.device("cpu"))
                noise = torch.stack([image_noise(seed, img.rel, latents.shape[1:]) for img in chunk])
                captions = [build_caption(img.caption, img.trigger_words(cfg.trigger_words),
                                          prepend=cfg.prepend_trigger_words) for img in chunk]
                cond = None
                if not live_text:
                    with torch.no_grad():
                        cond = {k: v.to("cpu") for k, v in fam.encode_text(comps, captions, trainer.device).items()}
                batches.append(_Batch(latents, noise, geometry, captions, cond))
        return cls(cfg, batches, len(images))

    def levels(self, objective) -> tuple[float, ...]:
        return tuple(self.cfg.eval_timesteps or objective.default_eval_levels)

    def due(self, step: int, total_steps: int, history: list) -> bool:
        if history and history[-1][0] >= step:  # already measured (a resume starts at a checkpoint's step)
            return False
        return step % self.cfg.eval_steps == 0 or step == total_steps

    def maybe(self, trainer, step: int) -> None:
        if self.images and self.due(step, trainer.total_steps, trainer.state.eval_history):
            self.run(trainer, step)

    def measure(self, trainer) -> list[float]:
        """The mean loss over the held-out images at each level (one host sync at the end)."""
        fam, device, levels = trainer.family, trainer.device, self.levels(trainer.objective)
        modules = list(trainer.denoisers.values()) + list(trainer.comps.text_encoders.values())
        flags = [(m, m.training) for top in modules for m in top.modules()]
        sums = torch.zeros(len(levels), device=device, dtype=torch.float32)
        cuda = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                for top in modules:
                    top.eval()
                for b in self.batches:
                    latents, noise = b.latents.to(device), b.noise.to(device)
                    geometry = b.geometry.to(device)
                    cond = {k: v.to(device) for k, v in b.cond.items()} if b.cond is not None else \
                        fam.encode_text(trainer.comps, b.captions, device)

                    def model_fn(noisy: torch.Tensor, t: torch.Tensor, cond=cond, geometry=geometry) -> torch.Tensor:
                        return fam.predict(trainer.denoisers, noisy, t, cond, geometry)

                    with trainer.accelerator.autocast():
                        for j, level in enumerate(levels):
                            loss = trainer.objective.fixed_loss(model_fn, latents, noise, level)
                            sums[j] += loss.detach().float() * len(b.captions)
        finally:
            for m, flag in flags:
                m.train(flag)
        return (sums / self.images).tolist()

    def run(self, trainer, step: int) -> dict:
        t0 = time.monotonic()
        levels = self.levels(trainer.objective)
        losses = self.measure(trainer)
        mean = sum(losses) / len(losses)
        trainer.state.eval_history.append((step, mean, losses))
        if self.cfg.report_to != "none":
            trainer.accelerator.log({"eval_loss": mean, **{f"eval_loss/t{lv:g}": v for lv, v in zip(levels, losses)}},
                                    step=step)
        record = {"step": step, "loss": mean, "timesteps": list(levels), "losses": losses, "images": self.images,
                  "duration_s": round(time.monotonic() - t0, 3)}
        trainer.events.emit("eval_loss", **record)
        return record
