"""autoencoder_metrics: averages over batches, exact reconstructions, codebook counts, reconstruction FID."""

import numpy as np
import pytest

from lidiff.data.transforms import to_float, to_uint8
from lidiff.eval.autoencoder import autoencoder_metrics
from lidiff.eval.features import InceptionExtractor
from lidiff.metrics.reconstruction import psnr
from lidiff.models.inception import random_inception_variables


def _batches(seed=0, n=3, b=2, size=16):
    rng = np.random.default_rng(seed)
    return [to_float(rng.integers(0, 256, (b, size, size, 3)).astype(np.uint8)) for _ in range(n)]


def test_exact_reconstruction_scores_perfectly():
    out = autoencoder_metrics(lambda x: (x, None), _batches(), lpips=lambda x, y: np.abs(x - y).mean(axis=(1, 2, 3)))
    assert out["num_images"] == 6
    assert out["psnr"] == 100.0 and out["ssim"] == pytest.approx(1.0, abs=1e-5) and out["lpips"] == 0.0
    assert "rfid" not in out and "codebook" not in out


def test_noisy_reconstruction_is_the_mean_over_all_images():
    batches = _batches()
    noise = np.random.default_rng(1)
    seen = []

    def reconstruct(x):
        seen.append(x + noise.normal(0, 0.1, x.shape).astype(np.float32))
        return seen[-1], None

    out = autoencoder_metrics(reconstruct, batches)
    want = np.concatenate([np.asarray(psnr(to_uint8(x), to_uint8(np.clip(r, -1, 1)))) for x, r in zip(batches, seen)])
    assert out["psnr"] == pytest.approx(float(want.mean()), rel=1e-6)
    assert 20 < out["psnr"] < 30 and out["ssim"] < 0.999


def test_codebook_usage_over_the_split():
    codes = iter([np.array([[0, 1]]), np.array([[1, 1]]), np.array([[2, 0]])])
    out = autoencoder_metrics(lambda x: (x, next(codes)), _batches(), num_codes=16)
    assert out["codebook"]["num_used"] == 3 and out["codebook"]["usage"] == 3 / 16
    p = np.array([2, 3, 1]) / 6
    assert out["codebook"]["perplexity"] == pytest.approx(np.exp(-np.sum(p * np.log(p))))


def test_reconstruction_fid_is_zero_for_exact_and_positive_for_blurred():
    extractor = InceptionExtractor(random_inception_variables(0), batch_size=8)
    batches = _batches(n=1, b=4, size=32)  # originals + reconstructions: one device call of 8
    exact = autoencoder_metrics(lambda x: (x, None), batches, extractor=extractor)
    assert exact["rfid"] == pytest.approx(0.0, abs=1e-6)
    flat = autoencoder_metrics(lambda x: (np.zeros_like(x) + x.mean(), None), batches, extractor=extractor)
    assert flat["rfid"] > 1e-3
