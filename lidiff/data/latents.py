"""A cache of first-stage latents: encode the dataset once, then train stage 2 without the encoder.

The cache is one ``.npz`` file holding, for every source index ``i`` (row ``i``):

- KL first stages: ``mean`` and ``logvar`` [N, h, w, c] float32 (the posterior), so every epoch can draw a fresh
  sample ``mean + exp(logvar / 2) * noise`` exactly as training from images does;
- VQ first stages: ``latent`` [N, h, w, c] float32 (the pre-quantisation encoder output);
- ``label`` [N] int32 when the source has labels.

``CachedLatentLoader`` visits rows in the same seeded order as ``DataLoader`` (``epoch_permutation``), so a
resumed run continues exactly where it stopped. Images are cached without flips: the cache refuses
``random_flip`` rather than silently dropping it.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
from absl import logging

from lidiff.data import transforms
from lidiff.data.pipeline import epoch_permutation
from lidiff.data.sources import Source
from lidiff.errors import DataError, MissingInputError

Batch = Dict[str, np.ndarray]


def _load_image(source: Source, index: int, resolution: int) -> Tuple[Optional[np.ndarray], Optional[int]]:
    example = source[index]
    if example is None:
        return None, None
    image = transforms.to_float(transforms.resize_center_crop(example["image"], resolution))
    return image, example.get("label")


def build_latent_cache(
    source: Source,
    encode: Callable[[np.ndarray], Dict[str, np.ndarray]],
    path: str,
    *,
    resolution: int,
    batch_size: int,
) -> str:
    """Encodes every example of ``source`` in index order and writes the cache to ``path`` atomically.

    Args:
      source: random-access image source.
      encode: images [batch_size, R, R, 3] float32 in [-1, 1] -> {name: [batch_size, h, w, c]} (e.g. ``mean`` and
        ``logvar``, or ``latent``), as host numpy arrays; it runs the first stage on the devices.
      path: the ``.npz`` to write (a temporary file is renamed into place when complete).
      resolution: image size fed to the encoder.
      batch_size: images per ``encode`` call; the last batch is padded by repetition.

    Unreadable examples are replaced by the previous readable one (logged), so rows stay aligned with indices.
    """
    n = len(source)
    arrays: Dict[str, list] = {}
    labels: list = []
    last_good: Optional[Tuple[np.ndarray, Optional[int]]] = None
    skipped = 0
    for start in range(0, n, batch_size):
        images, batch_labels = [], []
        for index in range(start, min(start + batch_size, n)):
            image, label = _load_image(source, index, resolution)
            if image is None:
                skipped += 1
                logging.warning("latent cache: unreadable example %s replaced by the previous one",
                                source.describe(index))
                if last_good is None:
                    raise DataError(f"latent cache: the first example {source.describe(index)} is unreadable")
                image, label = last_good
            last_good = (image, label)
            images.append(image)
            batch_labels.append(label)
        count = len(images)
        images += [images[-1]] * (batch_size - count)
        encoded = encode(np.stack(images))
        for name, value in encoded.items():
            arrays.setdefault(name, []).append(np.asarray(value)[:count])
        labels += batch_labels
        logging.log_every_n_seconds(logging.INFO, "latent cache: %d / %d examples encoded", 30, start + count, n)
    out = {name: np.concatenate(chunks).astype(np.float32) for name, chunks in arrays.items()}
    if labels and labels[0] is not None:
        out["label"] = np.asarray(labels, np.int32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)
    logging.info("latent cache: wrote %d examples (%d unreadable replaced) to %s", n, skipped, path)
    return path


class CachedLatentLoader:
    """Batches of cached latents in the seeded order of ``DataLoader``; this process's share only.

    ``iterate(start_step)`` yields ``(step, batch)`` with the cache's arrays for the batch rows (e.g. ``mean``,
    ``logvar``, ``label``): [G / P, ...].
    """

    def __init__(self, path: str, *, global_batch_size: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        if not os.path.exists(path):
            raise MissingInputError(f"latent cache {path} does not exist; build it with build_latent_cache")
        with np.load(path) as data:
            self.arrays = {name: data[name] for name in data.files}
        self.size = len(next(iter(self.arrays.values())))
        if global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} does not divide over {process_count} processes")
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed = seed
        self.process_index = process_index
        self.num_skipped = 0

    @property
    def has_labels(self) -> bool:
        return "label" in self.arrays

    def rows(self, step: int) -> np.ndarray:
        """Cache rows of this process's share of global batch ``step``: int64 [G / P]."""
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        positions = np.arange(start, start + self.local_batch_size)
        epochs, offsets = np.divmod(positions, self.size)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = epoch_permutation(self.seed, int(epoch), self.size)[offsets[sel]]
        return out

    def batch_at(self, step: int) -> Batch:
        rows = self.rows(step)
        return {name: value[rows] for name, value in self.arrays.items()}

    def iterate(self, start_step: int = 0) -> Iterator[Tuple[int, Batch]]:
        step = start_step
        while True:
            yield step, self.batch_at(step)
            step += 1

    def close(self) -> None:
        pass
