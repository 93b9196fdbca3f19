"""Loss terms of the first-stage (autoencoder) objectives, as pure jnp functions.

They reproduce the two reference losses:

- KL autoencoder (LDM ``LPIPSWithDiscriminator``)::

      rec  = |x - x_rec| + perceptual_weight * lpips(x, x_rec)       # [B, H, W, C], lpips broadcast per image
      nll  = nll_loss_sum_per_image(rec, logvar)                     # sum over H, W, C; mean over B
      g    = generator_adversarial_loss(disc(x_rec))
      loss = nll + kl_weight * mean_B(posterior.kl())
             + adaptive_weight(d nll/d W_last, d g/d W_last, disc_weight) * adopt_weight(disc_factor, step, start) * g

- VQ autoencoder (taming ``VQLPIPSWithDiscriminator``): the same, but ``nll_loss_mean(rec)`` (a mean over
  every element, no logvar), plus ``codebook_weight * q_loss`` instead of the KL term.

The discriminator minimises ``adopt_weight(disc_factor, step, start) * hinge_d_loss(D(x), D(sg(x_rec)))``
(or ``vanilla_d_loss``). ``W_last`` is the decoder's last conv kernel; the trainer computes the two gradients.

Because LPIPS is broadcast over every pixel before the per-image sum, in the KL loss it is effectively weighted
by H * W * C, exactly as in the reference.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp


def reconstruction_loss(x: jax.Array, x_rec: jax.Array, kind: Literal["l1", "l2"] = "l1") -> jax.Array:
    """Elementwise pixel loss. x, x_rec: [B, H, W, C] in [-1, 1] -> [B, H, W, C] float32:
    ``|x - x_rec|`` (l1) or ``(x - x_rec)**2`` (l2)."""
    diff = x.astype(jnp.float32) - x_rec.astype(jnp.float32)
    if kind == "l1":
        return jnp.abs(diff)
    if kind == "l2":
        return jnp.square(diff)
    raise ValueError(f"unknown reconstruction loss {kind!r}; expected 'l1' or 'l2'")


def add_perceptual(rec: jax.Array, p_loss: jax.Array, perceptual_weight: float = 1.0) -> jax.Array:
    """rec [B, H, W, C] + perceptual_weight * p_loss [B] broadcast to every element of its image."""
    p = p_loss.astype(jnp.float32).reshape((p_loss.shape[0],) + (1,) * (rec.ndim - 1))
    return rec + perceptual_weight * p


def nll_loss_sum_per_image(rec: jax.Array, logvar: jax.Array | float = 0.0) -> jax.Array:
    """KL-autoencoder NLL: ``rec / exp(logvar) + logvar`` summed over every non-batch axis, mean over the batch.

    rec: [B, ...] float (e.g. [B, H, W, C]); logvar: scalar (the reference's learned ``logvar``, init 0 and
    never trained there). Returns a float32 scalar.
    """
    rec = rec.astype(jnp.float32)
    logvar = jnp.asarray(logvar, jnp.float32)
    nll = rec / jnp.exp(logvar) + logvar
    return jnp.sum(nll) / rec.shape[0]


def nll_loss_mean(rec: jax.Array) -> jax.Array:
    """VQ-autoencoder NLL: the mean of ``rec`` over every element (batch included). Returns a float32 scalar."""
    return jnp.mean(rec.astype(jnp.float32))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))). Logits of any shape; returns a float32 scalar."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(softplus(-real)) + mean(softplus(fake))), the non-saturating GAN loss on logits."""
    real = jnp.mean(jax.nn.softplus(-logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """-mean(logits_fake): the generator's adversarial term. Returns a float32 scalar."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def adopt_weight(weight: jax.Array | float, step: jax.Array | int, threshold: int, value: float = 0.0) -> jax.Array:
    """``value`` (0) while ``step < threshold``, else ``weight``; jit-friendly (``step`` may be traced)."""
    return jnp.where(jnp.asarray(step) < threshold, jnp.asarray(value, jnp.float32),
                     jnp.asarray(weight, jnp.float32))


def _global_norm(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves))


def adaptive_weight(
    nll_grad: Any, g_grad: Any, disc_weight: float | jax.Array = 1.0, max_weight: float = 1e4, eps: float = 1e-4
) -> jax.Array:
    """Balances the GAN term against the reconstruction term at the decoder's last layer.

    ``disc_weight * clip(||nll_grad|| / (||g_grad|| + eps), 0, max_weight)``, with no gradient flowing through
    it. nll_grad, g_grad: arrays (or pytrees, L2 norm over all leaves) of the gradients of the NLL and of the
    generator loss w.r.t. the last decoder conv kernel. Finite even when ``g_grad`` is zero. Returns float32.
    """
    # Stopping the gradient at the inputs (not only the output) also keeps the unused backward pass of the norm
    # free of the NaN that sqrt'(0) would give for an all-zero gradient.
    nll_grad = jax.lax.stop_gradient(nll_grad)
    g_grad = jax.lax.stop_gradient(g_grad)
    ratio = jnp.clip(_global_norm(nll_grad) / (_global_norm(g_grad) + eps), 0.0, max_weight)
    return ratio * jnp.asarray(disc_weight, jnp.float32)
