"""Tests for lora_trainer.objectives.flow against diffusers' own flow-matching code.

Schedules are checked against FlowMatchEulerDiscreteScheduler and FLUX's
calculate_shift, weights against compute_loss_weighting_for_sd3, and
forward process, targets and losses against float64 references recomputed
here. Distribution checks use 20,000 draws with tolerances derived from the
sample size (standard errors and the Kolmogorov-Smirnov critical value), so
they are neither loose nor flaky for the fixed seeds used.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import (
    calculate_shift as flux_calculate_shift,
)
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

import lora_trainer.objectives.flow as flow_module
from lora_trainer.objectives.flow import (
    FLOW_SHIFTS,
    FLOW_SIGMA_SAMPLING,
    FLOW_WEIGHTINGS,
    MODE_SCALE_RANGE,
    SIGMA_MIN,
    FlowMatchingObjective,
    FlowSettings,
    calculate_shift,
    shift_sigmas,
)

N_DRAWS = 20_000
# Standard errors allowed for moment checks: p ~ 6e-7 per check under the null.
Z = 5.0
# Kolmogorov-Smirnov: P(sqrt(n) * D > c) ~ 2 exp(-2 c^2); alpha = 1e-4.
KS_ALPHA = 1e-4


def ks_critical(n, alpha=KS_ALPHA):
    return math.sqrt(-0.5 * math.log(alpha / 2)) / math.sqrt(n)


def ks_statistic(samples, cdf):
    """Two-sided KS distance between the empirical CDF of samples and cdf."""
    x = samples.double().sort().values
    n = x.numel()
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - f).max().item(), (f - (i - 1) / n).max().item())


def gen(seed):
    return torch.Generator().manual_seed(seed)


def latents(shape=(4, 4, 8, 8), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=gen(10_000 + seed)).to(dtype)


def bcast(v, like):
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def make(patch_size=2, **kwargs):
    return FlowMatchingObjective(FlowSettings(**kwargs), patch_size=patch_size)


def draw_u_reference(settings, batch_size, generator):
    """u exactly as the objective should draw it, from diffusers' helper."""
    if settings.sigma_sampling == "sigmoid":
        return torch.sigmoid(settings.sigmoid_scale * torch.randn(batch_size, generator=generator))
    return compute_density_for_timestep_sampling(
        settings.sigma_sampling, batch_size, logit_mean=settings.logit_mean,
        logit_std=settings.logit_std, mode_scale=settings.mode_scale, generator=generator,
    )


def mode_warp(u, scale):
    # SD3 paper's f_mode, in float64.
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


# ---------------------------------------------------------------- forward process


@pytest.mark.parametrize("shape", [(4, 4, 8, 8), (2, 4, 3, 8, 6)])
@pytest.mark.parametrize("sampling", FLOW_SIGMA_SAMPLING)
def test_sample_matches_forward_process(shape, sampling):
    obj = make(sigma_sampling=sampling, shift="resolution")
    x0 = latents(shape)
    noise, sigmas, noisy = obj.sample(x0, gen(1))
    assert noise.shape == noisy.shape == x0.shape and noise.dtype == noisy.dtype == x0.dtype
    assert sigmas.dtype == torch.float32 and sigmas.shape == (shape[0],)
    assert ((sigmas >= SIGMA_MIN) & (sigmas <= 1)).all()
    s = bcast(sigmas.double(), x0)
    expected = (1 - s) * x0.double() + s * noise.double()
    torch.testing.assert_close(noisy.double(), expected, rtol=1e-6, atol=1e-6)
    assert abs(noise.mean().item()) < 0.2 and 0.8 < noise.std().item() < 1.2


def test_velocity_target_and_x0_target():
    x0 = latents((3, 4, 2, 8, 8))
    obj = make(sigma_sampling="logit_normal")
    noise, sigmas, _ = obj.sample(x0, gen(2))
    target = obj.target(x0, noise, sigmas)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target.double(), noise.double() - x0.double(), rtol=1e-6, atol=1e-6)
    pre = make(sigma_sampling="logit_normal", precondition_outputs=True)
    assert torch.equal(pre.target(x0, noise, sigmas), x0)


def test_velocity_is_derivative_of_path():
    # target = d x_t / d sigma: a finite difference in float64 along the path.
    x0, noise = latents(seed=1).double(), latents(seed=2).double()
    obj = make()
    s, h = 0.37, 1e-6

    def path(sig):
        return (1 - sig) * x0 + sig * noise

    fd = (path(s + h) - path(s - h)) / (2 * h)
    torch.testing.assert_close(obj.target(x0, noise, torch.full((4,), s)).double(), fd,
                               rtol=1e-5, atol=1e-5)


