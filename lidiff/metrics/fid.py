"""Fréchet Inception Distance: the distance between two Gaussians, streaming feature moments, and stats files.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The trace term is computed in float64 without a general (non-symmetric) matrix square root: for covariances
(symmetric positive semi-definite) S1 S2 has the non-negative eigenvalues of the symmetric PSD matrix
S1^(1/2) S2 S1^(1/2), so tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i); ``trace_sqrt_product`` gets them from a
pivoted Cholesky factor of S1 (restricted to its numerical rank) and one symmetric eigenvalue problem. This stays
finite and accurate when S1 or S2 are singular (fewer samples than feature dimensions), where
``scipy.linalg.sqrtm`` of S1 S2 (what pytorch-fid uses) needs a diagonal-offset retry and may return a complex
result.

Stats files are pytorch-fid's ``.npz`` (``mu`` [D], ``sigma`` [D, D]); lidiff adds ``num_images`` and ``meta`` (a
JSON string: source, preprocessing, resize), which pytorch-fid ignores.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, NamedTuple

import numpy as np


class FeatureStats(NamedTuple):
    """Gaussian statistics of features: mu float64 [D], sigma float64 [D, D], the number of images and metadata."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None
    meta: Mapping[str, Any] | None = None


def check_stats(mu: np.ndarray, sigma: np.ndarray, name: str = "stats", dim: int | None = None) -> None:
    """Raises ValueError unless mu is [D] and sigma [D, D] finite (and D == ``dim`` when given)."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mu must be [D] and sigma [D, D]; got mu {mu.shape} and sigma {sigma.shape}")
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"{name}: features have dimension {mu.shape[0]}, expected {dim} (Inception pool3)")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{name}: mu or sigma contains NaN or inf")


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD [D, D] matrices, in float64 (see module docstring).

    S1 = R R^T with R [D, r] from a rank-revealing pivoted Cholesky (LAPACK ``dpstrf``; it stops when the largest
    remaining diagonal is below D * eps * max diag, i.e. at S1's numerical rank r). The non-zero eigenvalues of
    S1 S2 are those of the symmetric PSD r x r matrix R^T S2 R (= those of S1^(1/2) S2 S1^(1/2)); the result is the
    sum of their square roots (``eigvalsh``, round-off negatives clipped to 0). With r = D this is the textbook
    formula; for rank-deficient S1 (fewer images than dimensions) it is cheaper and free of the sqrt(round-off)
    noise that zero eigenvalues would add.
    """
    from scipy.linalg.lapack import dpstrf

    s1 = np.asarray(sigma1, np.float64)
    s2 = np.asarray(sigma2, np.float64)
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    if not np.any(np.diag(s1) > 0):
        return 0.0
    c, piv, rank, info = dpstrf(s1, lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed on the first covariance (LAPACK info {info})")
    r = np.empty((len(s1), rank))
    r[piv - 1] = np.tril(c)[:, :rank]  # S1 = R R^T
    k = r.T @ s2 @ r
    eig = np.linalg.eigvalsh((k + k.T) / 2)
    return float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): mu [D], sigma [D, D]; float64 throughout."""
    check_stats(mu1, sigma1, "first stats")
    check_stats(mu2, sigma2, "second stats", dim=np.shape(mu1)[0])
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return float(value)


class MomentAccumulator:
    """Streams features into float64 sums so mean and covariance never need all features in memory.

    Sums are taken about a shift (the first batch's mean) to avoid cancellation. ``update(x)``: x [B, D];
    ``stats()``: mu [D], sigma [D, D] with the unbiased (N - 1) normalisation of ``np.cov`` / pytorch-fid.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(self.dim, np.float64)
        self._outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got {x.shape}")
        if self._shift is None:
            self._shift = x.mean(axis=0)
        xc = x - self._shift
        self.n += x.shape[0]
        self._sum += xc.sum(axis=0)
        self._outer += xc.T @ xc

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mean_c = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(mean_c, mean_c)) / (self.n - 1)
        return self._shift + mean_c, (sigma + sigma.T) / 2


def save_stats(path: str, stats: FeatureStats) -> None:
    """Writes pytorch-fid's ``.npz`` (``mu``, ``sigma``) plus ``num_images`` and ``meta`` (JSON string)."""
    check_stats(stats.mu, stats.sigma, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = {}
    if stats.num_images is not None:
        extra["num_images"] = np.int64(stats.num_images)
    if stats.meta is not None:
        extra["meta"] = np.asarray(json.dumps(dict(stats.meta), sort_keys=True))
    with open(path, "wb") as f:  # an open file keeps numpy from appending ".npz" to the name
        np.savez(f, mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64), **extra)


def load_stats(path: str, dim: int | None = None) -> FeatureStats:
    """Reads a pytorch-fid / lidiff stats ``.npz``; raises ValueError naming what is wrong with it."""
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} holds {sorted(f.files)}, not the stats keys 'mu' and 'sigma'")
        mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
        num = int(f["num_images"]) if "num_images" in f else None
        meta = json.loads(str(f["meta"])) if "meta" in f else None
    check_stats(mu, sigma, path, dim)
    return FeatureStats(mu, sigma, num, meta)
