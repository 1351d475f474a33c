"""Rectified-flow (flow-matching) training objective for FLUX.1 / SD3-style models.

Forward process and target, as in diffusers' SD3 / FLUX DreamBooth LoRA scripts::

    x_t    = (1 - sigma) * x0 + sigma * noise        # sigma = 1 is pure noise
    target = noise - x0                              # the velocity d x_t / d sigma

With ``precondition_outputs`` (the SD3 script's ``--precondition_outputs``)
the prediction is turned into an x0 estimate ``x_t - sigma * pred`` and
regressed onto ``x0`` instead; that is the velocity loss times ``sigma**2``.

Sigma is drawn in two steps: ``u`` in [0, 1] from ``sigma_sampling``, then
``shift`` maps u to sigma (``shift_sigmas``, a pure function), and the result
is clamped into ``[SIGMA_MIN, 1]``. The model callable gets that per-sample
sigma (float32, shape [B], in (0, 1]); the model family converts it to
whatever its denoiser takes (FLUX: sigma itself, SD3: ``1000 * sigma``).
Conditioning is bound into the callable by the caller, as for the DDPM
objective in ``lora_trainer.objectives.ddpm``.

API::

    settings = FlowSettings(sigma_sampling="logit_normal", shift="resolution",
                            loss_weighting="none", precondition_outputs=False)
    objective = FlowMatchingObjective(settings, patch_size=2)
    loss = objective(lambda x, sigma: transformer(x, sigma, text_emb), latents, generator)

    objective.image_seq_len(latents)                  -> FLUX tokens per sample
    objective.sample_sigmas(batch, seq_len, device, generator) -> float32 [B] sigmas
    objective.sample(latents, generator)              -> (noise, sigmas, noisy_latents)
    objective.target(latents, noise, sigmas)          -> float32 regression target
    objective.loss_weights(sigmas)                    -> per-sample float32 weights or None
    objective.loss(model_pred, target, sigmas, noisy_latents) -> scalar float32 loss

    calculate_shift(image_seq_len, ...)  -> mu of FLUX's resolution-dependent shift
    shift_sigmas(u, settings, image_seq_len) -> sigma (no clamping)

Latents are [B, C, H, W] or [B, C, F, H, W]; sigma is broadcast over every
non-batch dim and the sequence length counts ``patch_size`` x ``patch_size``
patches of the last two dims (times F, a video's latent frames).

Conventions: sigma is the noise level itself, as in the SD3 paper and in
kohya / SimpleTuner / ai-toolkit, so ``logit_mean > 0`` puts more weight on
noisy inputs. diffusers' scripts instead index the descending 1000-step
scheduler table with ``u``, which amounts to ``sigma ~ 1 - u`` on a grid; that
is the same distribution for uniform, mode and ``logit_mean == 0``, but flips
the sign of ``logit_mean``.

Reproducibility: every random draw (noise, then u) goes through
``generator``, or the global RNG of the latents' device when it is None.
Draws happen on the generator's device, so pass a generator living on the
latents' device to avoid a host-to-device copy per step. Noise is drawn in
float32 and then cast, so the random stream does not depend on the training
precision.

Nothing here reads tensor values back to the host (no ``.item()``, no Python
branches on tensor data), so a training step never forces a device sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from .ddpm import LossWeights, weighted_mse
from .sigma_range import restricted_levels, restricted_sigmas

FLOW_SIGMA_SAMPLING = ("uniform", "logit_normal", "mode", "sigmoid")
FLOW_SHIFTS = ("none", "static", "resolution", "area")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")

# Smallest sigma ever trained on. Uniform draws can return u == 0 exactly and
# both shifts keep 0 at 0, but sigma == 0 makes the input the clean latent
# (nothing to learn) and the "sigma_sqrt" weight sigma**-2 infinite. 1e-3 is
# the smallest sigma of the 1000-step FlowMatchEulerDiscreteScheduler table
# that diffusers' SD3 / FLUX scripts index, so the clamp trains on the same
# range they do (it caps that weight at 1e6).
SIGMA_MIN = 1e-3

# The SD3 paper's mode density f(u) = 1 - u - s * (cos(pi u / 2)**2 - 1 + u)
# is a monotone map of [0, 1] onto itself only for -1 <= s <= 2 / (pi - 2);
# outside it is no longer a density transform (and s < -1 leaves [0, 1]).
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))

# Validation loss (training/eval_loss.py): ai-toolkit's fixed validation sigmas.
EVAL_LEVELS = (1.0, 0.75, 0.5, 0.25)


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _finite(name: str, value) -> float:
    # Configs deliver JSON numbers; reject strings, bools, None and NaN/inf
    # here rather than as a NaN loss many steps later.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positive(name: str, value) -> float:
    value = _finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


@dataclass(frozen=True)
class FlowSettings:
    """Hyper-parameters of the flow-matching objective.

    sigma_sampling: how u in [0, 1] is drawn:
        "uniform"; "logit_normal": sigmoid(N(logit_mean, logit_std));
        "mode": SD3's cosine-warped uniform with ``mode_scale`` in
        [-1, 2 / (pi - 2)] (0 is uniform); "sigmoid": sigmoid(sigmoid_scale * N(0, 1))
        (kohya / SimpleTuner / ai-toolkit "sigmoid").
    shift: how u becomes sigma: "none"; "static": s*u / (1 + (s - 1)*u) with
        s = ``shift_value`` (FlowMatchEulerDiscreteScheduler's ``shift``; SD3
        uses 3.0); "resolution": FLUX's resolution-dependent shift, with mu
        linear in the token count from (base_seq_len, base_shift) to
        (max_seq_len, max_shift), applied as exp(mu) / (exp(mu) + 1/u - 1);
        "area": the same map with mu = 0.5 * ln(image_seq_len / area_base_seq_len),
        half the log of the image area against a base area (Ideogram 4's
        resolution-aware logit-normal mean: with "logit_normal" sampling,
        sigma = sigmoid(N(logit_mean + mu, logit_std)), as its pipeline's
        schedule and diffusers' Ideogram 4 script draw it; 1024 tokens of
        16 px = 512 x 512, their base).
    loss_weighting: per-sample weight w(sigma): "none"; "sigma_sqrt": sigma**-2
        (diffusers' name, not a square root); "cosmap": 2 / (pi (1 - 2 sigma + 2 sigma**2)).
    precondition_outputs: regress ``x_t - sigma * pred`` onto x0 instead of
        ``pred`` onto the velocity (SD3 script's ``--precondition_outputs``).

    Every field is validated, also those the chosen modes do not read, so a
    typo in an unused field fails when the config is loaded, not when a
    later config switches the mode on.
    """

    sigma_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0
    shift: str = "none"
    shift_value: float = 3.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    area_base_seq_len: int = 1024
    loss_weighting: str = "none"
    precondition_outputs: bool = False

    def __post_init__(self) -> None:
        _choice("sigma_sampling", self.sigma_sampling, FLOW_SIGMA_SAMPLING)
        _choice("shift", self.shift, FLOW_SHIFTS)
        _choice("loss_weighting", self.loss_weighting, FLOW_WEIGHTINGS)
        floats = {
            "logit_mean": _finite("logit_mean", self.logit_mean),
            # std 0 (or scale 0) would train on one constant sigma: almost
            # certainly a config mistake, and torch.normal rejects std < 0.
            "logit_std": _positive("logit_std", self.logit_std),
            "mode_scale": _finite("mode_scale", self.mode_scale),
            "sigmoid_scale": _positive("sigmoid_scale", self.sigmoid_scale),
            # shift <= 0 maps u into negative or undefined sigmas.
            "shift_value": _positive("shift_value", self.shift_value),
            "base_shift": _finite("base_shift", self.base_shift),
            "max_shift": _finite("max_shift", self.max_shift),
        }
        lo, hi = MODE_SCALE_RANGE
        if not lo <= floats["mode_scale"] <= hi:
            raise ValueError(
                f"mode_scale must be in [{lo}, {hi:.6f}] (SD3 mode sampling), "
                f"got {self.mode_scale}"
            )
        for name in ("base_seq_len", "max_seq_len", "area_base_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_seq_len <= self.base_seq_len:
            # calculate_shift divides by their difference.
            raise ValueError(
                f"max_seq_len must be > base_seq_len, got {self.max_seq_len} <= {self.base_seq_len}"
            )
        if not isinstance(self.precondition_outputs, bool):
            # ValueError like every other settings error, for the config loader.
            raise ValueError(  # noqa: TRY004
                f"precondition_outputs must be true or false, got {self.precondition_outputs!r}"
            )
        # Store plain floats (JSON may deliver ints) so settings compare and
        # hash the same however they were written.
        for name, value in floats.items():
            object.__setattr__(self, name, value)


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's mu: linear in the token count through (base_seq_len, base_shift)
    and (max_seq_len, max_shift), extrapolated outside; the same formula as
    ``diffusers.pipelines.flux.pipeline_flux.calculate_shift``."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def shift_sigmas(u: torch.Tensor, settings: FlowSettings, image_seq_len: int) -> torch.Tensor:
    """Map u in [0, 1] to sigma with ``settings.shift``; keeps 0 -> 0, 1 -> 1.

    Pure and unclamped, so it can be checked against the scheduler's tables;
    ``FlowMatchingObjective.sample_sigmas`` applies the ``SIGMA_MIN`` clamp.
    """
    if settings.shift == "none":
        return u
    if settings.shift == "static":
        s = settings.shift_value
        return s * u / (1.0 + (s - 1.0) * u)
    if settings.shift == "area":
        mu = 0.5 * math.log(image_seq_len / settings.area_base_seq_len)
    else:
        mu = calculate_shift(
            image_seq_len, settings.base_seq_len, settings.max_seq_len,
            settings.base_shift, settings.max_shift,
        )
    # FlowMatchEulerDiscreteScheduler.time_shift, "exponential" type, power 1.
    # At u == 0, 1/u is inf and sigma comes out as exactly 0, not NaN.
    exp_mu = math.exp(mu)
    return exp_mu / (exp_mu + (1.0 / u - 1.0))


class FlowMatchingObjective:
    """Sigma sampling, velocity targets and (weighted) loss for rectified flow."""

    # Tells the model family what ``model_fn`` receives as its second argument.
    timestep_kind = "sigma"

    def __init__(self, settings: FlowSettings, *, patch_size: int = 2,
                 sigma_range: tuple[float, float] | None = None) -> None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be an integer >= 1, got {patch_size!r}")
        if sigma_range is not None and not 0.0 <= sigma_range[0] < sigma_range[1] <= 1.0:
            raise ValueError(f"sigma_range must be (low, high) with 0 <= low < high <= 1, got {sigma_range!r}")
        self.settings = settings
        self.patch_size = patch_size
        # Only sigmas in [low, high) are trained (one expert of a two-expert model: sigma_range.py says how).
        self.sigma_range = sigma_range

    @property
    def default_eval_levels(self) -> tuple[float, ...]:
        if self.sigma_range is None:
            return EVAL_LEVELS
        return restricted_levels(self.sigma_range, EVAL_LEVELS)

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Transformer tokens per sample: patch_size x patch_size patches of (H, W), times the latent frames of a
        video's [B, C, F, H, W] (each frame's patches are tokens, for the resolution and area shifts)."""
        # Shapes are host metadata: this never syncs.
        h, w = latents.shape[-2:]
        frames = latents.shape[2] if latents.ndim == 5 else 1
        return frames * (h // self.patch_size) * (w // self.patch_size)

    def sample_sigmas(
        self,
        batch_size: int,
        image_seq_len: int,
        device,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Float32 [batch_size] sigmas in [SIGMA_MIN, 1] on ``device`` (in ``sigma_range`` when it is set)."""
        s = self.settings
        draw_device = generator.device if generator is not None else torch.device(device)
        if self.sigma_range is not None:
            return restricted_sigmas(s, self.sigma_range, batch_size, image_seq_len, device, generator, draw_device,
                                     lambda u: shift_sigmas(u, s, image_seq_len)).clamp(SIGMA_MIN, 1.0)
        if s.sigma_sampling == "sigmoid":
            u = torch.sigmoid(
                s.sigmoid_scale * torch.randn(
                    (batch_size,), generator=generator, device=draw_device, dtype=torch.float32
                )
            )
        else:
            # diffusers' helper defaults to device="cpu": pass the generator's
            # device explicitly, or a CUDA generator would be rejected (and a
            # CPU draw would then be copied to the GPU every step).
            u = compute_density_for_timestep_sampling(
                weighting_scheme=s.sigma_sampling, batch_size=batch_size,
                logit_mean=s.logit_mean, logit_std=s.logit_std, mode_scale=s.mode_scale,
                device=draw_device, generator=generator,
            )
        # torch.normal in the helper follows the global default dtype.
        u = u.to(device=device, dtype=torch.float32)
        return shift_sigmas(u, s, image_seq_len).clamp(SIGMA_MIN, 1.0)

    def sample(
        self, latents: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw (noise, sigmas, noisy_latents) for a batch of clean latents.

        noise and noisy_latents have the latents' dtype; sigmas are float32.
        """
        draw_device = generator.device if generator is not None else latents.device
        noise = torch.randn(
            latents.shape, generator=generator, device=draw_device, dtype=torch.float32
        )
        sigmas = self.sample_sigmas(
            latents.shape[0], self.image_seq_len(latents), draw_device, generator
        )
        noise = noise.to(device=latents.device, dtype=latents.dtype)
        sigmas = sigmas.to(latents.device)
        # Interpolate in float32: a bf16 sigma keeps only 8 bits, so the noisy
        # input would not match the float32 sigma the model is told (and that
        # preconditioning uses). Uses the cast noise so that target() sees the
        # exact noise that went into x_t.
        return noise, sigmas, _interpolate(latents, noise, sigmas)

    def target(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
    ) -> torch.Tensor:
        """Float32 regression target: velocity noise - x0, or x0 when preconditioning."""
        # float32 so that noise - x0 is not rounded to the training precision.
        if self.settings.precondition_outputs:
            return latents.float()
        return noise.float() - latents.float()

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        """Per-sample float32 weights w(sigma), or None when weighting is off."""
        if self.settings.loss_weighting == "none":
            return None
        return compute_loss_weighting_for_sd3(self.settings.loss_weighting, sigmas.float()).float()

    def loss(
        self,
        model_pred: torch.Tensor,
        target: torch.Tensor,
        sigmas: torch.Tensor,
        noisy_latents: torch.Tensor | None = None,
        extra: LossWeights | None = None,
    ) -> torch.Tensor:
        """Float32 MSE: mean over non-batch dims, w(sigma) weighted, batch mean.

        With ``precondition_outputs`` the prediction is first turned into an
        x0 estimate, which needs ``noisy_latents``.
        """
        # float32 before the preconditioning arithmetic too (weighted_mse upcasts the rest).
        pred = model_pred.float()
        if self.settings.precondition_outputs:
            if noisy_latents is None:
                raise ValueError("precondition_outputs needs noisy_latents in loss()")
            pred = noisy_latents.float() - _per_sample(sigmas, pred) * pred
        return weighted_mse(pred, target, self.loss_weights(sigmas), extra)

    def fixed_loss(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        latents: torch.Tensor,
        noise: torch.Tensor,
        level: float,
        extra: LossWeights | None = None,
    ) -> torch.Tensor:
        """The loss at one fixed sigma (``level``, clamped into [SIGMA_MIN, 1]; unshifted) with the given noise
        (validation loss): draws nothing, so the same weights give the same value."""
        sigma = min(1.0, max(SIGMA_MIN, float(level)))
        sigmas = torch.full((latents.shape[0],), sigma, device=latents.device, dtype=torch.float32)
        noise = noise.to(device=latents.device, dtype=latents.dtype)
        noisy_latents = _interpolate(latents, noise, sigmas)
        target = self.target(latents, noise, sigmas)
        return self.loss(model_fn(noisy_latents, sigmas), target, sigmas, noisy_latents, extra)

    def __call__(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        extra: LossWeights | None = None,
    ) -> torch.Tensor:
        """One training-step loss; ``model_fn(noisy_latents, sigmas) -> velocity``."""
        noise, sigmas, noisy_latents = self.sample(latents, generator)
        target = self.target(latents, noise, sigmas)
        model_pred = model_fn(noisy_latents, sigmas)
        return self.loss(model_pred, target, sigmas, noisy_latents, extra)


def _interpolate(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise, in float32, in the latents' dtype."""
    s = _per_sample(sigmas, latents)
    return ((1.0 - s) * latents.float() + s * noise.float()).to(latents.dtype)


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Float32 sigmas shaped [B, 1, ...] to broadcast over every non-batch dim."""
    return sigmas.float().reshape(-1, *([1] * (like.ndim - 1)))
