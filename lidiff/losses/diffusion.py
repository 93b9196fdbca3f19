"""The LDM denoising loss: a network predicts eps (or x0, or v) from x_t = q_sample(x0, t, noise).

With the defaults (eps, l2, no weighting) this is the LDM training objective: mean over C, H, W of
(eps - eps_theta)^2, then mean over the batch, with t uniform in [0, T-1].
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lidiff.diffusion.process import check_parameterization, q_sample, training_target
from lidiff.diffusion.schedule import DiffusionSchedule

LOSS_TYPES = ("l2", "l1")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def sample_timesteps_and_noise(
    rng: jax.Array, x0: jax.Array, num_timesteps: int
) -> tuple[jax.Array, jax.Array]:
    """The random draws of ``diffusion_loss`` for key ``rng``: (t [B] int32 uniform in [0, T-1], noise like x0).

    ``rng`` is split into (t key, noise key); the noise is standard normal float32 of x0's shape.
    """
    t_rng, noise_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_rng, x0.shape, dtype=jnp.float32)
    return t, noise


def min_snr_weight(
    schedule: DiffusionSchedule, t: jax.Array, gamma: float, parameterization: str = "eps"
) -> jax.Array:
    """Min-SNR-γ loss weight (Hang et al. 2023) per example. t: [B] int32 -> [B] float32.

    With SNR = ᾱ/(1-ᾱ): eps -> min(SNR, γ)/SNR, x0 -> min(SNR, γ), v -> min(SNR, γ)/(SNR + 1).
    Each makes the loss equal to min(SNR, γ)·||x0 - x0_theta||^2 in the x0 space.
    """
    check_parameterization(parameterization)
    snr = schedule.snr(t)
    clipped = jnp.minimum(snr, gamma)
    if parameterization == "eps":
        return clipped / snr
    if parameterization == "x0":
        return clipped
    return clipped / (snr + 1.0)


def diffusion_loss(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    x0: jax.Array,
    rng: jax.Array,
    *,
    parameterization: str = "eps",
    loss_type: str = "l2",
    min_snr_gamma: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Denoising loss of ``model_fn`` on clean latents x0.

    Args:
      model_fn: (x_t [B, H, W, C] float32, t [B] int32) -> output [B, H, W, C] in ``parameterization``;
        conditioning is closed over by the caller.
      schedule: the diffusion schedule.
      x0: [B, H, W, C] float32 clean latents (already multiplied by the scale factor).
      rng: key; t and noise are ``sample_timesteps_and_noise(rng, x0, schedule.num_timesteps)``.
      parameterization: "eps", "x0" or "v": what the network predicts.
      loss_type: "l2" (squared error) or "l1" (absolute error).
      min_snr_gamma: if set, weight each example by ``min_snr_weight(schedule, t, gamma, parameterization)``.

    Returns:
      (loss, metrics): loss is a float32 scalar: the batch mean of the (weighted) per-example mean error.
      metrics: ``loss`` (the same scalar), ``loss_unweighted``, and for each quarter k = 0..3 of
      [0, T-1] (k = 0 is the least noisy) ``loss_q{k}``: mean unweighted per-example loss over the
      examples whose t fell in that quarter (0 where none did), with ``count_q{k}`` their number, so
      quarter means can be pooled across steps.
    """
    check_parameterization(parameterization)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    num_timesteps = schedule.num_timesteps
    t, noise = sample_timesteps_and_noise(rng, x0, num_timesteps)
    x0 = x0.astype(jnp.float32)
    x_t = q_sample(schedule, x0, t, noise)
    output = model_fn(x_t, t).astype(jnp.float32)
    target = training_target(parameterization, x0, noise, schedule, t)
    diff = target - output
    err = jnp.square(diff) if loss_type == "l2" else jnp.abs(diff)
    per_example = jnp.mean(err, axis=tuple(range(1, err.ndim)))  # [B]
    if min_snr_gamma is not None:
        weights = min_snr_weight(schedule, t, min_snr_gamma, parameterization)
    else:
        weights = jnp.ones_like(per_example)
    loss = jnp.mean(weights * per_example)

    metrics = {"loss": loss, "loss_unweighted": jnp.mean(per_example)}
    quarter = jnp.minimum((t * 4) // num_timesteps, 3)
    for k in range(4):
        in_k = (quarter == k).astype(jnp.float32)
        count = jnp.sum(in_k)
        metrics[f"loss_q{k}"] = jnp.sum(in_k * per_example) / jnp.maximum(count, 1.0)
        metrics[f"count_q{k}"] = count
    return loss, metrics
