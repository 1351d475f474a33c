"""Flow sigmas drawn only within a range, keeping the configured distribution's shape there.

One expert of a two-expert model (Wan 2.2 A14B: the high-noise transformer sees sigma >= 0.875, the low-noise one
the rest) must train only on its own sigmas, or it learns noise levels it never denoises. Clamping would pile the
outside mass onto the boundary and a linear squeeze would distort the shape; rejection sampling (musubi-tuner's
``--preserve_distribution_shape``) keeps the shape but loops a data-dependent number of times, which a resumed run
could only repeat by reading values back every step. Instead every sampling kind is written as a monotone map of a
uniform ``v`` (its quantile function: ``sigmoid``: sigmoid(scale * Phi^-1(v)), ``logit_normal`` likewise with
mean / std, ``mode``: SD3's warp of 1 - v, ``uniform``: v), followed by the shift. The range's ends in ``v`` are
found once by bisection on that map (host floats, per sequence length for the resolution shifts), and ``v`` is drawn
uniformly between them from the run's generator: exactly the configured distribution conditioned on the range, one
draw per sample, the same stream on resume.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

Shift = Callable[[torch.Tensor], torch.Tensor]  # u -> sigma (flow.shift_sigmas at the settings and sequence length)

_BISECT_STEPS = 60  # float64 bisection: the interval is below 1e-18 after 60 halvings


def quantile(v: torch.Tensor, settings) -> torch.Tensor:
    """u in [0, 1] (before the shift) as an increasing function of a uniform ``v``: the inverse CDF of the
    ``sigma_sampling`` density."""
    kind = settings.sigma_sampling
    if kind == "uniform":
        return v
    if kind == "mode":  # diffusers compute_density_for_timestep_sampling's map, of 1 - v so that it increases
        w = 1.0 - v
        return 1.0 - w - settings.mode_scale * (torch.cos(math.pi * w / 2) ** 2 - 1.0 + w)
    z = math.sqrt(2.0) * torch.special.erfinv(2.0 * v - 1.0)  # standard normal quantile
    if kind == "logit_normal":
        return torch.sigmoid(settings.logit_mean + settings.logit_std * z)
    if kind == "sigmoid":
        return torch.sigmoid(settings.sigmoid_scale * z)
    raise ValueError(f"unknown sigma_sampling {kind!r}")


def v_bounds(settings, sigma_range: tuple[float, float], shift: Shift) -> tuple[float, float]:
    """[v_low, v_high]: the uniform variates whose sigma lies in ``sigma_range`` (closed)."""
    low, high = sigma_range

    def sigma(v: float) -> float:
        return float(shift(quantile(torch.tensor([v], dtype=torch.float64), settings))[0])

    a, b = 0.0, 1.0  # smallest v with sigma(v) >= low
    for _ in range(_BISECT_STEPS):
        mid = (a + b) / 2
        a, b = (a, mid) if sigma(mid) >= low else (mid, b)
    v_low = b
    a, b = 0.0, 1.0  # largest v with sigma(v) <= high
    for _ in range(_BISECT_STEPS):
        mid = (a + b) / 2
        a, b = (mid, b) if sigma(mid) <= high else (a, mid)
    return v_low, max(a, v_low)


_CACHE: dict[tuple, tuple[float, float]] = {}


def restricted_sigmas(settings, sigma_range: tuple[float, float], batch_size: int, image_seq_len: int, device,
                      generator: torch.Generator | None, draw_device, shift: Shift) -> torch.Tensor:
    """Float32 [batch_size] sigmas in ``sigma_range`` (closed), distributed as ``settings`` draws them there;
    ``shift``: u -> sigma at this ``image_seq_len``."""
    key = (settings, tuple(sigma_range), image_seq_len if settings.shift in ("resolution", "area") else 0)
    if key not in _CACHE:
        _CACHE[key] = v_bounds(settings, sigma_range, shift)
    v_low, v_high = _CACHE[key]
    r = torch.rand((batch_size,), generator=generator, device=draw_device, dtype=torch.float32)
    v = (v_low + (v_high - v_low) * r.to(torch.float64)).to(device)
    sigma = shift(quantile(v, settings))
    # Bisection ends are within 1e-18 of the range; rounding to float32 must not step outside it.
    return sigma.clamp(*sigma_range).to(torch.float32).clamp(*_inside_f32(sigma_range))


def _inside_f32(sigma_range: tuple[float, float]) -> tuple[float, float]:
    """The range's ends as float32 values inside it (a float64 end may round outward)."""
    low, high = (torch.tensor(x, dtype=torch.float32) for x in sigma_range)
    if float(low) < sigma_range[0]:
        low = torch.nextafter(low, torch.tensor(1.0))
    if float(high) > sigma_range[1]:
        high = torch.nextafter(high, torch.tensor(0.0))
    return float(low), float(high)


def restricted_levels(sigma_range: tuple[float, float], levels: tuple[float, ...]) -> tuple[float, ...]:
    """The validation loss's fixed sigmas for an objective trained on ``sigma_range`` only: those of ``levels``
    inside it, else four spread evenly across it (the loss elsewhere is another model's)."""
    low, high = sigma_range
    inside = tuple(x for x in levels if low <= x <= high)
    if inside:
        return inside
    return tuple(round(low + (high - low) * f, 4) for f in (1.0, 0.75, 0.5, 0.25))
