"""Writers for training scalars and image grids: TensorBoard event files plus plain files.

Every scalar goes to ``<logdir>/metrics.jsonl`` (one JSON object per step, easy to read back) and to a
TensorBoard event file; every image grid to ``<logdir>/images/<name>_<step>.png`` and to TensorBoard.
Event files are written with TensorBoard's protos and record writer, without importing TensorFlow.
Only process 0 writes.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import socket
import time
from typing import Mapping

import jax
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles images into one picture.

    images: [N, H, W, C] uint8 (C in {1, 3}) -> [rows*(H+pad)+pad, ncols*(W+pad)+pad, 3] uint8.
    """
    images = np.asarray(images)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = image
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 [H, W, 3] image to ``path`` atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


class EventFile:
    """Appends TensorBoard ``Event`` protos to a new ``<logdir>/events.out.tfevents.<time>.<host>.<pid>.<n>``.

    Records are framed (length, masked CRC32C) by TensorBoard's own ``RecordWriter``. TensorBoard's
    ``EventFileWriter`` is not used: it opens files through ``tensorboard.compat.tf``, which imports TensorFlow
    whenever TensorFlow is installed (it is, for the tfds extra), and it writes from a background thread.
    Every ``add`` is flushed, so a reader sees each event as soon as it is written.
    """

    _count = itertools.count()

    def __init__(self, logdir: str):
        name = "events.out.tfevents.%010d.%s.%d.%d" % (time.time(), socket.gethostname(), os.getpid(),
                                                       next(EventFile._count))
        self.path = os.path.join(logdir, name)
        self._records = RecordWriter(open(self.path, "xb"))
        self.add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, event: event_pb2.Event) -> None:
        """Writes one ``Event`` and flushes it to the operating system."""
        self._records.write(event.SerializeToString())
        self._records.flush()

    def close(self) -> None:
        """Closes the file; later ``add`` calls raise ``ValueError``."""
        self._records.close()


class MetricWriter:
    """Scalars and images for one training stage, written under ``logdir`` by process 0 only."""

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._active = jax.process_index() == 0
        if not self._active:
            return
        os.makedirs(logdir, exist_ok=True)
        self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")
        self._tb = EventFile(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends ``{"step": step, **scalars}`` to metrics.jsonl and one scalar summary per name to TensorBoard."""
        if not self._active:
            return
        values = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        )
        self._tb.add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """images: {name: uint8 [H, W, 3] picture (e.g. from ``image_grid``)}, saved as
        ``images/<name>_<step:08d>.png`` and as one TensorBoard image summary per name."""
        if not self._active:
            return
        values = []
        for name, image in images.items():
            image = np.asarray(image, np.uint8)
            save_png(os.path.join(self.logdir, "images", f"{name}_{int(step):08d}.png"), image)
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            h, w = image.shape[:2]
            values.append(
                summary_pb2.Summary.Value(
                    tag=name,
                    image=summary_pb2.Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue()),
                )
            )
        self._tb.add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

    def close(self) -> None:
        """Closes metrics.jsonl and the event file (process 0; a no-op elsewhere)."""
        if self._active:
            self._jsonl.close()
            self._tb.close()


def read_metrics(logdir: str) -> list[dict]:
    """Reads back ``metrics.jsonl`` as a list of dicts (for tests and notebooks)."""
    with open(os.path.join(logdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_samples(outdir: str, images: np.ndarray, labels: np.ndarray | None = None, *, write_pngs: bool = True,
                 grid_cols: int | None = None, max_grid: int = 256, settings: Mapping[str, float] | None = None,
                 conditioning: Mapping[str, np.ndarray] | None = None, grid: np.ndarray | None = None) -> str:
    """Writes generated images: ``samples.npz`` (``images`` uint8 [N,H,W,C], ``labels`` [N] if given, each of
    ``conditioning`` as given, e.g. ``prompts`` [N] str or ``boxes`` [N,K,4] and ``box_labels`` [N,K], and each
    of ``settings`` as a scalar, e.g. the sampler and checkpoint step), a grid ``samples_grid.png`` of the first
    ``max_grid`` (or of ``grid``, uint8 [M, H, W, C], when given), and (``write_pngs``) one PNG per image under
    ``images/``.

    Returns the npz path. The npz is written atomically (temp file + rename).
    """
    os.makedirs(outdir, exist_ok=True)
    images = np.asarray(images, np.uint8)
    arrays = {"images": images, **{k: np.asarray(v) for k, v in (settings or {}).items()},
              **{k: np.asarray(v) for k, v in (conditioning or {}).items()}}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int64)
    path = os.path.join(outdir, "samples.npz")
    tmp = os.path.join(outdir, "samples.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    shown = images if grid is None else np.asarray(grid, np.uint8)
    save_png(os.path.join(outdir, "samples_grid.png"), image_grid(shown[:max_grid], ncols=grid_cols))
    if write_pngs:
        for i, image in enumerate(images):
            name = f"{i:06d}" + (f"_class{int(labels[i])}" if labels is not None else "") + ".png"
            save_png(os.path.join(outdir, "images", name), image)
    return path
