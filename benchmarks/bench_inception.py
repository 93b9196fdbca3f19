"""FID Inception throughput, and what ``python -m lidiff.eval`` adds on top of it per 1,000 images.

    python benchmarks/bench_inception.py                                   # CPU-sized: batch 16, 64 images
    python benchmarks/bench_inception.py --batch_size=256 --steps=20 --num_images=5000 --image_size=256  # GPU

1. Features/s: ``lidiff.eval.InceptionExtractor`` (resize to 299 + InceptionV3 to pool3 and logits, jitted, batch
   split over every device) on random uint8 [B, S, S, 3] images; ``--warmup`` untimed calls, then ``--steps``
   timed ones, each waited for by fetching its features to the host; median and mean. Compile time separately.
2. The command: ``lidiff.eval.__main__.run`` on a samples ``.npz`` of ``--num_images`` random images against a
   stats file (so one side is extracted), random Inception weights (the speed is the same as with real ones).
   The command runs on N and on 2N images; wall(N) = fixed + N / (features/s) + N x overhead gives the overhead
   per image (npz reading, padding, host transfers, float64 moment sums, reservoir sampling, the per-image share
   of IS) and the fixed cost per run (weights, compile, FID linear algebra). The FID of two full-rank 2048-d
   Gaussians (what a 50,000-sample run pays once) is timed on its own. On a busy machine the two-run estimate is
   noisier than the overhead itself, so the host-side pipeline is also timed alone: ``extract`` on an ``.npz``
   with a stub in place of the Inception (max(N, 1,000) images).

Random weights, synthetic images; no weights file, no dataset, no TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: make ``lidiff`` importable
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lidiff.eval.__main__ import run  # noqa: E402
from lidiff.eval.features import InceptionExtractor  # noqa: E402
from lidiff.metrics.fid import FeatureStats, frechet_distance, save_stats  # noqa: E402
from lidiff.models.inception import random_inception_variables  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--image_size", type=int, default=64, help="side S of the input images (resized to 299)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num_images", type=int, default=64, help="images for the command-overhead run (0: skip)")
    args = p.parse_args()

    devices = jax.devices()
    print(f"backend {jax.default_backend()}, {len(devices)} device(s): {devices[0].device_kind}; "
          f"load average {os.getloadavg()[0]:.1f}")
    variables = random_inception_variables(0)
    extractor = InceptionExtractor(variables, batch_size=args.batch_size)
    images = np.random.default_rng(0).integers(0, 256, (extractor.batch_size, args.image_size, args.image_size, 3),
                                               dtype=np.uint8)
    t = time.perf_counter()
    extractor(images)
    compile_s = time.perf_counter() - t
    for _ in range(args.warmup):
        extractor(images)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        extractor(images)
        times.append(time.perf_counter() - t)
    med, mean = statistics.median(times), statistics.mean(times)
    rate = extractor.batch_size / mean
    print("\n| input | batch | devices | first call (compile) | step median / mean | features/s |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.image_size}x{args.image_size} uint8 -> 299 | {extractor.batch_size} | {len(devices)} | "
          f"{compile_s:.1f} s | {med * 1e3:.0f} / {mean * 1e3:.0f} ms | {rate:.1f} |")

    if args.num_images <= 0:
        return
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4096, 2048)) * 0.3
    sigma = a.T @ a / 4096  # a full-rank reference covariance, as from >= 2048 images
    t = time.perf_counter()
    frechet_distance(np.zeros(2048), sigma, np.full(2048, 0.01), sigma * 1.1)
    fid_full_s = time.perf_counter() - t

    def command(n: int, tmp: str) -> float:
        npz = os.path.join(tmp, f"samples{n}.npz")
        np.savez(npz, images=rng.integers(0, 256, (n, args.image_size, args.image_size, 3), dtype=np.uint8))
        argv = ["--samples", npz, "--reference", os.path.join(tmp, "ref.npz"), "--batch_size", str(args.batch_size),
                "--no_progress", "--allow_random_inception", "--inception_weights", os.path.join(tmp, "none")]
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            run(argv)
        return time.perf_counter() - t

    n = args.num_images
    with tempfile.TemporaryDirectory() as tmp:
        save_stats(os.path.join(tmp, "ref.npz"), FeatureStats(np.zeros(2048), sigma, 4096))
        wall1, wall2 = command(n, tmp), command(2 * n, tmp)
    # wall(N) = fixed + N / rate + N * overhead: two runs give the per-image overhead and the fixed cost
    per_image = ((wall2 - 2 * n / rate) - (wall1 - n / rate)) / n
    fixed = wall1 - n / rate - n * per_image
    print("\n| images | command wall | Inception share (N / features/s) | overhead per 1,000 images | fixed per run |")
    print("|---|---|---|---|---|")
    print(f"| {n} | {wall1:.1f} s | {n / rate:.1f} s | {per_image * 1000:.1f} s | {fixed:.1f} s |")
    print(f"| {2 * n} | {wall2:.1f} s | {2 * n / rate:.1f} s | | |")
    print(f"\nFID of two full-rank 2048-d Gaussians (float64 linear algebra, once per run at N >= 2048): "
          f"{fid_full_s:.2f} s")
    host = host_pipeline_seconds(max(n, 1000), args.image_size, extractor.batch_size)
    print(f"host-side pipeline without the Inception (npz streaming, padding, moment sums, reservoir, logits), "
          f"{extractor.batch_size}-image batches: {host * 1000:.1f} s per 1,000 images")


class _StubExtractor:
    """Stands in for the Inception: returns fixed features at once, so only the host-side pipeline is timed."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        rng = np.random.default_rng(2)
        self._out = (rng.standard_normal((batch_size, 2048)).astype(np.float32),
                     rng.standard_normal((batch_size, 1008)).astype(np.float32))

    def dispatch(self, images):
        padded = np.concatenate([images, np.zeros((self.batch_size - len(images), *images.shape[1:]), np.uint8)])
        return padded, len(images)

    def fetch(self, handle):
        return self._out[0][: handle[1]], self._out[1][: handle[1]]


def host_pipeline_seconds(n: int, image_size: int, batch_size: int) -> float:
    """Seconds per image of ``extract`` on an ``.npz`` source with a stub extractor (no device work)."""
    from lidiff.eval.features import extract
    from lidiff.eval.sources import open_input

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.npz")
        np.savez(path, images=np.random.default_rng(3).integers(0, 256, (n, image_size, image_size, 3), np.uint8))
        t = time.perf_counter()
        extract(open_input(path), _StubExtractor(batch_size), progress=False)
        return (time.perf_counter() - t) / n


if __name__ == "__main__":
    main()
