"""Forward process q(x_t | x_0), the eps / x0 / v conversions and the posterior q(x_{t-1} | x_t, x_0).

Conventions: x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·eps, and v = sqrt(ᾱ_t)·eps - sqrt(1 - ᾱ_t)·x0 (Salimans & Ho).
Arrays x0, x_t, eps, v are [B, H, W, C] (any rank >= 1 with batch first) float32; t is [B] int32 in
[0, T-1] (a scalar t applies to the whole batch). Per-timestep coefficients are gathered from the float32
schedule tables and broadcast over the trailing axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lidiff.diffusion.schedule import DiffusionSchedule

PARAMETERIZATIONS = ("eps", "x0", "v")


def check_parameterization(parameterization: str) -> None:
    """Raises ValueError unless ``parameterization`` is one of ``PARAMETERIZATIONS``."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}")


def extract(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] shaped to broadcast against a rank-``ndim`` array: [B] t -> [B, 1, ..., 1]; scalar t -> scalar."""
    t = jnp.asarray(t)
    values = table[t]
    if t.ndim == 0:
        return values
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def q_sample(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Sample x_t ~ q(x_t | x_0) with the given standard-normal ``noise`` (same shape as x0)."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def predict_x0_from_eps(schedule: DiffusionSchedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x0 = x_t / sqrt(ᾱ_t) - sqrt(1/ᾱ_t - 1)·eps."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )


def predict_eps_from_x0(schedule: DiffusionSchedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """eps = (x_t / sqrt(ᾱ_t) - x0) / sqrt(1/ᾱ_t - 1)."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
    )


def v_from_x0_eps(schedule: DiffusionSchedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """v = sqrt(ᾱ_t)·eps - sqrt(1 - ᾱ_t)·x0."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
    )


def x0_eps_from_v(
    schedule: DiffusionSchedule, x_t: jax.Array, t: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from a v prediction: x0 = sqrt(ᾱ)·x_t - sqrt(1-ᾱ)·v, eps = sqrt(ᾱ)·v + sqrt(1-ᾱ)·x_t."""
    a = extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    return a * x_t - s * v, a * v + s * x_t


def model_output_to_x0_eps(
    schedule: DiffusionSchedule, x_t: jax.Array, t: jax.Array, output: jax.Array, parameterization: str
) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) predicted by a network whose ``output`` is in ``parameterization`` ("eps", "x0" or "v").

    The output is cast to x_t's dtype first (a bfloat16 network output becomes float32 here).
    """
    check_parameterization(parameterization)
    output = output.astype(x_t.dtype)
    if parameterization == "eps":
        return predict_x0_from_eps(schedule, x_t, t, output), output
    if parameterization == "x0":
        return output, predict_eps_from_x0(schedule, x_t, t, output)
    return x0_eps_from_v(schedule, x_t, t, output)


def training_target(
    parameterization: str, x0: jax.Array, noise: jax.Array, schedule: DiffusionSchedule, t: jax.Array
) -> jax.Array:
    """What a network in ``parameterization`` should output for x_t = q_sample(x0, t, noise)."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    return v_from_x0_eps(schedule, x0, t, noise)


def q_posterior_mean_variance(
    schedule: DiffusionSchedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0).

    Returns (mean [B, H, W, C], variance [B, 1, 1, 1], log_variance_clipped [B, 1, 1, 1]) (scalars for a
    scalar t). The variance is β_t·(1 - ᾱ_{t-1}) / (1 - ᾱ_t): 0 at t = 0, where the log is clipped to log(1e-20).
    """
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t
    )
    variance = extract(schedule.posterior_variance, t, x_t.ndim)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
    return mean, variance, log_variance
