"""Low-resolution conditioning inputs for LDM super-resolution, computed on the device from a PRNG key.

LDM-SR concatenates a low-resolution version of the training image to the latent. The low-res image is derived
inside the jitted train step (pure ``jax.numpy``, static shapes), so the host stays out of the loop and a resumed
run draws exactly the same degradations.

- ``bicubic_downsample``: antialiased bicubic reduction (matches PIL's ``Image.BICUBIC`` reduction to within one
  uint8 level).
- ``bsr_light_degrade``: a simplified BSRGAN "light" degradation (random Gaussian blur, random downsampling
  method, random Gaussian noise). The JPEG step of the paper is left out: JPEG encoding cannot run on the device.
- ``lowres_for``: picks one of the two by name (the config value).

All images are ``[B, H, W, C] float32 in [-1, 1]``; outputs are ``[B, H // factor, W // factor, C] float32`` in
[-1, 1].
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from lidiff.errors import ConfigError

DEGRADATIONS = ("bicubic", "bsr_light")
# Downsampling methods bsr_light draws from, one per image (BSRGAN light draws among cv2's linear/cubic/area).
DOWNSAMPLE_METHODS = ("bicubic", "bilinear", "area")


def _check_images(images, factor):
    if images.ndim != 4:
        raise ConfigError(f"images must be [B, H, W, C], got shape {tuple(images.shape)}")
    if not isinstance(factor, (int, np.integer)) or isinstance(factor, bool) or factor < 1:
        raise ConfigError(f"downsampling factor must be a positive int, got {factor!r}")
    _, h, w, _ = images.shape
    if h % factor or w % factor:
        raise ConfigError(
            f"image size {h}x{w} (H x W) is not divisible by the downsampling factor {factor}; "
            f"crop or resize the images to a multiple of {factor}"
        )


def _check_range(name, value, low_min, strict_low=False):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if (lo <= low_min if strict_low else lo < low_min) or hi < lo:
        need = f"{low_min} {'<' if strict_low else '<='} min <= max"
        raise ConfigError(f"{name} must be a (min, max) pair with {need}, got {value!r}")
    return lo, hi


def bicubic_downsample(images, factor: int):
    """Antialiased bicubic downsampling by an integer factor.

    Args:
      images: ``[B, H, W, C] float32 in [-1, 1]``; H and W must be divisible by ``factor``.
      factor: static positive int.

    Returns:
      ``[B, H // factor, W // factor, C] float32``, clipped to [-1, 1] (the cubic kernel overshoots slightly at
      edges, as PIL's does before it clips to uint8). Uses the Keys cubic kernel (a = -0.5) widened by
      ``factor`` (``jax.image.resize(..., "bicubic", antialias=True)``), the same filter as PIL's
      ``Image.resize(..., Image.BICUBIC)``.

    Raises:
      ConfigError (a ValueError): H or W not divisible by ``factor``, or not a 4-D batch.
    """
    _check_images(images, factor)
    b, h, w, c = images.shape
    out = jax.image.resize(images.astype(jnp.float32), (b, h // factor, w // factor, c), "bicubic", antialias=True)
    return jnp.clip(out, -1.0, 1.0)


def gaussian_blur(images, sigmas, radius: int):
    """Per-image isotropic Gaussian blur, separable, as a depthwise convolution with edge ('replicate') padding.

    Args:
      images: ``[B, H, W, C] float32``.
      sigmas: ``[B] float32 > 0``, the standard deviation of each image's kernel in pixels.
      radius: static int; the kernel has ``2 * radius + 1`` taps (truncated and renormalised to sum 1).

    Returns:
      ``[B, H, W, C] float32``. A constant image is unchanged.
    """
    b, h, w, c = images.shape
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    kernels = jnp.exp(-0.5 * (taps[None, :] / sigmas[:, None]) ** 2)
    kernels = kernels / jnp.sum(kernels, axis=1, keepdims=True)  # [B, K]
    # Fold the batch into the channels so each (image, channel) pair gets its own kernel: one depthwise conv.
    x = jnp.transpose(images.astype(jnp.float32), (1, 2, 0, 3)).reshape(1, h, w, b * c)
    x = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    k = jnp.repeat(kernels, c, axis=0).T  # [K, B*C], channel index = image * C + channel
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda x, kernel: jax.lax.conv_general_dilated(  # noqa: E731
        x, kernel, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=b * c,
        precision=jax.lax.Precision.HIGHEST)
    x = conv(x, k[:, None, None, :])  # along H
    x = conv(x, k[None, :, None, :])  # along W
    return jnp.transpose(x.reshape(h, w, b, c), (2, 0, 1, 3))


def bsr_light_degrade(images, rng, factor: int, *, blur_sigma=(0.2, 2.0), noise_sigma=(0.0, 0.08)):
    """A simplified BSRGAN "light" degradation: blur, downsample, add noise (no JPEG).

    Per image, independently:
      1. isotropic Gaussian blur with sigma ~ U(blur_sigma) (in high-res pixels), kernel of static size
         ``2 * ceil(3 * max(blur_sigma)) + 1``, edge padding;
      2. downsampling by ``factor`` with a method drawn uniformly from ``DOWNSAMPLE_METHODS``: antialiased
         bicubic, bilinear *without* antialiasing (like cv2's INTER_LINEAR, which aliases on reduction), or area
         (box average, cv2's INTER_AREA). All three are computed and one is selected per image;
      3. additive Gaussian noise with standard deviation ~ U(noise_sigma) (in [-1, 1] units; 0.08 is about 10
         uint8 levels), then clipping to [-1, 1].
    The paper's JPEG compression step is left out: JPEG encoding cannot run on the device inside a jitted step.

    Args:
      images: ``[B, H, W, C] float32 in [-1, 1]``, H and W divisible by ``factor``.
      rng: a PRNG key; the output is a deterministic function of (images, rng).
      factor: static positive int.
      blur_sigma: static (min, max), 0 < min <= max.
      noise_sigma: static (min, max), 0 <= min <= max.

    Returns:
      ``[B, H // factor, W // factor, C] float32 in [-1, 1]``.
    """
    _check_images(images, factor)
    s_lo, s_hi = _check_range("blur_sigma", blur_sigma, 0.0, strict_low=True)
    n_lo, n_hi = _check_range("noise_sigma", noise_sigma, 0.0)
    b, h, w, c = images.shape
    out_shape = (b, h // factor, w // factor, c)
    k_blur, k_method, k_nsig, k_noise = jax.random.split(rng, 4)

    sigmas = jax.random.uniform(k_blur, (b,), minval=s_lo, maxval=s_hi)
    blurred = gaussian_blur(images, sigmas, radius=int(math.ceil(3.0 * s_hi)))

    candidates = jnp.stack([
        jax.image.resize(blurred, out_shape, "bicubic", antialias=True),
        jax.image.resize(blurred, out_shape, "bilinear", antialias=False),
        jnp.mean(blurred.reshape(b, h // factor, factor, w // factor, factor, c), axis=(2, 4)),
    ])  # [M, B, h, w, C], in the order of DOWNSAMPLE_METHODS
    method = jax.random.randint(k_method, (b,), 0, len(DOWNSAMPLE_METHODS))
    low = jnp.take_along_axis(candidates, method[None, :, None, None, None], axis=0)[0]

    noise_std = jax.random.uniform(k_nsig, (b,), minval=n_lo, maxval=n_hi)
    low = low + noise_std[:, None, None, None] * jax.random.normal(k_noise, out_shape, jnp.float32)
    return jnp.clip(low, -1.0, 1.0)


def lowres_for(images, rng, factor: int, degradation: str):
    """The low-res conditioning input of LDM-SR for a training batch.

    Args:
      images: ``[B, H, W, C] float32 in [-1, 1]``.
      rng: a PRNG key (unused by "bicubic").
      factor: static positive int dividing H and W.
      degradation: "bicubic" (``bicubic_downsample``) or "bsr_light" (``bsr_light_degrade`` with its defaults).

    Returns:
      ``[B, H // factor, W // factor, C] float32 in [-1, 1]``.
    """
    if degradation == "bicubic":
        return bicubic_downsample(images, factor)
    if degradation == "bsr_light":
        return bsr_light_degrade(images, rng, factor)
    raise ConfigError(f"unknown degradation {degradation!r}; choose one of {', '.join(DEGRADATIONS)}")
