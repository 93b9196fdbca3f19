"""A cache of first-stage latents: encode the dataset once, then train stage 2 without the encoder.

The cache is one ``.npz`` file holding, for every source index ``i`` (row ``i``):

- the encodings, named by the caller's ``encode`` (KL first stages: ``mean`` and ``logvar`` [N, h, w, c] float32, the
  posterior, so every epoch can draw a fresh sample ``mean + exp(logvar / 2) * noise`` exactly as training from
  images does; VQ first stages: ``mean``, the pre-quantisation encoder output);
- the arrays of every data field (``lidiff.data.fields``), [N, *shape] in the field's dtype: ``label`` [N] int32,
  ``tokens`` [N, L] int32, ``boxes`` [N, K, 4] float32 + ``box_labels`` [N, K] int32, ...;
- ``_fields``: the field batch keys, a str array (so a cache built for one conditioning is recognised as such);
- optionally ``text_embedding`` [N, L, D] float32, a frozen text encoder's output for ``tokens``
  (``add_text_embeddings``).

An unusable example (unreadable, or a field's reason such as "no caption") is replaced in its row by the previous
usable example (the next one for leading rows), image and fields together, so rows stay aligned with indices.

``CachedLatentLoader`` visits rows in the same seeded order as ``DataLoader`` (``epoch_permutation``), so a
resumed run continues exactly where it stopped. Images are cached without flips: the cache refuses
``random_flip`` rather than silently dropping it.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from lidiff.data.fields import Field, FieldValues, check_fields, default_fields
from lidiff.data.pipeline import epoch_permutation, prepare_example
from lidiff.data.sources import Source
from lidiff.errors import DataError, MissingInputError

Batch = Dict[str, np.ndarray]

FIELDS_KEY = "_fields"  # the cache array naming the field keys


def build_latent_cache(
    source: Source,
    encode: Callable[[np.ndarray], Dict[str, np.ndarray]],
    path: str,
    *,
    resolution: int,
    batch_size: int,
    fields: Optional[Sequence[Field]] = None,
) -> str:
    """Encodes every example of ``source`` in index order and writes the cache to ``path`` atomically.

    Args:
      source: random-access image source.
      encode: images [batch_size, R, R, 3] float32 in [-1, 1] -> {name: [batch_size, h, w, c]} (e.g. ``mean`` and
        ``logvar``), as host numpy arrays; it runs the first stage on the devices. Names must differ from the
        field keys.
      path: the ``.npz`` to write (a temporary file is renamed into place when complete).
      resolution: image size fed to the encoder.
      batch_size: images per ``encode`` call; the last batch is padded by repetition.
      fields: what to store per row besides the encodings (as ``DataLoader``); None: ``label`` when
        ``source.num_classes`` is not None, else nothing.

    Unusable examples are replaced by the previous usable one (logged; the first usable one for leading rows), so
    rows stay aligned with indices and the images and fields of a row come from the same example.
    Raises ``DataError`` when no example is usable.
    """
    fields = tuple(default_fields(source) if fields is None else fields)
    specs = check_fields(fields, reserved=(FIELDS_KEY,))
    n = len(source)

    def load(index: int):
        return prepare_example(source[index], fields, resolution)

    def first_usable():
        for index in range(n):
            prepared = load(index)
            if not isinstance(prepared, str):
                return prepared
        raise DataError(f"latent cache: none of the {n} examples of {type(source).__name__} is usable (e.g. "
                        f"{source.describe(0)}: {load(0)}); the fields need {', '.join(specs) or 'images only'}")

    arrays: Dict[str, list] = {}
    values: Dict[str, list] = {key: [] for key in specs}
    last_good: Optional[Tuple[np.ndarray, FieldValues]] = None
    skipped = 0
    for start in range(0, n, batch_size):
        images = []
        for index in range(start, min(start + batch_size, n)):
            prepared = load(index)
            if isinstance(prepared, str):
                skipped += 1
                logging.warning("latent cache: example %s is unusable (%s); its row repeats the %s usable example",
                                source.describe(index), prepared, "previous" if last_good else "first")
                prepared = last_good if last_good is not None else first_usable()
            last_good = prepared
            image, row = prepared
            images.append(image)
            for key in specs:
                values[key].append(row[key])
        count = len(images)
        images += [images[-1]] * (batch_size - count)
        encoded = encode(np.stack(images))
        for name, value in encoded.items():
            arrays.setdefault(name, []).append(np.asarray(value)[:count])
        logging.log_every_n_seconds(logging.INFO, "latent cache: %d / %d examples encoded", 30, start + count, n)
    clash = sorted(set(arrays) & (set(specs) | {FIELDS_KEY}))
    if clash:
        raise ValueError(f"latent cache: encode returned {clash}, names taken by the data fields {list(specs)}")
    out = {name: np.concatenate(chunks).astype(np.float32) for name, chunks in arrays.items()}
    for key, (shape, dtype) in specs.items():
        out[key] = np.stack(values[key]).astype(dtype).reshape((n, *shape))
    out[FIELDS_KEY] = np.asarray(list(specs), dtype=np.str_)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)
    logging.info("latent cache: wrote %d examples (%d unusable replaced), fields %s, to %s", n, skipped,
                 list(specs), path)
    return path


def add_text_embeddings(path: str, embed: Callable[[np.ndarray], np.ndarray], *, batch_size: int,
                        key: str = "text_embedding") -> str:
    """Adds a frozen text encoder's output for every row's ``tokens`` to the cache at ``path`` (rewritten
    atomically); nothing to do when it already holds ``key``.

    embed: tokens [batch_size, L] int32 -> [batch_size, L, D] (host array; it runs the encoder on the devices);
    the last batch is padded by repetition. The cache gains ``key`` [N, L, D] float32, so that training reads the
    encoder's output instead of running it.
    """
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    if key in arrays:
        return path
    if "tokens" not in arrays:
        raise DataError(f"latent cache {path} has no 'tokens' to embed (it holds {sorted(arrays)}): it was built for "
                        "another conditioning. Delete it to rebuild it for the current config.")
    tokens = arrays["tokens"]
    chunks = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        chunks.append(np.asarray(embed(padded), np.float32)[:len(chunk)])
    arrays[key] = np.concatenate(chunks)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    logging.info("latent cache: added the text encoder's output %s %s to %s", key, arrays[key].shape, path)
    return path


class CachedLatentLoader:
    """Batches of cached latents in the seeded order of ``DataLoader``; this process's share only.

    ``iterate(start_step)`` yields ``(step, batch)`` with the cache's arrays for the batch rows (the encodings,
    e.g. ``mean``, ``logvar``, and the field arrays, e.g. ``label``, ``tokens``): [G / P, ...].

    Args:
      required: batch keys the training needs (e.g. ``("mean", "tokens")``); a cache lacking one was built for
        another conditioning or first stage, and is refused with a ``DataError`` naming the key and the path.
    """

    def __init__(self, path: str, *, global_batch_size: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, required: Sequence[str] = ()):
        if not os.path.exists(path):
            raise MissingInputError(f"latent cache {path} does not exist; build it with build_latent_cache")
        with np.load(path) as data:
            self.arrays = {name: data[name] for name in data.files if name != FIELDS_KEY}
            stored = data[FIELDS_KEY].tolist() if FIELDS_KEY in data.files else (
                ["label"] if "label" in data.files else [])  # caches written before fields were recorded
        self.field_names: Tuple[str, ...] = tuple(str(k) for k in stored)
        missing = [key for key in required if key not in self.arrays]
        if missing:
            raise DataError(
                f"latent cache {path} has no {', '.join(repr(k) for k in missing)} (it holds "
                f"{sorted(self.arrays)}): it was built for another conditioning or first stage. Delete it to "
                f"rebuild it for the current config."
            )
        if not self.arrays:
            raise DataError(f"latent cache {path} holds no arrays; delete it to rebuild it")
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
