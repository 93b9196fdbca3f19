"""PatchGAN discriminator (``NLayerDiscriminator`` of pix2pix / taming-transformers), NHWC.

Layers for ``n_layers=3`` (torch ``main.{idx}`` index in brackets; lidiff param names are ``main_{idx}``)::

    [0] conv 4x4 s2 p1, input_nc -> ndf, bias      [1] LeakyReLU(0.2)
    [2] conv 4x4 s2 p1, ndf -> 2 ndf, no bias      [3] norm   [4] LeakyReLU(0.2)
    [5] conv 4x4 s2 p1, 2 ndf -> 4 ndf, no bias    [6] norm   [7] LeakyReLU(0.2)
    [8] conv 4x4 s1 p1, 4 ndf -> 8 ndf, no bias    [9] norm   [10] LeakyReLU(0.2)
    [11] conv 4x4 s1 p1, 8 ndf -> 1, bias

In general: one stride-2 conv without norm, ``n_layers - 1`` stride-2 conv+norm blocks, one stride-1 conv+norm
block, and a stride-1 conv to one channel; the width of block n is ``ndf * min(2**n, 8)``. For a 256 px input and
``n_layers=3`` the output is 30x30 logits. Padding is explicit (1 on every side), never 'SAME'.

Init as taming: conv kernels N(0, 0.02), conv biases 0, norm scale N(1, 0.02), norm bias 0.

Normalisation (``norm``):

- ``"batch"`` (default, the reference): ``flax.linen.BatchNorm`` (momentum 0.9 == torch momentum 0.1, eps 1e-5).
  ``train=True`` normalises with the statistics of the current batch and updates the running ``mean``/``var``
  in the ``batch_stats`` collection, so call ``apply(..., train=True, mutable=['batch_stats'])``;
  ``train=False`` uses the running statistics. Under ``jax.jit`` with the batch sharded over a mesh axis
  (e.g. ``NamedSharding(mesh, P('data'))``) the batch mean and variance are taken over the *global* batch: jit
  traces one program over the whole logical array and XLA inserts the cross-device reductions, so no
  ``axis_name`` and no ``pmap`` are involved. Difference from torch: torch stores the *unbiased* batch variance
  (times n/(n-1), n = B*H*W) in ``running_var``; flax stores the biased one. Outputs in train mode are
  identical; only the running variance (used in eval mode) differs by that factor.
- ``"group"``: GroupNorm with 32 groups (eps 1e-5), no batch dependence and no ``batch_stats``; widths must be
  multiples of 32.
- ``"none"``: no normalisation.

With a norm the convs before it have no bias (as taming with BatchNorm); with ``"none"`` they have one. The torch
indices stay the same for every choice, so param names do not shift.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp


def _bn_scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator.

    Attributes:
      input_nc: input channels (3 for RGB).
      ndf: width of the first conv.
      n_layers: number of stride-2 convs (>= 1).
      norm: ``"batch"`` | ``"group"`` | ``"none"`` (see the module docstring).
      dtype: compute dtype; params and batch statistics stay float32, the logits are returned as float32.
    """

    input_nc: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm: Literal["batch", "group", "none"] = "batch"
    dtype: jnp.dtype = jnp.float32

    def _conv(self, features: int, stride: int, use_bias: bool, idx: int) -> nn.Conv:
        return nn.Conv(
            features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=use_bias,
            kernel_init=nn.initializers.normal(0.02), bias_init=nn.initializers.zeros,
            dtype=self.dtype, param_dtype=jnp.float32, name=f"main_{idx}",
        )

    def _norm(self, h: jax.Array, idx: int, train: bool) -> jax.Array:
        if self.norm == "batch":
            h = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, scale_init=_bn_scale_init,
                use_fast_variance=False, dtype=jnp.float32, param_dtype=jnp.float32, name=f"main_{idx}",
            )(h)
        elif self.norm == "group":
            if h.shape[-1] % 32:
                raise ValueError(f"norm='group' needs widths divisible by 32, got {h.shape[-1]}")
            h = nn.GroupNorm(
                num_groups=32, epsilon=1e-5, scale_init=_bn_scale_init, dtype=jnp.float32,
                param_dtype=jnp.float32, name=f"main_{idx}",
            )(h)
        elif self.norm != "none":
            raise ValueError(f"unknown norm {self.norm!r}; expected 'batch', 'group' or 'none'")
        return h.astype(self.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """x: [B, H, W, input_nc] float in [-1, 1] -> logits [B, h, w, 1] float32.

        h = H / 2**n_layers - 2 (e.g. 256 -> 30, 32 -> 2 for n_layers=3); H must be at least 2**n_layers * 3.
        ``train`` selects batch statistics (True) or running statistics (False) for ``norm="batch"``.
        """
        if x.shape[-1] != self.input_nc:
            raise ValueError(f"expected {self.input_nc} input channels, got shape {x.shape}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        use_bias = self.norm == "none"
        h = self._conv(self.ndf, 2, True, 0)(x.astype(self.dtype))
        h = nn.leaky_relu(h, 0.2)
        idx = 2
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            h = self._conv(self.ndf * min(2**n, 8), stride, use_bias, idx)(h)
            h = self._norm(h, idx + 1, train)
            h = nn.leaky_relu(h, 0.2)
            idx += 3
        h = self._conv(1, 1, True, idx)(h)
        return h.astype(jnp.float32)
