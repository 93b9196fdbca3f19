"""Fréchet distance closed forms and robustness, streaming moments, and stats files."""

import numpy as np
import pytest
import scipy.linalg

from lidiff.metrics import fid


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1.astype(np.float64) @ s2.astype(np.float64))
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(16), _random_cov(rng, 16)
    assert fid.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("m1,s1,m2,s2", [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.3), (3.0, 0.1, 3.0, 5.0)])
def test_one_dimensional_gaussians(m1, s1, m2, s2):
    got = fid.frechet_distance(np.array([m1]), np.array([[s1**2]]), np.array([m2]), np.array([[s2**2]]))
    assert got == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12, abs=1e-12)


def test_agrees_with_scipy_sqrtm_on_random_covariances():
    rng = np.random.default_rng(1)
    for d in (3, 32, 128):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        want = _scipy_fid(mu1, s1, mu2, s2)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_singular_covariances_stay_finite_and_accurate():
    rng = np.random.default_rng(2)
    d = 64
    # rank 10 covariances (fewer samples than dimensions), and a shared random rotation
    s1, s2 = _random_cov(rng, d, rank=10), _random_cov(rng, d, rank=10)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    # exact value from the definition with a well-conditioned regularisation taken to its limit
    eps = 1e-9
    want = _scipy_fid(mu1, s1 + eps * np.eye(d), mu2, s2 + eps * np.eye(d))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # the same covariance twice: distance only from the means, even though it is singular
    assert fid.frechet_distance(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-7)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10 * np.trace(s1))


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="dimension 3, expected 4"):
        fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"sigma \[D, D\]"):
        fid.frechet_distance(np.zeros(4), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_moments_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((101, 7)) * 5 + 1000.0  # large offset: the shift keeps the covariance accurate
    acc = fid.MomentAccumulator(7)
    for chunk in np.array_split(x, 6):
        acc.update(chunk.astype(np.float32))
    mu, sigma = acc.stats()
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-9)
    assert acc.n == 101


def test_stats_file_round_trip_and_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(4)
    stats = fid.FeatureStats(rng.standard_normal(5), _random_cov(rng, 5), 123, {"resize": "bilinear"})
    path = str(tmp_path / "ref.npz")
    fid.save_stats(path, stats)
    with np.load(path) as f:  # what pytorch-fid reads
        np.testing.assert_array_equal(f["mu"], stats.mu)
        np.testing.assert_array_equal(f["sigma"], stats.sigma)
    back = fid.load_stats(path)
    assert back.num_images == 123 and back.meta == {"resize": "bilinear"}
    with pytest.raises(ValueError, match="expected 2048"):
        fid.load_stats(path, dim=2048)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(5), sigma=np.zeros((5, 4)))
    with pytest.raises(ValueError, match="sigma"):
        fid.load_stats(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "other.npz", x=np.zeros(5))
    with pytest.raises(ValueError, match="not the stats keys"):
        fid.load_stats(str(tmp_path / "other.npz"))
