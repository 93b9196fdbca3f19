"""Inception features of image streams: jitted, sharded over a 1-D device mesh, accumulated without keeping images.

``InceptionExtractor`` runs the FID Inception on uint8 batches: the batch is padded to a fixed size (a multiple of
the device count), split over the ``"data"`` axis of ``lidiff.parallel.make_mesh()``, and the pool3 features and
unbiased logits come back to the host. ``extract`` streams a source through it: float64 moment sums for mu/sigma,
a uniform random subset of at most ``keep`` pool3 rows (for precision/recall and KID) and every row's logits
(4 KB an image, for the Inception Score). ``fid_of_images`` is the pure entry for in-training evaluation.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Iterator, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from lidiff import parallel
from lidiff.metrics.fid import FeatureStats, MomentAccumulator, frechet_distance
from lidiff.models.inception import NUM_FEATURES, feature_fn


@functools.lru_cache(maxsize=8)
def _jitted(mesh: jax.sharding.Mesh, precision: Any):
    """One jitted feature function per mesh (shared by every extractor on that mesh, so compiles are reused)."""

    def run(variables, images):
        out = feature_fn(variables, images, precision)
        return out["pool3"], out["logits_unbiased"]

    batch = parallel.batch_sharded(mesh)
    return jax.jit(run, in_shardings=(parallel.replicated(mesh), batch), out_shardings=(batch, batch))


class InceptionExtractor:
    """uint8 [b, H, W, 3] -> (pool3 float32 [b, 2048], unbiased logits float32 [b, 1008]) on every device of ``mesh``.

    Args:
      variables: FID Inception variables (``{"params", "batch_stats"}``).
      mesh: a 1-D ``("data",)`` mesh (default: all devices); the batch is split over it.
      batch_size: images per device call, rounded up to a multiple of the device count; smaller batches are
        zero-padded, so each image size compiles once.
      precision: conv/matmul precision (HIGHEST: full float32 on accelerators too).

    Single-process: batches are host arrays placed with ``jax.device_put``; a multi-host run would build the
    global batch with ``lidiff.parallel.global_batch`` from each process's share instead.
    """

    def __init__(self, variables: Any, mesh: jax.sharding.Mesh | None = None, batch_size: int = 64,
                 precision: Any = jax.lax.Precision.HIGHEST):
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        n = self.mesh.devices.size
        self.batch_size = -(-int(batch_size) // n) * n
        self.variables = parallel.put_replicated(variables, self.mesh)
        self._fn = _jitted(self.mesh, precision)
        self._sharding = parallel.batch_sharded(self.mesh)

    def dispatch(self, images: np.ndarray):
        """Starts the features of images [b <= batch_size, H, W, 3] uint8; returns a handle for ``fetch``."""
        b = len(images)
        if b > self.batch_size:
            raise ValueError(f"batch of {b} exceeds the extractor's batch size {self.batch_size}")
        if b < self.batch_size:
            images = np.concatenate([images, np.zeros((self.batch_size - b, *images.shape[1:]), images.dtype)])
        return self._fn(self.variables, jax.device_put(np.ascontiguousarray(images), self._sharding)), b

    @staticmethod
    def fetch(handle) -> tuple[np.ndarray, np.ndarray]:
        (pool, logits), b = handle
        return np.asarray(pool)[:b], np.asarray(logits)[:b]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.fetch(self.dispatch(images))


class Extracted(NamedTuple):
    """What ``extract`` keeps of a stream of N images."""

    stats: FeatureStats  # mu [2048], sigma [2048, 2048] float64, num_images N
    features: np.ndarray  # pool3 float32 [min(N, keep), 2048], a uniform random subset
    logits: np.ndarray  # unbiased logits float32 [N, 1008]


def _rebatch(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Re-cuts a stream of [b, ...] arrays into [size, ...] arrays (the last may be smaller)."""
    buffer, count = [], 0
    for batch in batches:
        buffer.append(batch)
        count += len(batch)
        while count >= size:
            joined = np.concatenate(buffer)
            yield joined[:size]
            buffer, count = [joined[size:]], count - size
    if count:
        yield np.concatenate(buffer)


def extract(source: Any, extractor: InceptionExtractor, keep: int = 10_000, seed: int = 0, progress: bool = True,
            desc: str = "features") -> Extracted:
    """Streams ``source`` (``num_images``, ``batches(batch_size)`` of uint8 [b, H, W, 3]) through the extractor.

    The device works on batch i while the host accumulates batch i - 1. ``keep`` bounds the pool3 rows kept for
    precision/recall and KID (reservoir sampling with ``seed``, so the subset is uniform whatever the order).
    """
    acc = MomentAccumulator(NUM_FEATURES)
    rng = np.random.default_rng(seed)
    kept = np.zeros((min(keep, source.num_images), NUM_FEATURES), np.float32)
    logits, seen = [], 0

    def absorb(handle):
        nonlocal seen
        pool, logit = extractor.fetch(handle)
        acc.update(pool)
        logits.append(logit)
        for row in pool:  # reservoir sampling (Algorithm R)
            j = seen if seen < len(kept) else rng.integers(0, seen + 1)
            if j < len(kept):
                kept[j] = row
            seen += 1

    pending = None
    with tqdm(total=source.num_images, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for images in _rebatch(source.batches(extractor.batch_size), extractor.batch_size):
            handle = extractor.dispatch(images)
            if pending is not None:
                absorb(pending)
            pending = handle
            bar.update(len(images))
        if pending is not None:
            absorb(pending)
    mu, sigma = acc.stats()
    return Extracted(FeatureStats(mu, sigma, acc.n), kept[: min(len(kept), seen)], np.concatenate(logits))


class ArrayImages:
    """An in-memory uint8 [N, H, W, 3] array as an image source."""

    def __init__(self, images: np.ndarray):
        self.images = np.asarray(images)
        self.num_images = len(self.images)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.num_images, batch_size):
            yield self.images[start : start + batch_size]

    def describe(self) -> dict[str, Any]:
        return {"kind": "array", "num_images": self.num_images, "image_size": list(self.images.shape[1:3])}


def fid_of_images(images: np.ndarray, reference: FeatureStats, variables: Any, batch_size: int = 64,
                  mesh: jax.sharding.Mesh | None = None) -> float:
    """FID of images uint8 [N, H, W, 3] against reference statistics, with the given Inception variables.

    For in-training evaluation: no files, no logging, no progress bar. N >= 2 (FID is biased for N < 2048).
    """
    extractor = InceptionExtractor(variables, mesh, batch_size)
    ours = extract(ArrayImages(images), extractor, keep=0, progress=False)
    return frechet_distance(ours.stats.mu, ours.stats.sigma, reference.mu, reference.sigma)
