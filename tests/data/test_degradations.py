"""Low-res conditioning inputs for LDM-SR: bicubic vs PIL, BSR-light blur/downsample/noise, refusals, jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from lidiff.data import degradations
from lidiff.data.degradations import bicubic_downsample, bsr_light_degrade, gaussian_blur, lowres_for
from lidiff.errors import ConfigError

LEVEL = 2.0 / 255.0  # one uint8 level in [-1, 1] units
B, S, F = 8, 32, 4  # one batch shape and factor for the BSR tests, so XLA compiles each op once


def uint8_images(seed, n=2, h=64, w=48):
    """Random noise and a smooth pattern plus noise: uint8 [n, h, w, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    smooth = 127 + 100 * (np.sin(x / 5.0) * np.cos(y / 7.0))[..., None] + rng.normal(0, 20, (h, w, 3))
    imgs = [rng.integers(0, 256, (h, w, 3)), np.clip(smooth, 0, 255)]
    return np.stack([imgs[i % 2] for i in range(n)]).astype(np.uint8)


def to_float(u8):
    return jnp.asarray(u8.astype(np.float32) / 127.5 - 1.0)


def hf_energy(x):
    """Mean squared difference between horizontal and vertical neighbours, per image."""
    x = np.asarray(x)
    return ((x[:, 1:] - x[:, :-1]) ** 2).mean(axis=(1, 2, 3)) + ((x[:, :, 1:] - x[:, :, :-1]) ** 2).mean(axis=(1, 2, 3))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bicubic_matches_pil_within_one_uint8_level(factor):
    """Measured (jax 0.10.2, Pillow 13, 64x48, seeds 0-2): mean |diff| 0.24-0.29 uint8 levels; max 0.59-0.97
    levels, PIL's rounding to uint8, except on pure noise at factor 2, where 1 value in ~2300 is off by up to 3.7
    levels: PIL rounds and clips to uint8 between its horizontal and vertical passes, cutting the cubic overshoot
    (emulating that intermediate step brings the max back under 0.9 levels)."""
    u8 = uint8_images(0)  # image 0: uniform noise, image 1: smooth pattern + noise
    n, h, w, _ = u8.shape
    ref = np.stack([np.asarray(Image.fromarray(im).resize((w // factor, h // factor), Image.BICUBIC)) for im in u8])
    ref = ref.astype(np.float32) / 127.5 - 1.0
    out = np.asarray(bicubic_downsample(to_float(u8), factor))
    assert out.shape == ref.shape and out.dtype == np.float32
    diff = np.abs(out - ref) / LEVEL
    assert diff.mean() < 0.35, diff.mean()
    assert diff[1].max() < 1.0, diff[1].max()  # smooth image: no overshoot, only PIL's final rounding
    assert diff[0].max() < 5.0 and (diff[0] > 1.0).mean() < 1e-3, (diff[0].max(), (diff[0] > 1.0).mean())


def test_pil_bound_rejects_a_wrong_kernel():
    """The PIL bound above is tight enough to catch a non-antialiased resize."""
    u8 = uint8_images(0)
    n, h, w, _ = u8.shape
    ref = np.stack([np.asarray(Image.fromarray(im).resize((w // 4, h // 4), Image.BICUBIC)) for im in u8])
    ref = ref.astype(np.float32) / 127.5 - 1.0
    aliased = jax.image.resize(to_float(u8), (n, h // 4, w // 4, 3), "bicubic", antialias=False)
    assert np.abs(np.asarray(aliased) - ref).mean() > 5 * LEVEL


@pytest.mark.parametrize("degradation", degradations.DEGRADATIONS)
def test_lowres_shapes_dtype_range_under_jit(degradation):
    x = to_float(uint8_images(1, n=B, h=S, w=S))
    fn = jax.jit(functools.partial(lowres_for, factor=F, degradation=degradation))
    out = fn(x, jax.random.key(0))
    assert out.shape == (B, S // F, S // F, 3) and out.dtype == jnp.float32
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    np.testing.assert_allclose(out, lowres_for(x, jax.random.key(0), F, degradation), atol=1e-5)


@pytest.mark.parametrize("value", [-1.0, 0.3, 1.0])
def test_constant_image_stays_constant(value):
    x = jnp.full((B, S, S, 3), value, jnp.float32)
    np.testing.assert_allclose(bicubic_downsample(x, F), value, atol=1e-6)
    # No noise: blur, every downsampling method and the selection must all preserve a constant.
    out = bsr_light_degrade(x, jax.random.key(3), F, noise_sigma=(0.0, 0.0))
    np.testing.assert_allclose(out, value, atol=1e-5)


def test_bsr_deterministic_per_rng_and_rng_dependent():
    x = to_float(uint8_images(2, n=B, h=S, w=S))
    a = bsr_light_degrade(x, jax.random.key(7), F)
    b = bsr_light_degrade(x, jax.random.key(7), F)
    c = bsr_light_degrade(x, jax.random.key(8), F)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).mean()) > 0.01


def test_bsr_draws_every_downsampling_method_per_image():
    """With the blur an identity and no noise, each image equals one of the three downsamplings, and all appear."""
    x = to_float(uint8_images(3, n=B, h=S, w=S))
    out = np.asarray(bsr_light_degrade(x, jax.random.key(0), F, blur_sigma=(1e-3, 1e-3), noise_sigma=(0.0, 0.0)))
    s = S // F
    cands = [
        np.asarray(jnp.clip(jax.image.resize(x, (B, s, s, 3), "bicubic", antialias=True), -1, 1)),
        np.asarray(jax.image.resize(x, (B, s, s, 3), "bilinear", antialias=False)),
        np.asarray(x).reshape(B, s, F, s, F, 3).mean(axis=(2, 4)),
    ]
    used = set()
    for i in range(B):
        matches = [m for m, cand in enumerate(cands) if np.abs(out[i] - cand[i]).max() < 1e-5]
        assert len(matches) == 1, (i, matches)
        used.add(matches[0])
    assert used == {0, 1, 2}


def test_bsr_noise_level_honoured():
    x = jnp.zeros((B, S, S, 3), jnp.float32)  # 8x8x3 low-res values per image
    out = np.asarray(bsr_light_degrade(x, jax.random.key(0), F, noise_sigma=(0.05, 0.05)))
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 0.05, rtol=0.15)
    out = np.asarray(bsr_light_degrade(x, jax.random.key(0), F, noise_sigma=(0.0, 0.08)))
    stds = out.std(axis=(1, 2, 3))
    assert stds.max() < 0.08 * 1.1 and stds.max() - stds.min() > 0.01  # per-image sigma, within the range


def test_gaussian_blur_matches_scipy_per_image_sigma():
    """Each image (and every channel of it) gets its own sigma: catches a batch/channel mix-up in the folding."""
    x = np.random.default_rng(4).normal(size=(3, 20, 17, 2)).astype(np.float32)
    sigmas = np.array([0.5, 1.0, 2.0], np.float32)
    out = np.asarray(gaussian_blur(jnp.asarray(x), jnp.asarray(sigmas), radius=6))
    for i, s in enumerate(sigmas):
        ref = scipy.ndimage.gaussian_filter(x[i], sigma=(s, s, 0), mode="nearest", truncate=6 / s)
        np.testing.assert_allclose(out[i], ref, atol=1e-5)


def test_blur_reduces_high_frequency_energy():
    x = to_float(uint8_images(5, n=B, h=S, w=S))
    e0 = hf_energy(x)
    e1 = hf_energy(gaussian_blur(x, jnp.full((B,), 1.0), radius=6))
    e2 = hf_energy(gaussian_blur(x, jnp.full((B,), 2.0), radius=6))
    assert np.all(e1 < 0.5 * e0) and np.all(e2 < e1)
    # Same rng (same method and noise draws), stronger blur -> smoother low-res output (on noise images: on the
    # smooth pattern the factor-4 antialiasing already removes what the blur would).
    x = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (B, S, S, 3)).astype(np.float32))
    sharp = bsr_light_degrade(x, jax.random.key(0), F, blur_sigma=(0.2, 2.0 / 9), noise_sigma=(0.0, 0.0))
    soft = bsr_light_degrade(x, jax.random.key(0), F, blur_sigma=(1.8, 2.0), noise_sigma=(0.0, 0.0))
    assert np.all(hf_energy(soft) < 0.7 * hf_energy(sharp))


def test_refusals_name_the_problem():
    x = jnp.zeros((1, 30, 32, 3))
    with pytest.raises(ValueError, match=r"30x32.*not divisible.*4"):
        bicubic_downsample(x, 4)
    with pytest.raises(ValueError, match=r"30x32.*not divisible.*4"):
        bsr_light_degrade(x, jax.random.key(0), 4)
    with pytest.raises(ValueError, match="positive int"):
        bicubic_downsample(jnp.zeros((1, 32, 32, 3)), 0)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        bicubic_downsample(jnp.zeros((32, 32, 3)), 2)
    with pytest.raises(ConfigError, match=r"unknown degradation 'jpeg'.*bicubic, bsr_light"):
        lowres_for(jnp.zeros((1, 32, 32, 3)), jax.random.key(0), 2, "jpeg")
    with pytest.raises(ValueError, match="blur_sigma"):
        bsr_light_degrade(jnp.zeros((1, 32, 32, 3)), jax.random.key(0), 2, blur_sigma=(0.0, 1.0))
    with pytest.raises(ValueError, match="noise_sigma"):
        bsr_light_degrade(jnp.zeros((1, 32, 32, 3)), jax.random.key(0), 2, noise_sigma=(0.1, 0.05))
