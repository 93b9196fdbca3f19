"""Deterministic, resumable, per-process batching of a random-access source.

The data position is the training step. With N examples, global batch G and P processes:

- epoch e visits the examples in the order ``permutation_e = permutation(N)`` drawn from (seed, e);
- the epochs are concatenated into one stream; global batch s is stream positions ``[s*G, (s+1)*G)``;
- process p loads only rows ``[p*G/P, (p+1)*G/P)`` of each global batch;
- row r of step s is flipped (when ``random_flip``) by a coin drawn from (seed, s) for all G rows at once.

So batch s depends on (seed, s) alone: ``iterate(start_step=k)`` resumes exactly where an uninterrupted run would
be, and the P per-process batches of a step, stacked in process order, are the 1-process batch.

Besides the image, each row holds the arrays of the loader's ``fields`` (``lidiff.data.fields``): class labels,
caption token ids, layout boxes; each field declares its batch keys with per-row shapes and dtypes, so every batch
has fixed shapes. Fields see the example before it is resized, with the same crop and flip as the image.

An unusable example (the source returns None: unreadable; or a field returns a reason, e.g. "no caption") is
replaced by the next usable one in the stream (positions p+1, p+2, ...), which keeps shapes fixed and stays
deterministic; each bad example is counted in ``num_skipped`` and logged once with its reason. The loader stops
with an error when no usable example is found in ``MAX_CONSECUTIVE_BAD`` consecutive positions, or when more than
``max_skip_fraction`` of all reads failed.

Decoding and transforms run in a thread pool (PIL releases the GIL); ``prefetch`` batches are loaded ahead of
the one being consumed. Use the loader as a context manager or call ``close()``.
"""

from __future__ import annotations

import collections
import threading
from concurrent import futures
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from absl import logging

from lidiff.data import transforms
from lidiff.data.fields import Field, FieldValues, check_fields, default_fields
from lidiff.data.sources import Example, Source
from lidiff.errors import DataError

Batch = Dict[str, np.ndarray]

MAX_CONSECUTIVE_BAD = 64  # unusable examples in a row (in stream order) before giving up
_MIN_READS_FOR_FRACTION = 32  # reads before ``max_skip_fraction`` is enforced

_PERMUTATION_STREAM, _FLIP_STREAM = 0, 1

