"""Sinusoidal timestep embedding of the diffusion UNet."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding ``[cos(t f) | sin(t f)]`` with ``f_i = exp(-ln(max_period) * i / half)``.

    This is the LDM layout (cos first), i.e. diffusers' ``flip_sin_to_cos=True, freq_shift=0``.

    Args:
      timesteps: [B] int or float timesteps (fractional values are allowed).
      dim: embedding width; when odd, a zero column is appended.
      max_period: controls the lowest frequency.

    Returns:
      [B, dim] float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb
