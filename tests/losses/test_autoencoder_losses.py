"""Autoencoder loss terms against values computed by hand from their definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidiff.losses.autoencoder import (
    adaptive_weight,
    add_perceptual,
    adopt_weight,
    generator_adversarial_loss,
    hinge_d_loss,
    nll_loss_mean,
    nll_loss_sum_per_image,
    reconstruction_loss,
    vanilla_d_loss,
)


def test_reconstruction_loss_l1_l2_elementwise():
    x = jnp.array([[[[0.5, -1.0]]], [[[0.0, 1.0]]]])  # [2, 1, 1, 2]
    x_rec = jnp.array([[[[0.0, -0.5]]], [[[1.0, -1.0]]]])
    np.testing.assert_allclose(reconstruction_loss(x, x_rec), [[[[0.5, 0.5]]], [[[1.0, 2.0]]]])
    np.testing.assert_allclose(reconstruction_loss(x, x_rec, "l2"), [[[[0.25, 0.25]]], [[[1.0, 4.0]]]])
    with pytest.raises(ValueError, match="'l3'"):
        reconstruction_loss(x, x_rec, "l3")


def test_hinge_d_loss_known_logits():
    real = jnp.array([2.0, 0.5, -1.0, 0.0])  # relu(1 - real) = 0, 0.5, 2, 1 -> mean 0.875
    fake = jnp.array([-2.0, 0.0, 1.0, -0.5])  # relu(1 + fake) = 0, 1, 2, 0.5 -> mean 0.875
    np.testing.assert_allclose(hinge_d_loss(real, fake), 0.5 * (0.875 + 0.875), rtol=1e-6)
    # a perfect discriminator beyond the margins has zero loss
    np.testing.assert_allclose(hinge_d_loss(jnp.full((2, 3, 3, 1), 1.5), jnp.full((2, 3, 3, 1), -1.5)), 0.0)


def test_vanilla_d_loss_known_logits():
    real, fake = jnp.array([0.0, 2.0]), jnp.array([0.0, -1.0])
    sp = lambda v: math.log1p(math.exp(v))
    want = 0.5 * ((sp(0.0) + sp(-2.0)) / 2 + (sp(0.0) + sp(-1.0)) / 2)
    np.testing.assert_allclose(vanilla_d_loss(real, fake), want, rtol=1e-6)


def test_generator_adversarial_loss_is_negative_mean():
    np.testing.assert_allclose(generator_adversarial_loss(jnp.array([[1.0, -3.0], [0.5, 0.5]])), 0.25)


def test_adopt_weight_gates_at_threshold_and_jits():
    f = jax.jit(lambda step: adopt_weight(0.7, step, threshold=100))
    np.testing.assert_allclose([f(0), f(99), f(100), f(5000)], [0.0, 0.0, 0.7, 0.7], rtol=1e-6)
    np.testing.assert_allclose(adopt_weight(1.0, 3, threshold=10, value=0.25), 0.25)
    np.testing.assert_allclose(adopt_weight(1.0, 0, threshold=0), 1.0)


def test_adaptive_weight_ratio_clip_and_zero_gradient():
    nll_grad = jnp.array([[3.0, 4.0]])  # norm 5
    g_grad = jnp.array([0.0, 2.0])  # norm 2
    np.testing.assert_allclose(adaptive_weight(nll_grad, g_grad, 0.5), 0.5 * 5.0 / (2.0 + 1e-4), rtol=1e-6)
    # zero generator gradient: 5 / 1e-4 = 5e4 is clipped to 1e4, and stays finite
    w = adaptive_weight(nll_grad, jnp.zeros(2), 1.0)
    assert np.isfinite(w) and float(w) == pytest.approx(1e4)
    np.testing.assert_allclose(adaptive_weight(nll_grad, jnp.zeros(2), 1.0, max_weight=7.0), 7.0)
    # pytrees: one global L2 norm over all leaves
    np.testing.assert_allclose(
        adaptive_weight({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, {"k": jnp.array([1.0])}, 1.0),
        5.0 / (1.0 + 1e-4), rtol=1e-6)


def test_adaptive_weight_passes_no_gradient():
    def total(scale):
        w = adaptive_weight(scale * jnp.array([3.0, 4.0]), scale * jnp.array([1.0, 0.0]), 1.0)
        return w * scale

    # d/ds [w(s) * s] with w treated as a constant is w(s) = 5/(1 + 1e-4)
    g = jax.grad(total)(1.0)
    np.testing.assert_allclose(g, 5.0 / (1.0 + 1e-4), rtol=1e-6)
    assert np.isfinite(jax.grad(lambda s: adaptive_weight(s * jnp.ones(2), s * jnp.zeros(2)) * s)(1.0))


def test_nll_sum_per_image_and_mean_reductions():
    rec = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3) / 10.0
    total = float(np.sum(np.arange(24)) / 10.0)  # 27.6
    np.testing.assert_allclose(nll_loss_sum_per_image(rec), total / 2, rtol=1e-6)
    logvar = 0.5  # rec / e^0.5 + 0.5 per element, 12 elements per image
    np.testing.assert_allclose(nll_loss_sum_per_image(rec, logvar), (total / math.exp(0.5) + 24 * 0.5) / 2,
                               rtol=1e-6)
    np.testing.assert_allclose(nll_loss_mean(rec), total / 24, rtol=1e-6)


def test_add_perceptual_broadcasts_per_image():
    rec = jnp.zeros((2, 4, 4, 3))
    out = add_perceptual(rec, jnp.array([0.1, 0.2]), perceptual_weight=2.0)
    np.testing.assert_allclose(out[0], 0.2)
    np.testing.assert_allclose(out[1], 0.4)
    # in the KL loss the perceptual term is therefore counted once per element of an image
    np.testing.assert_allclose(nll_loss_sum_per_image(out), (0.2 + 0.4) * 48 / 2, rtol=1e-6)