def test_draw_order_noise_then_sigmas():
    settings = FlowSettings(sigma_sampling="logit_normal", logit_mean=0.3, shift="resolution")
    obj = FlowMatchingObjective(settings)
    x0 = latents((4, 4, 16, 16))
    noise, sigmas, _ = obj.sample(x0, gen(3))
    g = gen(3)
    ref_noise = torch.randn(x0.shape, generator=g)
    u = draw_u_reference(settings, 4, g)
    ref_sigmas = shift_sigmas(u, settings, obj.image_seq_len(x0)).clamp(SIGMA_MIN, 1.0)
    assert torch.equal(noise, ref_noise)
    assert torch.equal(sigmas, ref_sigmas)


def test_bf16_latents_share_the_float32_random_stream():
    obj = make(sigma_sampling="sigmoid", shift="static")
    x32 = latents()
    x16 = x32.bfloat16()
    n32, s32, _ = obj.sample(x32, gen(4))
    n16, s16, noisy16 = obj.sample(x16, gen(4))
    assert n16.dtype == noisy16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    assert torch.equal(n16, n32.bfloat16()) and torch.equal(s16, s32)
    # Interpolated in float32, rounded once.
    s = bcast(s16, x16)
    assert torch.equal(noisy16, ((1 - s) * x16.float() + s * n16.float()).bfloat16())
    loss = obj(lambda x, t: x, x16, gen(4))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---------------------------------------------------------------- shifts


def test_calculate_shift_matches_flux_pipeline():
    for seq_len in (16, 256, 1024, 1536, 4096, 8192):
        assert calculate_shift(seq_len) == pytest.approx(flux_calculate_shift(seq_len), rel=1e-12)
        params = {"base_seq_len": 64, "max_seq_len": 1024, "base_shift": 0.2, "max_shift": 2.0}
        assert calculate_shift(seq_len, **params) == pytest.approx(
            flux_calculate_shift(seq_len, **params), rel=1e-12)
    # The end points of the line.
    assert calculate_shift(256) == pytest.approx(0.5) and calculate_shift(4096) == pytest.approx(1.15)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 7.0])