UNREADABLE = "unreadable"  # the reason recorded when the source returns None


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: int64 ``[size]``, a permutation of ``range(size)`` from (seed, epoch)."""
    return np.random.default_rng([seed, _PERMUTATION_STREAM, epoch]).permutation(size)


def flip_decisions(seed: int, step: int, global_batch_size: int) -> np.ndarray:
    """bool ``[global_batch_size]``: whether each row of global batch ``step`` is mirrored (probability 1/2)."""
    return np.random.default_rng([seed, _FLIP_STREAM, step]).random(global_batch_size) < 0.5


def prepare_example(
    example: Optional[Example],
    fields: Sequence[Field],
    resolution: int,
    flip: bool = False,
    resample: transforms.Resample = "bicubic",
) -> Union[Tuple[np.ndarray, FieldValues], str]:
    """One example as a training row: ``(image float32 [R, R, 3] in [-1, 1], {key: array})``, or the reason it
    cannot be used (``"unreadable"`` for None, else the first field's reason string).

    The image is resized (smaller side to R) and centre-cropped, then mirrored when ``flip``; every field sees the
    original (H, W) and the same R and flip. Field values are checked against their specs (ValueError naming the
    field and key).
    """
    if example is None:
        return UNREADABLE
    image = transforms.ensure_rgb_uint8(example["image"])
    image_hw = (int(image.shape[0]), int(image.shape[1]))
    values: FieldValues = {}
    for field in fields:
        out = field(example, image_hw, resolution, flip)
        if isinstance(out, str):
            return out
        for key, (shape, dtype) in field.specs.items():
            value = np.asarray(out[key]) if key in out else None
            if value is None or value.shape != shape:
                got = "nothing" if value is None else f"shape {value.shape}"
                raise ValueError(f"{field!r} returned {got} for {key!r}; its spec is shape {shape}, {dtype}.")
            values[key] = value.astype(dtype, copy=False)
    image = transforms.resize_center_crop(image, resolution, resample)
    if flip:
        image = transforms.hflip(image)
    return transforms.to_float(image), values


class _Inline:
    """A finished-on-demand stand-in for a Future, used when ``num_threads == 0``."""

    def __init__(self, fn, *args):
        self._fn, self._args = fn, args

    def result(self):
        return self._fn(*self._args)

    def cancel(self):
        return True


class DataLoader:
    """Batches of ``source`` for this process, float32 images in [-1, 1] at ``resolution`` (see module docstring).

    Args:
      source: a random-access source (``lidiff.data.sources``).
      global_batch_size: G, examples per step over all processes; must be divisible by ``process_count``.
      resolution: R, output side (resize smaller side + centre crop).
      random_flip: mirror rows left-right with probability 1/2, deterministically from (seed, step, row).
      seed: non-negative int; fixes the epoch orders and flips.
      process_index / process_count: this process's share of each global batch.
      num_threads: decoding threads (0: decode in the calling thread).
      prefetch: batches loaded ahead of the one being consumed.
      resample: PIL filter name for resizing (see ``transforms.resample_filter``).
      max_skip_fraction: fail when more than this fraction of reads were unusable (after 32 reads).
      fields: what each row holds besides the image (``lidiff.data.fields``, e.g. ``fields_for("text", ...)``);
        None: ``[LabelField()]`` when ``source.num_classes`` is not None, else nothing.

    Batches: ``{"image": float32 [G/P, R, R, 3] in [-1, 1], key: [G/P, *shape] dtype for each key of each field}``,
    e.g. ``"label": int32 [G/P]``, ``"tokens": int32 [G/P, L]``, ``"boxes": float32 [G/P, K, 4]`` and
    ``"box_labels": int32 [G/P, K]``.
    """

    def __init__(
        self,
        source: Source,
        *,
        global_batch_size: int,
        resolution: int,
        random_flip: bool = False,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        num_threads: int = 4,
        prefetch: int = 2,
        resample: transforms.Resample = "bicubic",
        max_skip_fraction: float = 0.5,
        fields: Optional[Sequence[Field]] = None,
    ):
        if len(source) == 0:
            raise ValueError(f"The data source {type(source).__name__} is empty.")
        if global_batch_size <= 0 or resolution <= 0:
            raise ValueError(
                f"global_batch_size and resolution must be positive, got {global_batch_size}, {resolution}."
            )
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"Need 0 <= process_index < process_count, got {process_index}, {process_count}.")
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by the number of processes "
                f"{process_count}; each process must load the same number of rows."
            )
        if seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}.")
        if num_threads < 0 or prefetch < 0:
            raise ValueError(f"num_threads and prefetch must be >= 0, got {num_threads}, {prefetch}.")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must lie in [0, 1], got {max_skip_fraction}.")
        transforms.resample_filter(resample)  # fail now on an unknown filter name
        self.fields: Tuple[Field, ...] = tuple(default_fields(source) if fields is None else fields)
        self._specs = check_fields(self.fields)

        self.source = source
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.resolution = int(resolution)
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.num_threads, self.prefetch = int(num_threads), int(prefetch)
        self.resample = resample
        self.max_skip_fraction = float(max_skip_fraction)
        self.has_labels = "label" in self._specs  # rows carry class ids

        self.num_skipped = 0  # unusable reads so far (each replaced by a usable example)
        self.num_reads = 0  # all reads so far, usable or not
        self._logged_bad: Dict[int, str] = {}  # source index -> reason, logged once each
        self._perm_cache: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()
        self._perm_lock = threading.Lock()
        self._pool: Optional[futures.ThreadPoolExecutor] = None
        self._closed = False

    @property
    def field_names(self) -> Tuple[str, ...]:
        """The batch keys besides ``"image"``, in field order (e.g. ``("label",)``, ``("boxes", "box_labels")``)."""
        return tuple(self._specs)

    # ----------------------------------------------------------------------------------------------- sizes

    @property
    def dataset_size(self) -> int:
        """N, the number of examples in the source."""
        return len(self.source)

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches per pass over the data, ``max(1, N // G)``; batches straddle epoch boundaries."""
        return max(1, self.dataset_size // self.global_batch_size)

    def epoch_at(self, step: int) -> float:
        """Passes over the data completed before ``step``: ``step * G / N``."""
        return step * self.global_batch_size / self.dataset_size

    # ------------------------------------------------------------------------------------------ positions

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._perm_lock:
            perm = self._perm_cache.get(epoch)
            if perm is None:
                perm = epoch_permutation(self.seed, epoch, self.dataset_size)
                self._perm_cache[epoch] = perm
                while len(self._perm_cache) > 3:
                    self._perm_cache.popitem(last=False)
            return perm

    def index_at(self, position: int) -> int:
        """Source index at stream position ``position`` (epoch ``position // N``, offset ``position % N``)."""
        epoch, offset = divmod(int(position), self.dataset_size)
        return int(self._permutation(epoch)[offset])

    def local_positions(self, step: int) -> np.ndarray:
        """int64 ``[G/P]``: the stream positions of this process's rows of global batch ``step``."""
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        return np.arange(start, start + self.local_batch_size, dtype=np.int64)

    def local_flips(self, step: int) -> np.ndarray:
        """bool ``[G/P]``: flip decisions of this process's rows of ``step`` (all False without random_flip)."""
        if not self.random_flip:
            return np.zeros(self.local_batch_size, dtype=bool)
        rows = flip_decisions(self.seed, step, self.global_batch_size)
        start = self.process_index * self.local_batch_size
        return rows[start : start + self.local_batch_size]

    # ------------------------------------------------------------------------------------------- loading

    def _load_row(self, position: int, flip: bool, batch: Batch, row: int) -> List[Tuple[int, str]]:
        """Load the example at ``position`` (or the next usable one) into row ``row`` of every array of ``batch``;
        returns ``(source index, reason)`` of the unusable examples passed on the way."""
        bad: List[Tuple[int, str]] = []
        tries = min(self.dataset_size, MAX_CONSECUTIVE_BAD)
        for k in range(tries):
            index = self.index_at(position + k)
            prepared = prepare_example(self.source[index], self.fields, self.resolution, flip, self.resample)
            if not isinstance(prepared, str):
                break
            bad.append((index, prepared))
        else:
            reasons = sorted({reason for _, reason in bad})
            usable = "readable" if reasons == [UNREADABLE] else f"usable ({'; '.join(reasons)})"
            what = (
                f"none of the {tries} examples of the source is {usable}"
                if tries == self.dataset_size
                else f"{tries} consecutive examples (stream positions {position}..{position + tries - 1}) are not "
                f"{usable}"
            )
            raise DataError(
                f"Data loading failed: {what}, e.g. {self.source.describe(bad[0][0])} ({bad[0][1]}). Check that "
                f"the data is where config.data.path points, that the files are images PIL can decode, and that "
                f"the examples carry what the loader's fields need ({', '.join(self._specs) or 'images only'})."
            )
        image, values = prepared
        batch["image"][row] = image
        for key, value in values.items():
            batch[key][row] = value
        return bad

    def _submit(self, step: int):
        """Start loading this process's part of global batch ``step``; returns (batch, row futures)."""
        if self._closed:
            raise RuntimeError("This DataLoader is closed.")
        n, r = self.local_batch_size, self.resolution
        batch: Batch = {"image": np.empty((n, r, r, 3), dtype=np.float32)}
        for key, (shape, dtype) in self._specs.items():
            batch[key] = np.empty((n, *shape), dtype=dtype)
        positions, flips = self.local_positions(step), self.local_flips(step)
        args = [(int(positions[i]), bool(flips[i]), batch, i) for i in range(n)]
        if self.num_threads == 0:
            jobs = [_Inline(self._load_row, *a) for a in args]
        else:
            jobs = [self._get_pool().submit(self._load_row, *a) for a in args]
        return batch, jobs

    def _collect(self, step: int, batch: Batch, jobs) -> Batch:
        """Wait for the rows of ``step``, account for and log unusable examples, and return the batch."""
        for job in jobs:
            bad = job.result()
            self.num_reads += 1 + len(bad)
            self.num_skipped += len(bad)
            for index, reason in bad:
                if index not in self._logged_bad:
                    self._logged_bad[index] = reason
                    logging.warning(
                        "Skipping example %s (%s; step %d); using the next usable example instead. "
                        "%d unusable reads so far.",
                        self.source.describe(index), reason, step, self.num_skipped,
                    )
        if (
            self.num_reads >= _MIN_READS_FOR_FRACTION
            and self.num_skipped > self.max_skip_fraction * self.num_reads
        ):
            first = min(self._logged_bad)
            raise DataError(
                f"Data loading failed: {self.num_skipped} of {self.num_reads} reads were unusable, more than "
                f"max_skip_fraction={self.max_skip_fraction}. Check the files (first bad: "
                f"{self.source.describe(first)}, {self._logged_bad[first]})."
            )
        return batch

    def _get_pool(self) -> futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix="lidiff-data")
        return self._pool

    # ----------------------------------------------------------------------------------------------- API

    def iterate(self, start_step: int = 0, num_steps: Optional[int] = None) -> Iterator[Tuple[int, Batch]]:
        """Yield ``(step, batch)`` for steps ``start_step, start_step + 1, ...`` (``num_steps`` of them, or
        forever). The batch of a step is the same whether iteration started there or earlier."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}.")
        stop = None if num_steps is None else start_step + num_steps
        pending: "collections.deque" = collections.deque()
        next_step = start_step

        def top_up():
            nonlocal next_step
            while len(pending) <= self.prefetch and (stop is None or next_step < stop):
                pending.append((next_step, *self._submit(next_step)))
                next_step += 1

        try:
            while True:
                top_up()
                if not pending:
                    return
                step, batch, jobs = pending.popleft()
                batch = self._collect(step, batch, jobs)
                top_up()
                yield step, batch
        finally:
            for _, _, jobs in pending:
                for job in jobs:
                    job.cancel()

    def batch_at(self, step: int) -> Batch:
        """The batch of ``step`` alone (what ``iterate`` yields for it)."""
        batch, jobs = self._submit(step)
        return self._collect(step, batch, jobs)

    def __iter__(self) -> Iterator[Tuple[int, Batch]]:
        return self.iterate()

    def close(self) -> None:
        """Stop the decoding threads (pending rows are cancelled); the loader cannot be used afterwards."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "DataLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
