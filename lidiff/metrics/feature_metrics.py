"""Metrics on Inception features and logits: precision/recall (k-NN manifolds), KID, Inception Score.

- Precision and recall (Kynkäänniemi et al., 2019): each real feature gets a ball whose radius is the distance to
  its k-th nearest other real feature (k = 3); precision is the fraction of generated features inside at least one
  real ball, recall the fraction of real features inside at least one generated ball (radii from generated ones).
- KID (Bińkowski et al., 2018): unbiased MMD^2 with the cubic polynomial kernel (x.y / D + 1)^3, averaged over
  random subsets (torch-fidelity's defaults: 100 subsets of 1,000).
- Inception Score (Salimans et al., 2016): exp(E_x KL(p(y|x) || p(y))) over 10 splits, mean and std.

Nearest-neighbour distances run on the default device in float32 row blocks (features are float32; full-precision
matmuls); KID and IS are host-side numpy in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _sq_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [N, D], b [M, D] -> squared Euclidean distances [N, M] float32 (full-precision matmul, clipped at 0)."""
    ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * ab, 0.0)


def pairwise_sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [N, D], b [M, D] -> squared Euclidean distances [N, M] (float32, on the default device)."""
    return np.asarray(_sq_distances(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))


@functools.partial(jax.jit, static_argnums=2)
def _kth_smallest(block: jax.Array, x: jax.Array, k: int) -> jax.Array:
    return -jax.lax.top_k(-_sq_distances(block, x), k + 1)[0][:, k]  # entry 0 is the point itself


@jax.jit
def _covered(block: jax.Array, centres: jax.Array, radii: jax.Array) -> jax.Array:
    return jnp.sum(jnp.any(_sq_distances(block, centres) <= radii[None, :], axis=1))


def _blocks(x: jax.Array, block: int):
    for start in range(0, x.shape[0], block):
        yield start, x[start : start + block]


def knn_radii(x: np.ndarray, k: int = 3, block: int = 1024) -> np.ndarray:
    """x [N, D] -> squared distance of each point to its k-th nearest other point [N] (self excluded).

    Computed on the default device in row blocks of ``block`` (memory O(block x N)).
    """
    n = len(x)
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {n}")
    xd = jnp.asarray(x, jnp.float32)
    return np.concatenate([np.asarray(_kth_smallest(b, xd, k)) for _, b in _blocks(xd, block)])


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int = 1024) -> float:
    """Fraction of ``points`` [N, D] within radius of at least one of ``centres`` [M, D] (radii: squared, [M])."""
    c, r = jnp.asarray(centres, jnp.float32), jnp.asarray(radii, jnp.float32)
    p = jnp.asarray(points, jnp.float32)
    return sum(int(_covered(b, c, r)) for _, b in _blocks(p, block)) / len(points)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019). real [N, D], fake [M, D] -> (precision, recall)."""
    precision = _coverage(fake, real, knn_radii(real, k))
    recall = _coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID between feature sets a [N, D] and b [M, D] -> (mean, std) of the unbiased MMD^2 over random subsets.

    ``subset_size`` is capped at min(N, M); each subset is drawn without replacement (float64 kernel sums).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(a)} and {len(b)}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        values[i] = (
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return float(values.mean()), float(values.std())


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score from classifier logits [N, C] -> (mean, std) over ``splits`` equal parts (float64)."""
    logits = np.asarray(logits, np.float64)
    n = len(logits)
    if n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {n}")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(logp, splits):
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0))
        scores.append(np.exp(np.mean(np.sum(p * (part - log_py[None, :]), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))