def test_static_shift_matches_scheduler(shift):
    base = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).sigmas
    settings = FlowSettings(shift="static", shift_value=shift)
    torch.testing.assert_close(shift_sigmas(base, settings, 0), shifted, rtol=0, atol=1e-6)
    # Same through set_timesteps with explicit (unshifted) sigmas.
    u = np.concatenate([np.linspace(1.0, 1 / 28, 28), [0.3, 1e-3, 0.999]]).astype(np.float32)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=u)
    torch.testing.assert_close(shift_sigmas(torch.from_numpy(u), settings, 0), sched.sigmas[:-1],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "params",
    [{}, {"base_seq_len": 64, "max_seq_len": 1024, "base_shift": 0.2, "max_shift": 2.0}],
)
@pytest.mark.parametrize("latent_hw", [(16, 16), (32, 32), (64, 64), (128, 128), (96, 64)])
def test_resolution_shift_matches_dynamic_scheduler(params, latent_hw):
    obj = make(shift="resolution", **params)
    seq_len = obj.image_seq_len(torch.zeros(1, 16, *latent_hw))
    h, w = latent_hw
    assert seq_len == (h // 2) * (w // 2)
    cfg = obj.settings
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential",
        base_shift=cfg.base_shift, max_shift=cfg.max_shift,
        base_image_seq_len=cfg.base_seq_len, max_image_seq_len=cfg.max_seq_len,
    )
    mu = flux_calculate_shift(seq_len, cfg.base_seq_len, cfg.max_seq_len,
                              cfg.base_shift, cfg.max_shift)
    # FLUX pipeline's default inference sigmas, plus interior / near-end points.
    u = np.concatenate([np.linspace(1.0, 1 / 28, 28), [0.5, 0.01, 1e-3, 0.999]]).astype(np.float32)
    sched.set_timesteps(sigmas=u, mu=mu)
    got = shift_sigmas(torch.from_numpy(u), cfg, seq_len)
    torch.testing.assert_close(got, sched.sigmas[:-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shift", FLOW_SHIFTS)
def test_shifts_fix_end_points_and_are_monotone(shift):
    settings = FlowSettings(shift=shift, shift_value=3.0)
    u = torch.linspace(0, 1, 10_001)
    sigma = shift_sigmas(u, settings, 4096)
    assert sigma[0] == 0 and sigma[-1] == 1  # exactly, no NaN from 1/0
    assert (sigma.diff() >= 0).all()
    if shift != "none":
        # shift 3 (and mu = 1.15 at 4096 tokens) move mass towards noise.
        assert (sigma[1:-1] > u[1:-1]).all()


def test_larger_images_get_noisier_sigmas():
    u = torch.linspace(0.01, 0.99, 99)
    settings = FlowSettings(shift="resolution")
    small, large = shift_sigmas(u, settings, 256), shift_sigmas(u, settings, 4096)
    assert (large > small).all()


# FLUX.1's sampler shifts by mu from the scheduler config (dev: base_shift 0.5 at 256 tokens, max_shift 1.15 at
# 4096, diffusers' defaults); schnell's scheduler is unshifted; SD3's shifts statically by 3.0.
_MU_1024 = flux_calculate_shift(4096)


# Qwen-Image shifts by resolution with its own scheduler's constants (0.5 at 256 tokens to 0.9 at 8192).
_QWEN_MU_1024 = flux_calculate_shift(4096, 256, 8192, 0.5, 0.9)


@pytest.mark.parametrize("family,variant,median", [
    ("flux1", "schnell", 0.5), ("flux1", "dev", math.exp(_MU_1024) / (math.exp(_MU_1024) + 1)),
    ("sd3", "sd3.5-large", 3.0 * 0.5 / (1 + 2.0 * 0.5)),
    ("qwen_image", None, math.exp(_QWEN_MU_1024) / (math.exp(_QWEN_MU_1024) + 1)),
])
def test_family_defaults_train_at_the_samplers_median_sigma_at_1024px(family, variant, median):
    """The objective a run builds from the family's defaults for the loaded variant (sigmoid(N(0, 1)) and
    logit-normal u both have median 0.5; the shifts are monotone, so sigma's median is the shifted 0.5)."""
    from types import SimpleNamespace

    from lora_trainer.families import get_family

    from lora_trainer.families.qwen_image.tiny import QWEN_SCHEDULER

    sched = QWEN_SCHEDULER if family == "qwen_image" else {}  # the others' constants are FlowSettings' defaults
    objective = get_family(family).objective(SimpleNamespace(variant=variant, scheduler_config=sched))
    seq_len = objective.image_seq_len(torch.zeros(1, 16, 1024 // 8, 1024 // 8))
    assert seq_len == 4096
    sigmas = objective.sample_sigmas(N_DRAWS, seq_len, "cpu", gen(41))
    below = (sigmas < median).double().mean().item()
    # The fraction below the true median is binomial(n, 1/2): standard error 0.5 / sqrt(n).
    assert abs(below - 0.5) < Z * 0.5 / math.sqrt(N_DRAWS), \
        f"{family} {variant}: median sigma {sigmas.median().item():.3f}, expected {median:.3f}"


@pytest.mark.parametrize(
    "shape,patch,expected",
    [((2, 16, 64, 96), 2, 32 * 48), ((1, 16, 5, 64, 96), 2, 5 * 32 * 48),  # a video's latent frames count
     ((2, 16, 64, 96), 1, 64 * 96), ((2, 4, 33, 17), 2, 16 * 8)],
)
def test_image_seq_len_counts_patches_of_last_two_dims_and_frames(shape, patch, expected):
    assert make(patch_size=patch).image_seq_len(torch.zeros(shape)) == expected


# ---------------------------------------------------------------- sigma sampling


@pytest.mark.parametrize("sampling", FLOW_SIGMA_SAMPLING)
@pytest.mark.parametrize("shift", FLOW_SHIFTS)
def test_sampling_composes_helper_shift_and_clamp(sampling, shift):
    settings = FlowSettings(sigma_sampling=sampling, logit_mean=-0.4, logit_std=1.3,
                            sigmoid_scale=1.7, mode_scale=0.8, shift=shift)
    obj = FlowMatchingObjective(settings)
    sigmas = obj.sample_sigmas(N_DRAWS, 1024, "cpu", gen(20))
    u = draw_u_reference(settings, N_DRAWS, gen(20))
    assert torch.equal(sigmas, shift_sigmas(u, settings, 1024).clamp(SIGMA_MIN, 1.0))
    assert sigmas.dtype == torch.float32 and sigmas.shape == (N_DRAWS,)
    assert sigmas.min() >= SIGMA_MIN and sigmas.max() <= 1.0


@pytest.mark.parametrize("sampling", FLOW_SIGMA_SAMPLING)
def test_sampling_is_deterministic_per_seed(sampling):
    obj = make(sigma_sampling=sampling, shift="resolution")
    x0 = latents()
    a = obj.sample(x0, gen(7))
    b = obj.sample(x0, gen(7))
    c = obj.sample(x0, gen(8))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a, c, strict=True):
        assert not torch.equal(x, y)
    assert torch.equal(obj(lambda x, t: x, x0, gen(7)), obj(lambda x, t: x, x0, gen(7)))


def test_global_rng_used_without_generator():
    obj = make(sigma_sampling="logit_normal")
    x0 = latents()
    torch.manual_seed(123)
    a = obj.sample(x0)
    torch.manual_seed(123)
    b = obj.sample(x0)
    c = obj.sample(x0)  # RNG advanced
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("use_generator", [True, False])
def test_helper_gets_generator_and_draw_device(monkeypatch, use_generator):
    # diffusers' helper defaults to device="cpu"; it must get the generator's
    # device (or the latents' one), else a CUDA generator is rejected.
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return compute_density_for_timestep_sampling(*args, **kwargs)

    monkeypatch.setattr(flow_module, "compute_density_for_timestep_sampling", spy)
    g = gen(0) if use_generator else None
    make(sigma_sampling="mode").sample(latents(), g)
    (kwargs,) = calls
    assert kwargs["generator"] is g
    assert torch.device(kwargs["device"]) == (g.device if g is not None else latents().device)


def test_uniform_distribution():
    sigmas = make().sample_sigmas(N_DRAWS, 256, "cpu", gen(30)).double()
    se = math.sqrt(1 / 12 / N_DRAWS)
    assert abs(sigmas.mean().item() - 0.5) < Z * se
    # The clamp only moves the mass of [0, SIGMA_MIN) onto SIGMA_MIN, so the
    # CDF at every sample point is still x.
    assert ks_statistic(sigmas, lambda x: x) < ks_critical(N_DRAWS)


@pytest.mark.parametrize("sampling,kwargs,mean,std", [
    ("logit_normal", {"logit_mean": 0.7, "logit_std": 0.8}, 0.7, 0.8),
    ("logit_normal", {"logit_mean": -0.5, "logit_std": 1.2}, -0.5, 1.2),
    ("sigmoid", {"sigmoid_scale": 1.5}, 0.0, 1.5),
])
def test_logit_of_sigma_is_normal(sampling, kwargs, mean, std):
    sigmas = make(sigma_sampling=sampling, **kwargs).sample_sigmas(N_DRAWS, 256, "cpu", gen(31))
    # Parameters chosen so the SIGMA_MIN clamp (logit -6.9) is > 4.6 std away.
    z = torch.logit(sigmas.double())
    assert abs(z.mean().item() - mean) < Z * std / math.sqrt(N_DRAWS)
    assert abs(z.std().item() - std) < Z * std / math.sqrt(2 * (N_DRAWS - 1))
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64),
                                        torch.tensor(std, dtype=torch.float64))
    assert ks_statistic(z, normal.cdf) < ks_critical(N_DRAWS)
    if mean != 0:
        # sigma is the noise level itself: a positive mean means noisier inputs.
        assert (sigmas.double().mean().item() > 0.5) == (mean > 0)


def test_mode_scale_zero_is_uniform():
    sigmas = make(sigma_sampling="mode", mode_scale=0.0).sample_sigmas(N_DRAWS, 256, "cpu", gen(32))
    # diffusers' mode warp with scale 0 is 1 - u of the same uniform draw.
    u = torch.rand(N_DRAWS, generator=gen(32))
    torch.testing.assert_close(sigmas, (1 - u).clamp(SIGMA_MIN, 1.0), rtol=0, atol=1e-6)
    assert ks_statistic(sigmas, lambda x: x) < ks_critical(N_DRAWS)


@pytest.mark.parametrize("scale", [1.29, -0.9])
def test_mode_distribution_matches_sd3_density(scale):
    obj = make(sigma_sampling="mode", mode_scale=scale)
    sigmas = obj.sample_sigmas(N_DRAWS, 256, "cpu", gen(33))
    # f_mode is decreasing from 1 to 0, so P(sigma <= x) = 1 - f^-1(x);
    # invert it on a fine float64 grid.
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    t = mode_warp(grid, scale)
    xp, fp = t.flip(0).numpy(), grid.flip(0).numpy()

    def cdf(x):
        return 1 - torch.from_numpy(np.interp(x.numpy(), xp, fp))

    assert ks_statistic(sigmas, cdf) < ks_critical(N_DRAWS)
    # Positive scale concentrates mass in the middle, negative at the ends.
    var = sigmas.double().var().item()
    assert (var < 1 / 12) == (scale > 0)


def test_all_sigmas_clamped_even_for_exact_zero_draws(monkeypatch):
    # Uniform draws can return exactly 0, and sigmoid can round to exactly 1.
    monkeypatch.setattr(flow_module, "compute_density_for_timestep_sampling",
                        lambda *a, **k: torch.tensor([0.0, 1e-7, 0.5, 1.0]))
    for shift in FLOW_SHIFTS:
        sigmas = make(shift=shift).sample_sigmas(4, 4096, "cpu", gen(0))
        assert torch.isfinite(sigmas).all()
        assert sigmas[0] == SIGMA_MIN and sigmas[-1] == 1.0
        assert sigmas.min() >= SIGMA_MIN and sigmas.max() <= 1.0
        w = make(shift=shift, loss_weighting="sigma_sqrt").loss_weights(sigmas)
        assert torch.isfinite(w).all() and w.max() <= SIGMA_MIN ** -2 * (1 + 1e-6)


# ---------------------------------------------------------------- weights and loss


def test_loss_weights_match_diffusers_and_closed_forms():
    sigmas = torch.cat([torch.tensor([SIGMA_MIN]), torch.linspace(0.01, 1.0, 100)])
    s = sigmas.double()
    assert make(loss_weighting="none").loss_weights(sigmas) is None
    expected = {"sigma_sqrt": s ** -2, "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))}
    for scheme in ("sigma_sqrt", "cosmap"):
        w = make(loss_weighting=scheme).loss_weights(sigmas)
        assert w.dtype == torch.float32 and w.shape == sigmas.shape
        torch.testing.assert_close(w, compute_loss_weighting_for_sd3(scheme, sigmas).float())
        torch.testing.assert_close(w.double(), expected[scheme], rtol=1e-5, atol=0)
    assert set(expected) | {"none"} == set(FLOW_WEIGHTINGS)


@pytest.mark.parametrize("weighting", FLOW_WEIGHTINGS)
def test_loss_is_weighted_per_sample_mean(weighting):
    obj = make(loss_weighting=weighting)
    sigmas = torch.tensor([0.05, 0.3, 0.7, 1.0])
    target = latents((4, 2, 3, 3), seed=3)
    pred = torch.stack([torch.full((2, 3, 3), float(i + 1)) for i in range(4)])
    pred[0, 0, 0, 0] = 10.0  # unequal per-sample errors: reduction order matters
    per_sample = ((pred.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    s = sigmas.double()
    w = {"none": torch.ones_like(s), "sigma_sqrt": s ** -2,
         "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))}[weighting]
    got = obj.loss(pred, target, sigmas)
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got.double(), (per_sample * w).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(4, 4, 8, 8), (2, 4, 3, 8, 6)])
def test_preconditioned_loss_is_x0_mse(shape):
    obj = make(sigma_sampling="logit_normal", precondition_outputs=True)
    x0 = latents(shape)
    noise, sigmas, noisy = obj.sample(x0, gen(40))
    pred = latents(shape, seed=5)
    dims = tuple(range(1, len(shape)))
    s = bcast(sigmas.double(), x0)
    x0_hat = noisy.double() - s * pred.double()
    expected = ((x0_hat - x0.double()) ** 2).mean(dim=dims).mean()
    got = obj.loss(pred, obj.target(x0, noise, sigmas), sigmas, noisy)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    # ... which is the velocity loss weighted by sigma**2 per sample.
    v_err = ((pred.double() - (noise.double() - x0.double())) ** 2).mean(dim=dims)
    torch.testing.assert_close(got.double(), (sigmas.double() ** 2 * v_err).mean(),
                               rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="noisy_latents"):
        obj.loss(pred, x0, sigmas)


@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("weighting", FLOW_WEIGHTINGS)
def test_perfect_predictor_has_zero_loss(precondition, weighting):
    obj = make(sigma_sampling="logit_normal", shift="resolution", loss_weighting=weighting,
               precondition_outputs=precondition)
    x0 = latents((4, 4, 16, 16))
    noise, sigmas, noisy = obj.sample(x0, gen(5))
    seen = []

    def oracle(x, t):
        seen.append((x, t))
        return noise - x0  # the true velocity, whatever the target space

    loss = obj(oracle, x0, gen(5))
    (x, t), = seen
    assert torch.equal(x, noisy) and torch.equal(t, sigmas)
    assert t.dtype == torch.float32 and t.shape == (4,)
    if precondition:
        # x_t - sigma * v == x0 up to float32 rounding of x_t.
        assert loss < 1e-8
    else:
        assert loss == 0
    assert obj(lambda x, t: noise, x0, gen(5)) > 1e-3
    assert obj(lambda x, t: x0 - noise, x0, gen(5)) > 1e-3


def test_timestep_kind():
    assert FlowMatchingObjective.timestep_kind == "sigma"


def test_training_step_never_reads_tensor_values_on_host(monkeypatch):
    # On a GPU each of these would force a device sync in the hot path.
    objs = [make(sigma_sampling=s, shift=sh, loss_weighting="sigma_sqrt", precondition_outputs=True)
            for s in FLOW_SIGMA_SAMPLING for sh in FLOW_SHIFTS]
    x0 = latents()

    def model(x, t):
        return x * bcast(t, x)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of tensor value in training step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    losses = [obj(model, x0, gen(0)) for obj in objs]
    monkeypatch.undo()
    assert all(torch.isfinite(loss) for loss in losses)


def test_sgd_on_tiny_model_reduces_loss():
    torch.manual_seed(0)
    # Sigma-aware 1x1 convs: the velocity given x_t depends on sigma.
    convs = torch.nn.ModuleList([torch.nn.Conv2d(4, 4, kernel_size=1) for _ in range(2)])
    obj = make(sigma_sampling="logit_normal", loss_weighting="cosmap")
    # Structured data (per-channel means, reduced variance) so there is
    # something to learn beyond the mean velocity.
    x0 = torch.tensor([1.0, -1.0, 0.5, -0.5]).view(1, 4, 1, 1) + 0.5 * latents((16, 4, 8, 8))

    def model_fn(x, t):
        return convs[0](x) + bcast(t, x) * convs[1](x)

    def eval_loss():
        with torch.no_grad():
            return torch.stack([obj(model_fn, x0, gen(1000 + i)) for i in range(8)]).mean()

    before = eval_loss()
    opt = torch.optim.SGD(convs.parameters(), lr=0.3)
    g = gen(9)
    for _ in range(60):
        loss = obj(model_fn, x0, g)
        assert loss.requires_grad
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("field,value", [
    ("sigma_sampling", "lognorm"),
    ("shift", "dynamic"),
    ("loss_weighting", "sigma"),
    ("logit_std", -1.0),
    ("logit_std", 0.0),
    ("logit_mean", float("nan")),
    ("sigmoid_scale", 0.0),
    ("mode_scale", 2.0),
    ("mode_scale", -1.5),
    ("shift_value", 0.0),
    ("shift_value", -3.0),
    ("shift_value", "3"),
    ("shift_value", float("inf")),
    ("base_shift", None),
    ("max_shift", True),
    ("base_seq_len", 0),
    ("base_seq_len", 256.5),
    ("max_seq_len", 256),
    ("precondition_outputs", "yes"),
])
def test_invalid_settings_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        FlowSettings(**{field: value})


@pytest.mark.parametrize("field,allowed", [
    ("sigma_sampling", FLOW_SIGMA_SAMPLING), ("shift", FLOW_SHIFTS),
    ("loss_weighting", FLOW_WEIGHTINGS),
])
def test_enum_errors_list_allowed_values(field, allowed):
    with pytest.raises(ValueError) as info:
        FlowSettings(**{field: "bogus"})
    assert all(name in str(info.value) for name in allowed)


def test_valid_settings_edges_and_normalisation():
    lo, hi = MODE_SCALE_RANGE
    FlowSettings(mode_scale=lo)
    FlowSettings(mode_scale=hi)
    FlowSettings(shift_value=1e-3, base_shift=-1.0, max_shift=3.0)
    # JSON ints become floats: equal and hashable however they were written.
    a, b = FlowSettings(shift_value=3, logit_std=1), FlowSettings(shift_value=3.0, logit_std=1.0)
    assert a == b and hash(a) == hash(b) and isinstance(a.shift_value, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.shift = "static"


@pytest.mark.parametrize("patch", [0, -2, 2.0, True])
def test_invalid_patch_size_rejected(patch):
    with pytest.raises(ValueError, match="patch_size"):
        FlowMatchingObjective(FlowSettings(), patch_size=patch)
