"""Diffusion training objective, independent of model family.

The objective knows only a DDPM-style noise scheduler (anything with
``alphas_cumprod``, ``add_noise`` and ``get_velocity``, e.g. diffusers'
``DDPMScheduler``) and a model callable ``model_fn(noisy_latents, timesteps)``.
Conditioning (text embeddings, SDXL ``added_cond_kwargs``, ...) is bound into
that callable by the caller, so SD 1.5, 2.x and SDXL share this code.

API::

    settings = ObjectiveSettings(prediction_type="epsilon", noise_offset=0.05,
                                 min_snr_gamma=5.0, timestep_range=None)
    objective = DiffusionObjective(noise_scheduler, settings)
    loss = objective(lambda x, t: unet(x, t, text_emb).sample, latents, generator)

    objective.sample(latents, generator)       -> (noise, timesteps, noisy_latents)
    objective.target(latents, noise, timesteps) -> regression target
    objective.loss_weights(timesteps)           -> per-sample float32 weights or None
    objective.loss(model_pred, target, timesteps) -> scalar float32 loss

Reproducibility: every random draw (noise, noise offset, timesteps, in that
order) goes through ``generator``, or the global RNG of the latents' device
when it is None. Draws happen on the generator's device, so pass a generator
living on the latents' device to avoid a host-to-device copy per step; saving
``generator.get_state()`` with a checkpoint makes resumed runs bit-identical.
Noise is drawn in float32 and then cast, so the random stream does not depend
on the training precision.

Nothing here reads tensor values back to the host (no ``.item()``, no Python
branches on tensor data), so a training step never forces a device sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from diffusers.training_utils import compute_snr

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class ObjectiveSettings:
    """Hyper-parameters of the objective.

    prediction_type: "epsilon" | "v_prediction"; take it from the base model's
        scheduler config, since it must match what the base model was trained on.
    noise_offset: 0 disables; otherwise adds ``noise_offset * N(0, 1)`` per
        (sample, channel), broadcast over the spatial dims.
    min_snr_gamma: None disables min-SNR loss weighting (Hang et al. 2023).
    timestep_range: optional ``[min, max)`` subset of the train timesteps.
    """

    prediction_type: str
    noise_offset: float = 0.0
    min_snr_gamma: Optional[float] = None
    timestep_range: Optional[Tuple[int, int]] = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if self.noise_offset < 0:
            raise ValueError(f"noise_offset must be >= 0, got {self.noise_offset}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or None, got {self.min_snr_gamma}")
        if self.timestep_range is not None:
            # Configs deliver lists; a tuple keeps the frozen dataclass hashable.
            lo, hi = (int(v) for v in self.timestep_range)
            object.__setattr__(self, "timestep_range", (lo, hi))


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor],
                 extra: Optional["LossWeights"] = None) -> torch.Tensor:
    """Float32 MSE: mean over non-batch dims, times the per-sample weights (if any), batch mean. Shared with
    flow.FlowMatchingObjective. ``extra``: the data's own weights (a mask per element, a weight per sample)."""
    # Squaring bf16 / fp16 differences loses most of the small residuals
    # late in training; upcast first.
    err = (pred.float() - target.float()).square()
    if extra is not None and extra.elements is not None:
        err = err * extra.elements.float()
    per_sample = err.mean(dim=tuple(range(1, err.ndim)))
    if weights is not None:
        per_sample = per_sample * weights
    if extra is not None and extra.samples is not None:
        per_sample = per_sample * extra.samples.float()
    return per_sample.mean()


@dataclass(frozen=True)
class LossWeights:
    """Weights the data puts on a batch's loss, beside the objective's own w(t): ``elements`` broadcasts against the
    latents [B, C, ...] (a loss mask on the latent grid), ``samples`` is [B] (a dataset's loss weight)."""
    elements: Optional[torch.Tensor] = None
    samples: Optional[torch.Tensor] = None

    @staticmethod
    def of(*parts: Optional["LossWeights"]) -> Optional["LossWeights"]:
        """One LossWeights from the data's parts (masks give elements, datasets give samples); None when none has
        any, so an unweighted run computes exactly what it did before weights existed."""
        elements = [p.elements for p in parts if p is not None and p.elements is not None]
        samples = [p.samples for p in parts if p is not None and p.samples is not None]
        if not elements and not samples:
            return None
        prod = lambda ts: None if not ts else ts[0] if len(ts) == 1 else torch.stack(torch.broadcast_tensors(*ts)).prod(0)
        return LossWeights(elements=prod(elements), samples=prod(samples))


