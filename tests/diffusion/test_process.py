"""Forward process, parameterization conversions and the posterior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidiff.diffusion.process import (
    model_output_to_x0_eps,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_posterior_mean_variance,
    q_sample,
    training_target,
    v_from_x0_eps,
    x0_eps_from_v,
)
from lidiff.diffusion.schedule import DiffusionSchedule

SCHED = DiffusionSchedule.create("scaled_linear", 1000, linear_start=0.0015, linear_end=0.0195)


def _data(seed=0, batch=256, shape=(2, 2, 3)):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x0 = jax.random.uniform(k1, (batch,) + shape, minval=-1.0, maxval=1.0)
    noise = jax.random.normal(k2, (batch,) + shape)
    t = jax.random.randint(k3, (batch,), 0, 1000).at[0].set(0).at[1].set(999)
    return x0, noise, t


def _assert_recovers(x0_hat, eps_hat, x0, noise, t):
    """Round trip within 1e-5 where the conversion is well conditioned.

    Recovering x0 from eps divides by sqrt(ᾱ_t) (84 at t = 999), and eps from x0 divides by sqrt(1 - ᾱ_t)
    (26 at t = 0), which magnifies float32 rounding of x_t; the bound scales accordingly.
    """
    ac = np.asarray(SCHED.alphas_cumprod, np.float64)[np.asarray(t)]
    err_x0 = np.abs(np.asarray(x0_hat) - np.asarray(x0)).reshape(len(ac), -1).max(1)
    err_eps = np.abs(np.asarray(eps_hat) - np.asarray(noise)).reshape(len(ac), -1).max(1)
    assert np.all(err_x0 <= np.minimum(2e-6 / np.sqrt(ac), 1e-4)), err_x0.max()
    assert np.all(err_eps <= np.minimum(2e-6 / np.sqrt(1 - ac), 1e-4)), err_eps.max()
    well_conditioned = (ac > 0.05) & (ac < 0.95)
    assert well_conditioned.sum() > 100
    assert err_x0[well_conditioned].max() < 1e-5 and err_eps[well_conditioned].max() < 1e-5


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_model_output_round_trip(parameterization):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.uniform(k1, (1000, 2, 2, 3), minval=-1.0, maxval=1.0)
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.arange(1000, dtype=jnp.int32)  # every timestep once
    x_t = q_sample(SCHED, x0, t, noise)
    target = training_target(parameterization, x0, noise, SCHED, t)
    x0_hat, eps_hat = model_output_to_x0_eps(SCHED, x_t, t, target, parameterization)
    _assert_recovers(x0_hat, eps_hat, x0, noise, t)
    # And the other way: the target re-derived from the recovered (x0, eps) is the target.
    again = training_target(parameterization, x0_hat, eps_hat, SCHED, t)
    if parameterization == "v":
        np.testing.assert_allclose(np.asarray(again), np.asarray(target), atol=1e-5)


def test_pairwise_conversions_are_inverses():
    x0, noise, t = _data(1)
    x_t = q_sample(SCHED, x0, t, noise)
    _assert_recovers(predict_x0_from_eps(SCHED, x_t, t, noise), predict_eps_from_x0(SCHED, x_t, t, x0), x0, noise, t)
    v = v_from_x0_eps(SCHED, x0, t, noise)
    x0_v, eps_v = x0_eps_from_v(SCHED, x_t, t, v)
    np.testing.assert_allclose(np.asarray(x0_v), np.asarray(x0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(eps_v), np.asarray(noise), atol=1e-6)
    # v's definition: sqrt(ᾱ)·eps - sqrt(1-ᾱ)·x0, per example.
    ac = np.asarray(SCHED.alphas_cumprod)[np.asarray(t)][:, None, None, None]
    np.testing.assert_allclose(
        np.asarray(v), np.sqrt(ac) * np.asarray(noise) - np.sqrt(1 - ac) * np.asarray(x0), atol=1e-6
    )


def test_training_targets():
    x0, noise, t = _data(2)
    assert training_target("eps", x0, noise, SCHED, t) is noise
    assert training_target("x0", x0, noise, SCHED, t) is x0
    with pytest.raises(ValueError, match="unknown parameterization 'mu'"):
        training_target("mu", x0, noise, SCHED, t)
    with pytest.raises(ValueError, match="choose one of"):
        model_output_to_x0_eps(SCHED, x0, t, noise, "score")


def test_q_sample_gathers_per_example_and_scalar_t():
    x0, noise, t = _data(3)
    batch = q_sample(SCHED, x0, t, noise)
    for i in range(8):
        single = q_sample(SCHED, x0[i], t[i], noise[i])  # scalar t applies to the whole array
        np.testing.assert_allclose(np.asarray(batch[i]), np.asarray(single), atol=1e-7)


@pytest.mark.parametrize("t", [0, 300, 999])
def test_q_sample_statistics(t):
    n = 20000
    x0 = jnp.full((n, 2, 2, 1), 0.7)
    noise = jax.random.normal(jax.random.PRNGKey(t), x0.shape)
    x_t = np.asarray(q_sample(SCHED, x0, jnp.full((n,), t, jnp.int32), noise))
    ac = float(np.asarray(SCHED.alphas_cumprod, np.float64)[t])
    tol = 4.0 * np.sqrt(1 - ac) / np.sqrt(x_t.size)  # 4 standard errors of the mean
    assert abs(x_t.mean() - np.sqrt(ac) * 0.7) < tol
    assert x_t.std() == pytest.approx(np.sqrt(1 - ac), rel=0.02)


def test_posterior_matches_gaussian_product():
    x0, noise, t = _data(4)
    t = jnp.maximum(t, 1)
    x_t = q_sample(SCHED, x0, t, noise)
    mean, var, log_var = q_posterior_mean_variance(SCHED, x0, x_t, t)
    # q(x_{t-1}|x0) = N(sqrt(ᾱ_{t-1}) x0, 1-ᾱ_{t-1}), q(x_t|x_{t-1}) = N(sqrt(α_t) x_{t-1}, β_t):
    # posterior precision and mean from the product of the two Gaussians, in float64.
    betas = np.asarray(SCHED.betas, np.float64)
    ac = np.cumprod(1 - betas)
    ti = np.asarray(t)
    b, a_prev = betas[ti][:, None, None, None], ac[ti - 1][:, None, None, None]
    precision = 1 / (1 - a_prev) + (1 - b) / b
    ref_var = 1 / precision
    ref_mean = ref_var * (np.sqrt(a_prev) * np.asarray(x0) / (1 - a_prev) + np.sqrt(1 - b) * np.asarray(x_t) / b)
    np.testing.assert_allclose(np.asarray(var), ref_var, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(log_var), np.log(ref_var), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mean), ref_mean, atol=1e-5)
    # At t = 0 the posterior is a point mass at x0.
    z = jnp.zeros((2,), jnp.int32)
    m0, v0, _ = q_posterior_mean_variance(SCHED, x0[:2], q_sample(SCHED, x0[:2], z, noise[:2]), z)
    np.testing.assert_allclose(np.asarray(m0), np.asarray(x0[:2]), atol=1e-6)
    assert float(jnp.max(v0)) == 0.0


def test_conversions_jit():
    x0, noise, t = _data(5)
    f = jax.jit(lambda s, x, tt, o: model_output_to_x0_eps(s, x, tt, o, "v"))
    x_t = q_sample(SCHED, x0, t, noise)
    x0_hat, _ = f(SCHED, x_t, t, v_from_x0_eps(SCHED, x0, t, noise))
    np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=1e-5)
