"""Beta schedules and derived tables vs diffusers and closed forms."""

import jax
import numpy as np
import pytest
from diffusers import DDPMScheduler

from lidiff.diffusion.schedule import (
    COMPVIS_SCHEDULE_NAMES,
    SCHEDULE_NAMES,
    DiffusionSchedule,
    make_beta_schedule,
)

CELEBA = dict(linear_start=0.0015, linear_end=0.0195)


def test_scaled_linear_matches_diffusers():
    ours = DiffusionSchedule.create("scaled_linear", 1000, **CELEBA)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=1e-6, atol=0)
    # diffusers takes the cumprod in float32; ours is float64 then cast, so allow a little float32 drift.
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=5e-6, atol=0)


def test_celeba_final_alpha_bar_matches_reference():
    ours = DiffusionSchedule.create("scaled_linear", 1000, **CELEBA)
    assert abs(float(ours.alphas_cumprod[999]) - 1.42e-4) < 0.01e-4
    assert ours.num_timesteps == 1000


def test_linear_and_cosine_match_diffusers():
    lin = make_beta_schedule("linear", 1000, 1e-4, 2e-2)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2)
    np.testing.assert_allclose(lin, ref.betas.numpy().astype(np.float64), rtol=1e-6)
    # diffusers' squaredcos_cap_v2 is the same cosine schedule (s = 0.008, betas capped at 0.999).
    cos = make_beta_schedule("cosine", 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(cos, ref.betas.numpy().astype(np.float64), rtol=1e-5, atol=1e-7)
    assert cos.max() == pytest.approx(0.999)


def test_sqrt_schedule_and_dtype():
    betas = make_beta_schedule("sqrt", 50, 1e-4, 2e-2)
    assert betas.dtype == np.float64 and betas.shape == (50,)
    np.testing.assert_allclose(betas**2, np.linspace(1e-4, 2e-2, 50), rtol=1e-12)
    # The CompVis "linear" name maps to the schedule linear in sqrt(beta).
    sl = make_beta_schedule(COMPVIS_SCHEDULE_NAMES["linear"], 50, 1e-4, 2e-2)
    np.testing.assert_allclose(np.sqrt(sl), np.linspace(1e-2, np.sqrt(2e-2), 50), rtol=1e-12)
    assert COMPVIS_SCHEDULE_NAMES["sqrt_linear"] == "linear"


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="scaled_linear") as info:
        make_beta_schedule("quadratic", 10)
    for name in SCHEDULE_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="CompVis 'sqrt_linear' is 'linear'"):
        make_beta_schedule("sqrt_linear", 10)


def test_tables_are_float64_computations_cast_once():
    betas = np.linspace(np.sqrt(0.0015), np.sqrt(0.0195), 1000) ** 2
    s = DiffusionSchedule.from_betas(betas)
    # Independent float64 derivation, written differently (logs and explicit products).
    ac = np.exp(np.cumsum(np.log1p(-betas)))
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    expected = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac**0.5,
        "sqrt_one_minus_alphas_cumprod": (1 - ac) ** 0.5,
        "sqrt_recip_alphas_cumprod": ac**-0.5,
        "sqrt_recipm1_alphas_cumprod": ((1 - ac) / ac) ** 0.5,
        "posterior_variance": betas * (1 - ac_prev) / (1 - ac),
        "posterior_mean_coef1": betas * ac_prev**0.5 / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * (1 - betas) ** 0.5 / (1 - ac),
    }
    for name, value in expected.items():
        got = np.asarray(getattr(s, name))
        assert got.dtype == np.float32, name
        # Within one float32 rounding of the float64 value: no float32 accumulation anywhere.
        np.testing.assert_allclose(got, value.astype(np.float32), rtol=2e-7, atol=0, err_msg=name)
    # A float32 cumprod drifts measurably more than that, which is why the tables are built in float64.
    ac32 = np.cumprod(1 - betas.astype(np.float32))
    assert np.max(np.abs(ac32 / ac - 1)) > 5 * np.max(np.abs(np.asarray(s.alphas_cumprod) / ac - 1))
    log_var = np.asarray(s.posterior_log_variance_clipped)
    assert log_var[0] == pytest.approx(np.log(1e-20), rel=1e-6)
    np.testing.assert_allclose(log_var[1:], np.log(expected["posterior_variance"][1:]), rtol=1e-6)


def test_posterior_variance_matches_diffusers_fixed_small():
    ours = DiffusionSchedule.create("scaled_linear", 1000, **CELEBA)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015,
                        beta_end=0.0195, variance_type="fixed_small")
    ref.set_timesteps(1000)
    for t in [1, 2, 10, 500, 999]:
        np.testing.assert_allclose(float(ours.posterior_variance[t]), float(ref._get_variance(t)), rtol=1e-4)


def test_snr_and_pytree_structure():
    s = DiffusionSchedule.create("scaled_linear", 100, **CELEBA)
    t = np.array([0, 10, 99])
    ac = np.asarray(s.alphas_cumprod)[t]
    np.testing.assert_allclose(np.asarray(s.snr(t)), ac / (1 - ac), rtol=1e-6)
    assert np.all(np.diff(np.asarray(s.snr(np.arange(100)))) < 0)
    # 11 array leaves; num_timesteps is static, so it stays a Python int under jit.
    assert len(jax.tree.leaves(s)) == 11
    out = jax.jit(lambda sched: sched.alphas_cumprod[sched.num_timesteps - 1])(s)
    assert float(out) == float(s.alphas_cumprod[99])


def test_bad_betas_are_refused():
    with pytest.raises(ValueError, match="open interval"):
        DiffusionSchedule.from_betas(np.array([0.1, 1.0]))
    with pytest.raises(ValueError, match="num_timesteps"):
        make_beta_schedule("linear", 0)
