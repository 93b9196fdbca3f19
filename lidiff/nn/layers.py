"""Layers shared by the autoencoder and the UNet: GroupNorm(32), resampling, swish.

All tensors are NHWC. Parameters are float32; ``dtype`` is the compute dtype.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_norm(epsilon: float, name: str) -> nn.GroupNorm:
    """``nn.GroupNorm`` with 32 groups named ``name`` (params ``scale`` [C], ``bias`` [C]).

    Statistics and output are float32 whatever the input dtype; callers cast the output to their compute
    dtype. The reference uses eps 1e-6 in the autoencoder and spatial transformer, 1e-5 in the UNet.
    """
    return nn.GroupNorm(num_groups=32, epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def swish(x: jax.Array) -> jax.Array:
    """x * sigmoid(x) (SiLU)."""
    return nn.swish(x)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling. x: [B, H, W, C] -> [B, factor*H, factor*W, C]."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class Upsample(nn.Module):
    """Nearest x2 upsampling, then (optionally) a 3x3 conv named ``conv``. [B,H,W,C] -> [B,2H,2W,C]."""

    channels: int
    with_conv: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest(x)
        if self.with_conv:
            x = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv")(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (or 2x2 average pool). [B,H,W,C] -> [B,H/2,W/2,C].

    ``padding="asymmetric"`` pads (0,1) on H and W then convolves VALID, as the LDM autoencoder does;
    ``padding="symmetric"`` pads 1 on every side, as the LDM UNet does. ``conv_name`` is ``conv`` in the
    autoencoder and ``op`` in the UNet (the CompVis module names).
    """

    channels: int
    with_conv: bool = True
    padding: Literal["asymmetric", "symmetric"] = "symmetric"
    conv_name: str = "conv"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        pad = ((0, 1), (0, 1)) if self.padding == "asymmetric" else ((1, 1), (1, 1))
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype, name=self.conv_name)(x)
