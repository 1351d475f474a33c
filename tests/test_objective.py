"""Tests for lora_trainer.objectives.ddpm against a real diffusers DDPMScheduler.

Reference quantities (alphas_cumprod, SNR, targets) are recomputed here from
the SD beta schedule in float64, independently of the scheduler and module.
"""

import pytest
import torch
from diffusers import DDPMScheduler

import lora_trainer.objectives.ddpm as objective_module
from lora_trainer.objectives.ddpm import DiffusionObjective, ObjectiveSettings

T = 1000
BETA_START, BETA_END = 0.00085, 0.012


def make_scheduler():
    return DDPMScheduler(
        num_train_timesteps=T, beta_schedule="scaled_linear",
        beta_start=BETA_START, beta_end=BETA_END,
    )


def make_objective(prediction_type="epsilon", **kwargs):
    return DiffusionObjective(make_scheduler(), ObjectiveSettings(prediction_type, **kwargs))


def reference_acp():
    # "scaled_linear" = linear in sqrt(beta), as used by SD 1.x / 2.x / SDXL.
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def bcast(v, like):
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def latents(shape=(4, 4, 8, 8), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=gen(10_000 + seed)).to(dtype)


def fixed_linear_model(x, t):
    # Fixed channel-mixing map plus a timestep-dependent scale: deterministic
    # and non-trivial, so the loss depends on every sampled quantity.
    w = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 16.0 - 0.4
    scale = bcast(1.0 + t.float() / T, x).to(x.dtype)
    return torch.einsum("oc,bchw->bohw", w.to(x.dtype), x) * scale


def test_sample_matches_forward_process():
    x0 = latents()
    noise, t, noisy = make_objective().sample(x0, gen(1))
    assert noise.shape == x0.shape and noise.dtype == x0.dtype
    assert t.dtype == torch.long and t.device == x0.device and t.shape == (x0.shape[0],)
    assert ((t >= 0) & (t < T)).all()
    acp = bcast(reference_acp()[t], x0)
    expected = acp.sqrt() * x0.double() + (1 - acp).sqrt() * noise.double()
    torch.testing.assert_close(noisy.double(), expected, rtol=1e-5, atol=1e-5)
    # Noise is standard normal, not e.g. the latents or zeros.
    assert abs(noise.mean().item()) < 0.2 and 0.8 < noise.std().item() < 1.2


def test_epsilon_target_is_noise():
    obj = make_objective("epsilon")
    x0 = latents()
    noise, t, _ = obj.sample(x0, gen(2))
    assert torch.equal(obj.target(x0, noise, t), noise)


def test_v_target_matches_formula():
    obj = make_objective("v_prediction")
    x0 = latents()
    noise, t, _ = obj.sample(x0, gen(3))
    acp = bcast(reference_acp()[t], x0)
    expected = acp.sqrt() * noise.double() - (1 - acp).sqrt() * x0.double()
    torch.testing.assert_close(obj.target(x0, noise, t).double(), expected, rtol=1e-5, atol=1e-5)


def reference_snr():
    acp = reference_acp()
    return acp / (1 - acp)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_epsilon(gamma):
    t = torch.arange(T)
    w = make_objective("epsilon", min_snr_gamma=gamma).loss_weights(t)
    snr = reference_snr()
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
    assert w.dtype == torch.float32 and w.shape == (T,)
    torch.testing.assert_close(w.double(), expected, rtol=1e-4, atol=1e-6)
    assert (w <= 1.0).all()
    assert (w[snr <= gamma] == 1.0).all()
    assert (w[snr > gamma] < 1.0).all() and (snr > gamma).any() and (snr <= gamma).any()


def test_min_snr_weights_v_prediction():
    gamma = 5.0
    t = torch.arange(T)
    w = make_objective("v_prediction", min_snr_gamma=gamma).loss_weights(t)
    snr = reference_snr()
    expected = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    torch.testing.assert_close(w.double(), expected, rtol=1e-4, atol=1e-6)
    assert (w < 1.0).all()


