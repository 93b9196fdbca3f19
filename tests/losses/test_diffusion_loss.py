"""The diffusion training loss: oracle, l1/l2, min-SNR weighting, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidiff.diffusion.process import q_sample, training_target
from lidiff.diffusion.schedule import DiffusionSchedule
from lidiff.losses.diffusion import diffusion_loss, min_snr_weight, sample_timesteps_and_noise

SCHED = DiffusionSchedule.create("scaled_linear", 1000, linear_start=0.0015, linear_end=0.0195)
X0 = jax.random.uniform(jax.random.PRNGKey(0), (16, 4, 4, 3), minval=-1.0, maxval=1.0)
RNG = jax.random.PRNGKey(42)


def _oracle(parameterization, rng, offset=None):
    """A model that returns the true target (plus ``offset``), built from the loss's own draws for ``rng``."""
    t_true, noise = sample_timesteps_and_noise(rng, X0, SCHED.num_timesteps)
    target = training_target(parameterization, X0, noise, SCHED, t_true)
    x_t_true = q_sample(SCHED, X0, t_true, noise)

    def model_fn(x_t, t):
        # The loss must hand the model exactly these x_t and t.
        assert x_t.shape == X0.shape and t.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(t), np.asarray(t_true))
        np.testing.assert_allclose(np.asarray(x_t), np.asarray(x_t_true), atol=1e-6)
        return target if offset is None else target + offset

    return model_fn, t_true


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_oracle_has_zero_loss(parameterization, loss_type, gamma):
    model_fn, _ = _oracle(parameterization, RNG)
    loss, metrics = diffusion_loss(model_fn, SCHED, X0, RNG, parameterization=parameterization,
                                   loss_type=loss_type, min_snr_gamma=gamma)
    assert float(loss) == 0.0 and float(metrics["loss"]) == 0.0


def test_oracle_for_another_key_is_not_zero():
    model_fn = lambda x_t, t: training_target("eps", X0, sample_timesteps_and_noise(RNG, X0, 1000)[1], SCHED, t)
    loss, _ = diffusion_loss(model_fn, SCHED, X0, jax.random.PRNGKey(7))
    assert float(loss) > 0.5  # mean squared difference of two independent normals is 2


def test_default_loss_is_ldm_mse_on_eps():
    model_fn = lambda x_t, t: 0.5 * x_t + 0.001 * t[:, None, None, None].astype(jnp.float32)
    loss, metrics = diffusion_loss(model_fn, SCHED, X0, RNG)
    t, noise = sample_timesteps_and_noise(RNG, X0, 1000)
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    x_t = q_sample(SCHED, X0, t, noise)
    expected = np.mean((np.asarray(noise) - np.asarray(model_fn(x_t, t))) ** 2)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["loss_unweighted"]) == pytest.approx(expected, rel=1e-6)


def test_l1_and_l2_differ_as_their_formulas():
    offset = jax.random.normal(jax.random.PRNGKey(3), X0.shape) * 0.3
    for p in ["eps", "v"]:
        model_fn, _ = _oracle(p, RNG, offset)
        l2, _ = diffusion_loss(model_fn, SCHED, X0, RNG, parameterization=p, loss_type="l2")
        l1, _ = diffusion_loss(model_fn, SCHED, X0, RNG, parameterization=p, loss_type="l1")
        assert float(l2) == pytest.approx(float(jnp.mean(offset**2)), rel=1e-4)
        assert float(l1) == pytest.approx(float(jnp.mean(jnp.abs(offset))), rel=1e-4)
    with pytest.raises(ValueError, match="loss_type 'huber'"):
        diffusion_loss(model_fn, SCHED, X0, RNG, loss_type="huber")


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_weights_follow_the_formula(parameterization):
    gamma = 5.0
    per_example = jnp.linspace(0.1, 0.4, X0.shape[0])[:, None, None, None]
    model_fn, t = _oracle(parameterization, RNG, per_example)
    loss, metrics = diffusion_loss(model_fn, SCHED, X0, RNG, parameterization=parameterization, min_snr_gamma=gamma)
    ac = np.asarray(SCHED.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = ac / (1 - ac)
    w = {"eps": np.minimum(snr, gamma) / snr, "x0": np.minimum(snr, gamma),
         "v": np.minimum(snr, gamma) / (snr + 1)}[parameterization]
    sq = np.asarray(per_example).ravel() ** 2
    assert float(loss) == pytest.approx(np.mean(w * sq), rel=1e-5)
    assert float(metrics["loss_unweighted"]) == pytest.approx(np.mean(sq), rel=1e-5)
    np.testing.assert_allclose(np.asarray(min_snr_weight(SCHED, t, gamma, parameterization)), w, rtol=1e-5)


def test_min_snr_weight_values():
    t = jnp.array([0, 999])
    w = np.asarray(min_snr_weight(SCHED, t, 5.0, "eps"))
    snr0 = float(SCHED.snr(0))
    assert w[0] == pytest.approx(5.0 / snr0, rel=1e-5) and w[0] < 0.01  # low noise: down-weighted
    assert w[1] == pytest.approx(1.0)  # high noise: SNR < gamma, weight 1
    # All three weightings agree once mapped to x0 space: w_eps·SNR = w_x0 = w_v·(SNR+1) = min(SNR, γ).
    tt = jnp.arange(0, 1000, 37)
    snr = SCHED.snr(tt)
    for p, factor in [("eps", snr), ("x0", 1.0), ("v", snr + 1)]:
        np.testing.assert_allclose(np.asarray(min_snr_weight(SCHED, tt, 5.0, p) * factor),
                                   np.minimum(np.asarray(snr), 5.0), rtol=1e-5)


def test_quarter_metrics_pool_to_the_mean():
    model_fn = lambda x_t, t: 0.9 * x_t
    x0 = jnp.tile(X0, (4, 1, 1, 1))  # 64 examples so every quarter is likely hit
    loss, m = jax.jit(lambda r: diffusion_loss(model_fn, SCHED, x0, r))(RNG)
    counts = np.array([float(m[f"count_q{k}"]) for k in range(4)])
    means = np.array([float(m[f"loss_q{k}"]) for k in range(4)])
    assert counts.sum() == x0.shape[0] and np.all(counts > 0)
    assert float(np.sum(counts * means) / counts.sum()) == pytest.approx(float(loss), rel=1e-5)
    t, _ = sample_timesteps_and_noise(RNG, x0, 1000)
    np.testing.assert_array_equal(counts, np.bincount(np.asarray(t) // 250, minlength=4))


def test_loss_is_differentiable():
    def loss_of(scale):
        return diffusion_loss(lambda x_t, t: scale * x_t, SCHED, X0, RNG)[0]

    g = jax.grad(loss_of)(0.5)
    eps = 1e-3
    numeric = (loss_of(0.5 + eps) - loss_of(0.5 - eps)) / (2 * eps)
    assert float(g) == pytest.approx(float(numeric), rel=1e-2) and abs(float(g)) > 1e-3
