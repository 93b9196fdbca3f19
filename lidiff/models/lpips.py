"""LPIPS perceptual distance (Zhang et al. 2018, v0.1 "vgg" head) on a VGG16 trunk, as used by the LDM losses.

The network is frozen: its weights come from ImageNet VGG16 plus the LPIPS v0.1 linear heads, converted once by
``python -m lidiff.convert.lpips_weights`` and read with ``lidiff.convert.lpips_weights.load_lpips_params``. The
trainer keeps these params apart from the trained ones and never updates them; gradients still flow to the
*images*, which is what the perceptual loss needs.

Parameter tree (``LPIPS().init(...)['params']``)::

    vgg/features_{idx}/kernel [3, 3, Cin, Cout], vgg/features_{idx}/bias [Cout]
        idx in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 (torchvision ``vgg16().features.{idx}``)
    lin{k}/kernel [C_k, 1]  for k = 0..4, C = 64, 128, 256, 512, 512 (LPIPS ``lin{k}.model.1.weight``)

Computation, for x, y: [B, H, W, 3] in [-1, 1]:
  1. scale: (x - shift) / scale with shift (-.030, -.088, -.188), scale (.458, .448, .450);
  2. VGG16 ``features`` (3x3 convs with pad 1, ReLU, 2x2 max-pool between blocks), tapped after relu1_2,
     relu2_2, relu3_3, relu4_3 and relu5_3;
  3. per tap: unit-normalise along channels (f / (||f||_2 + 1e-10)), squared difference, 1x1 conv to one
     channel without bias (``lin{k}``), mean over H and W;
  4. sum over the five taps -> [B].
Steps 1, 2 and the normalisation of 3 depend on one image only: ``LPIPS.features`` computes them, so a fixed x can
be featurised once and compared with many y through ``LPIPS.distance``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision VGG16 "D" configuration: conv widths, "M" = 2x2 max-pool. Each conv is followed by a ReLU, so in
# torchvision's ``features`` Sequential a conv takes two indices and a pool one.
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)
# torchvision ``features`` indices of the 13 convolutions (derived from VGG16_CONFIG).
VGG16_CONV_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# Channels of the five taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def normalize_channels(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    """f / (sqrt(sum_c f^2) + eps) along the last axis. f: [..., C] -> same shape, float32.

    Where a position's channel vector is exactly zero (possible after ReLU) the value is 0 as in the reference,
    and the gradient is 0 instead of the NaN that sqrt'(0) * 0 would give.
    """
    f = f.astype(jnp.float32)
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + eps)


def scale_input(x: jax.Array) -> jax.Array:
    """The LPIPS ScalingLayer. x: [B, H, W, 3] in [-1, 1] -> [B, H, W, 3] roughly ImageNet-normalised."""
    shift = jnp.asarray(SHIFT, dtype=x.dtype)
    scale = jnp.asarray(SCALE, dtype=x.dtype)
    return (x - shift) / scale


class VGG16Features(nn.Module):
    """VGG16 ``features`` trunk returning the five LPIPS taps.

    Params ``features_{idx}`` mirror torchvision's ``features.{idx}``; the final max-pool (index 30) is not
    applied since no tap follows it.

    Attributes:
      dtype: compute dtype of the convolutions (params stay float32).
    """

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """x: [B, H, W, 3] (already scaled) -> [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3],
        shapes [B, H/2**k, W/2**k, C_k] for k = 0..4 (floor division), C_k = LPIPS_CHANNELS, dtype ``dtype``."""
        taps = []
        h = x.astype(self.dtype)
        idx = 0
        for item in VGG16_CONFIG:
            if item == "M":
                taps.append(h)
                h = nn.max_pool(h, window_shape=(2, 2), strides=(2, 2), padding="VALID")
                idx += 1
            else:
                h = nn.Conv(
                    int(item), (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
                    name=f"features_{idx}",
                )(h)
                h = nn.relu(h)
                idx += 2
        taps.append(h)
        return taps


class LPIPS(nn.Module):
    """Learned perceptual distance with VGG16 features and v0.1 linear heads.

    ``LPIPS(x, y) == distance(features(x), y)``: when one side of the distance is fixed across several calls (the
    real images of a train step, whose loss and adaptive-weight gradient both need it), compute ``features`` once
    and call ``distance`` with them, e.g.
    ``feats = lpips.apply(v, x, method=LPIPS.features); d = lpips.apply(v, feats, y, method=LPIPS.distance)``.

    Attributes:
      dtype: compute dtype of the VGG trunk. Normalisation, heads and the result are float32.
    """

    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.vgg = VGG16Features(dtype=self.dtype)
        for k in range(len(LPIPS_CHANNELS)):  # attribute names are the param names lin0..lin4
            setattr(self, f"lin{k}", nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32))

    def features(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """x: [B, H, W, 3] float in [-1, 1] (H, W >= 16) -> the five taps, each unit-normalised along channels:
        shapes [B, H/2**k, W/2**k, C_k] for k = 0..4 (floor division), C_k = LPIPS_CHANNELS, float32."""
        taps = self.vgg(scale_input(x.astype(jnp.float32)))
        return tuple(normalize_channels(t) for t in taps)

    def distance(self, feats_x: tuple[jax.Array, ...], y: jax.Array) -> jax.Array:
        """feats_x: ``features(x)`` of images x; y: [B, H, W, 3] float in [-1, 1] of x's shape -> LPIPS(x, y)
        [B] float32 (gradients flow to y, and to ``feats_x`` unless the caller stops them)."""
        feats_y = self.features(y)
        want = tuple(f.shape for f in feats_y)
        if tuple(f.shape for f in feats_x) != want:
            raise ValueError(f"LPIPS features of x have shapes {[f.shape for f in feats_x]}, y's are {list(want)}")
        total = jnp.zeros((y.shape[0],), jnp.float32)
        for k, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            d = getattr(self, f"lin{k}")(jnp.square(fx - fy))
            total = total + jnp.mean(d, axis=(1, 2, 3))
        return total

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x, y: [B, H, W, 3] float in [-1, 1] (H, W >= 16) -> distance [B] float32, >= 0 for the released
        (non-negative) heads and 0 (up to float rounding) when x == y."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {x.shape} vs {y.shape}")
        # Two calls of one trunk (shared params). The distance of identical images is 0 up to float rounding:
        # XLA may schedule the two branches differently (measured: ~3e-16 under jit on CPU, exactly 0 eagerly).
        return self.distance(self.features(x), y)


def lpips_param_shapes(image_size: int = 32) -> dict:
    """The LPIPS param tree as ``jax.ShapeDtypeStruct`` leaves (no compute), for converters and checks."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda a, b: LPIPS().init(jax.random.PRNGKey(0), a, b), x, x)["params"]


