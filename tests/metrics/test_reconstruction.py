"""PSNR, SSIM (against a scipy reference of scikit-image's definition) and codebook statistics."""

import numpy as np
import pytest
import scipy.ndimage

from lidiff.metrics import reconstruction as rec


def _ssim_reference(x, y, data_range=255.0):
    """scikit-image's gaussian-weighted SSIM, written with scipy.ndimage, per channel, float64."""
    pad = 5
    vals = []
    for c in range(x.shape[-1]):
        a, b = x[..., c].astype(np.float64), y[..., c].astype(np.float64)
        f = lambda z: scipy.ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5)
        ux, uy = f(a), f(b)
        vx, vy, vxy = f(a * a) - ux * ux, f(b * b) - uy * uy, f(a * b) - ux * uy
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        vals.append(s[pad:-pad, pad:-pad].mean())
    return np.mean(vals)


def test_psnr_from_known_mse():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    y = x.copy()
    y[0] += 10  # mse 100
    y[1, 0, 0, 0] = 255  # mse 255^2 / 48
    got = np.asarray(rec.psnr(x, y))
    np.testing.assert_allclose(got, [10 * np.log10(255**2 / 100), 10 * np.log10(48)], rtol=1e-6)


def test_ssim_is_one_for_identical_images_and_matches_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 24, 20, 3)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(rec.ssim(x, x)), 1.0, atol=1e-5)
    got = np.asarray(rec.ssim(x, y))
    want = [_ssim_reference(x[i], y[i]) for i in range(2)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert got.max() < 0.99  # noisy copies are not identical
    with pytest.raises(ValueError, match="at least 11x11"):
        rec.ssim(x[:, :8, :8], y[:, :8, :8])


def test_codebook_usage_and_perplexity():
    counts = rec.code_counts(np.array([[0, 1], [2, 3]]), num_codes=8)
    np.testing.assert_array_equal(counts, [1, 1, 1, 1, 0, 0, 0, 0])
    out = rec.codebook_usage(counts + rec.code_counts(np.array([3, 2, 1, 0]), 8))  # accumulated over batches
    assert out["perplexity"] == pytest.approx(4.0) and out["usage"] == 0.5 and out["num_used"] == 4
    assert rec.codebook_usage(rec.code_counts(np.zeros(10, int), 8))["perplexity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exceed"):
        rec.code_counts(np.array([9]), 8)