class DiffusionObjective:
    """Noise sampling, targets and (weighted) loss for DDPM-style training."""

    timestep_kind = "ddpm_index"  # model_fn receives integer timesteps (flow.FlowMatchingObjective: sigmas)
    # Validation loss (training/eval_loss.py): kohya's fixed timesteps 200/400/600/800 of 1000, as fractions.
    default_eval_levels = (0.2, 0.4, 0.6, 0.8)

    def __init__(self, noise_scheduler, settings: ObjectiveSettings) -> None:
        self.scheduler = noise_scheduler
        self.settings = settings
        num_train_timesteps = len(noise_scheduler.alphas_cumprod)
        lo, hi = settings.timestep_range or (0, num_train_timesteps)
        if not 0 <= lo < hi <= num_train_timesteps:
            raise ValueError(
                f"timestep_range must satisfy 0 <= min < max <= {num_train_timesteps}, got {(lo, hi)}"
            )
        self.t_min, self.t_max = lo, hi
        # SNR depends only on the timestep: build the table once with diffusers'
        # own formula, then keep one copy per device so steps only index it.
        self._snr_cpu = compute_snr(noise_scheduler, torch.arange(num_train_timesteps)).float()
        self._snr_by_device: dict = {}

    def _snr(self, device: torch.device) -> torch.Tensor:
        table = self._snr_by_device.get(device)
        if table is None:
            table = self._snr_by_device[device] = self._snr_cpu.to(device)
        return table

    def sample(
        self, latents: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw (noise, timesteps, noisy_latents) for a batch of clean latents."""
        draw_device = generator.device if generator is not None else latents.device
        noise = torch.randn(
            latents.shape, generator=generator, device=draw_device, dtype=torch.float32
        )
        if self.settings.noise_offset > 0:
            # One shift per (sample, channel) teaches the model to change mean
            # brightness, which zero-mean noise at every pixel cannot.
            offset_shape = latents.shape[:2] + (1,) * (latents.ndim - 2)
            offset = torch.randn(
                offset_shape, generator=generator, device=draw_device, dtype=torch.float32
            )
            noise = noise + self.settings.noise_offset * offset
        timesteps = torch.randint(
            self.t_min, self.t_max, (latents.shape[0],),
            generator=generator, device=draw_device, dtype=torch.long,
        )
        noise = noise.to(device=latents.device, dtype=latents.dtype)
        timesteps = timesteps.to(latents.device)
        noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
        return noise, timesteps, noisy_latents

    def target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the model should predict for these noisy latents."""
        if self.settings.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def loss_weights(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample float32 min-SNR weights, or None when weighting is off."""
        gamma = self.settings.min_snr_gamma
        if gamma is None:
            return None
        # Min-SNR wants an x0-space weight of min(snr, gamma). Epsilon MSE is
        # x0 MSE times snr and v MSE is x0 MSE times (snr + 1): divide those out.
        snr = self._snr(timesteps.device)[timesteps]
        if self.settings.prediction_type == "epsilon":
            # min(snr, gamma) / snr as clamp(gamma / snr, max=1), so that a
            # zero-terminal-SNR schedule (snr == 0) gives 1 rather than 0/0 = NaN.
            return (gamma / snr).clamp(max=1.0)
        return snr.clamp(max=gamma) / (snr + 1.0)

    def loss(
        self, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
        extra: Optional[LossWeights] = None,
    ) -> torch.Tensor:
        """Float32 MSE: mean over non-batch dims, min-SNR weighted, batch mean."""
        return weighted_mse(model_pred, target, self.loss_weights(timesteps), extra)

    def fixed_loss(
        self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor,
        noise: torch.Tensor, level: float, extra: Optional[LossWeights] = None,
    ) -> torch.Tensor:
        """The loss at one fixed noise level with the given noise (validation loss): draws nothing, so the same
        weights give the same value. ``level`` in (0, 1] is a fraction of the schedule: t = round(level * T), at
        most T - 1 (noise_offset and timestep_range are training's sampling, not applied here)."""
        num_train_timesteps = len(self.scheduler.alphas_cumprod)
        t = min(num_train_timesteps - 1, round(level * num_train_timesteps))
        timesteps = torch.full((latents.shape[0],), t, device=latents.device, dtype=torch.long)
        noise = noise.to(device=latents.device, dtype=latents.dtype)
        noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
        target = self.target(latents, noise, timesteps)
        return self.loss(model_fn(noisy_latents, timesteps), target, timesteps, extra)

    def __call__(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        latents: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        extra: Optional[LossWeights] = None,
    ) -> torch.Tensor:
        """One training-step loss; ``model_fn(noisy_latents, timesteps) -> prediction``."""
        noise, timesteps, noisy_latents = self.sample(latents, generator)
        target = self.target(latents, noise, timesteps)
        model_pred = model_fn(noisy_latents, timesteps)
        return self.loss(model_pred, target, timesteps, extra)