def test_min_snr_weights_handle_zero_terminal_snr():
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear",
                          beta_start=BETA_START, beta_end=BETA_END, rescale_betas_zero_snr=True)
    t = torch.tensor([0, 500, T - 1])
    w_eps = DiffusionObjective(sched, ObjectiveSettings("epsilon", min_snr_gamma=5.0)).loss_weights(t)
    assert torch.isfinite(w_eps).all() and w_eps[-1] == 1.0
    w_v = DiffusionObjective(sched, ObjectiveSettings("v_prediction", min_snr_gamma=5.0)).loss_weights(t)
    assert torch.isfinite(w_v).all() and w_v[-1] == 0.0


def test_snr_table_is_not_recomputed_per_step(monkeypatch):
    obj = make_objective("epsilon", min_snr_gamma=5.0)
    first = obj.loss_weights(torch.arange(T))

    def fail(*args, **kwargs):
        raise AssertionError("compute_snr called in the training step")

    monkeypatch.setattr(objective_module, "compute_snr", fail)
    torch.testing.assert_close(obj.loss_weights(torch.arange(T)), first)
    obj(fixed_linear_model, latents(), gen(0))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_weighted_per_sample_mean(prediction_type):
    obj = make_objective(prediction_type, min_snr_gamma=5.0)
    t = torch.tensor([0, 100, 600, 999])
    target = torch.zeros(4, 2, 3, 3)
    # Different per-sample errors so the order of weighting and reduction matters.
    pred = torch.stack([torch.full((2, 3, 3), float(i + 1)) for i in range(4)])
    pred[0, 0, 0, 0] = 10.0
    per_sample = ((pred.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    snr = reference_snr()[t]
    denom = snr if prediction_type == "epsilon" else snr + 1
    weights = torch.minimum(snr, torch.full_like(snr, 5.0)) / denom
    expected = (per_sample * weights).mean()
    torch.testing.assert_close(obj.loss(pred, target, t).double(), expected, rtol=1e-5, atol=0)


def test_loss_without_min_snr_is_plain_mse():
    obj = make_objective("epsilon")
    assert obj.loss_weights(torch.arange(T)) is None
    pred, target = latents(seed=1), latents(seed=2)
    expected = ((pred.double() - target.double()) ** 2).mean()
    torch.testing.assert_close(obj.loss(pred, target, torch.arange(4)).double(), expected)


def test_noise_offset_is_per_channel_constant():
    x0 = latents()
    base, _, _ = make_objective("epsilon").sample(x0, gen(4))
    shifted, _, _ = make_objective("epsilon", noise_offset=0.1).sample(x0, gen(4))
    diff = (shifted - base).double()
    spatial_var = diff.flatten(2).var(dim=2)  # per (sample, channel)
    assert spatial_var.max() < 1e-12
    per_channel = diff[:, :, 0, 0]
    assert (per_channel.abs() > 0).all()
    # Independent per (sample, channel): varies along both axes.
    assert (per_channel.std(dim=0) > 1e-3).all() and (per_channel.std(dim=1) > 1e-3).all()
    assert per_channel.abs().max() < 0.6     # ~0.1 * N(0,1)


def test_same_seed_same_loss_different_seed_different_loss():
    obj = make_objective("v_prediction", noise_offset=0.05, min_snr_gamma=5.0)
    x0 = latents()
    a = obj(fixed_linear_model, x0, gen(7))
    b = obj(fixed_linear_model, x0, gen(7))
    c = obj(fixed_linear_model, x0, gen(8))
    assert torch.equal(a, b)
    assert not torch.isclose(a, c)


def test_global_rng_used_without_generator():
    obj = make_objective("epsilon", noise_offset=0.05)
    x0 = latents()
    torch.manual_seed(123)
    a = obj(fixed_linear_model, x0)
    torch.manual_seed(123)
    b = obj(fixed_linear_model, x0)
    c = obj(fixed_linear_model, x0)  # RNG advanced
    assert torch.equal(a, b) and not torch.isclose(a, c)


def oracle(prediction_type, x0):
    # Ground truth derived from (x0, noisy, t) only, via the reference schedule.
    def model_fn(noisy, t):
        acp = bcast(reference_acp()[t], noisy)
        xt = noisy.double()
        if prediction_type == "epsilon":
            out = (xt - acp.sqrt() * x0.double()) / (1 - acp).sqrt()
        else:
            out = (acp.sqrt() * xt - x0.double()) / (1 - acp).sqrt()
        return out.float()
    return model_fn


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_perfect_predictor_has_zero_loss(prediction_type):
    obj = make_objective(prediction_type, noise_offset=0.1, min_snr_gamma=5.0)
    x0 = latents()
    assert obj(oracle(prediction_type, x0), x0, gen(5)) < 1e-8
    wrong = "v_prediction" if prediction_type == "epsilon" else "epsilon"
    assert obj(oracle(wrong, x0), x0, gen(5)) > 1e-3


def test_bf16_inputs_give_float32_loss():
    obj = make_objective("v_prediction", min_snr_gamma=5.0, noise_offset=0.05)
    x0 = latents(dtype=torch.bfloat16)
    noise, t, noisy = obj.sample(x0, gen(6))
    assert noise.dtype == noisy.dtype == torch.bfloat16
    loss = obj(fixed_linear_model, x0, gen(6))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # The reduction itself must run in float32: a bf16 mean would be rounded
    # to 8 significant bits and miss this float64 reference.
    pred = (1.0 + torch.arange(4096, dtype=torch.float32) / 4096.0).reshape(4, 4, 16, 16)
    pred, target = pred.bfloat16(), torch.zeros_like(pred, dtype=torch.bfloat16)
    got = make_objective("epsilon").loss(pred, target, torch.zeros(4, dtype=torch.long))
    expected = (pred.double() ** 2).mean()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sgd_on_tiny_model_reduces_loss(prediction_type):
    torch.manual_seed(0)
    # Timestep-aware 1x1 convs: for unit-variance x0 the v target is
    # uncorrelated with x_t, so a t-blind linear map could not learn it.
    convs = torch.nn.ModuleList([torch.nn.Conv2d(4, 4, kernel_size=1) for _ in range(2)])
    obj = make_objective(prediction_type, min_snr_gamma=5.0)
    # Structured data (per-channel means, reduced variance) so there is
    # something to learn beyond the conditional mean of pure noise.
    x0 = torch.tensor([1.0, -1.0, 0.5, -0.5]).view(1, 4, 1, 1) + 0.5 * latents((16, 4, 8, 8))

    def model_fn(x, t):
        return convs[0](x) + bcast(t.float() / T, x) * convs[1](x)

    def eval_loss():
        with torch.no_grad():
            return torch.stack([obj(model_fn, x0, gen(1000 + i)) for i in range(8)]).mean()

    before = eval_loss()
    opt = torch.optim.SGD(convs.parameters(), lr=0.5)
    g = gen(9)
    for _ in range(60):
        loss = obj(model_fn, x0, g)
        assert loss.requires_grad
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_timestep_range_restricts_sampled_timesteps():
    x0 = torch.zeros(20_000, 1, 1, 1)
    _, t, _ = make_objective("epsilon", timestep_range=[200, 300]).sample(x0, gen(11))
    assert set(t.tolist()) == set(range(200, 300))
    _, t, _ = make_objective("epsilon").sample(torch.zeros(100_000, 1, 1, 1), gen(12))
    assert t.min() == 0 and t.max() == T - 1


@pytest.mark.parametrize("bad", [(-1, 10), (10, 10), (500, 1001)])
def test_invalid_timestep_range_rejected(bad):
    with pytest.raises(ValueError):
        make_objective("epsilon", timestep_range=bad)


def test_invalid_settings_rejected():
    with pytest.raises(ValueError):
        ObjectiveSettings("sample")
    with pytest.raises(ValueError):
        ObjectiveSettings("epsilon", noise_offset=-0.1)
    with pytest.raises(ValueError):
        ObjectiveSettings("epsilon", min_snr_gamma=0.0)


def test_training_step_never_reads_tensor_values_on_host(monkeypatch):
    # On a GPU each of these would force a device sync in the hot path.
    obj = make_objective("v_prediction", noise_offset=0.05, min_snr_gamma=5.0)
    x0 = latents()
    obj(fixed_linear_model, x0, gen(0))  # warm caches outside the guard

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of tensor value in training step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss = obj(fixed_linear_model, x0, gen(0))
    monkeypatch.undo()
    assert torch.isfinite(loss)
