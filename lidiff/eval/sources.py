"""What ``python -m lidiff.eval`` can score: image sources (streamed as uint8 batches) and precomputed statistics.

An image source has one interface (``RunSamples`` draws its images from a trained run directory)::

    source.num_images            N, the number of images it will yield (after --num_samples capping)
    source.batches(batch_size)   an iterator of uint8 [b, H, W, 3] numpy arrays, b <= batch_size, N rows in all
    source.describe()            a JSON-ready dict: kind, path, N, image size, preprocessing, sampler settings...

A reference may instead be precomputed: ``StatsInput`` (pytorch-fid ``mu``/``sigma``) or ``ActivationsInput``
(an ADM-style ``arr_0`` of pool3 activations [N, 2048]). ``open_input`` decides which kind a path is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any, Iterator

import numpy as np

from lidiff.eval.errors import EvalInputError
from lidiff.metrics.fid import FeatureStats, load_stats
from lidiff.models.inception import NUM_FEATURES

_SETTING_KEYS = ("sampler", "steps", "eta", "guidance_scale", "step", "checkpoint_step", "seed", "ema")


def _check_images(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    """Refuses anything but uint8 images [N, H, W, 3] (or 1 channel)."""
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise EvalInputError(f"{where}: images must be [N, H, W, 3] (or 1 channel), got shape {tuple(shape)}")
    if dtype != np.uint8:
        raise EvalInputError(f"{where}: images must be uint8 0..255, got {dtype}")


def _rgb(batch: np.ndarray) -> np.ndarray:
    return np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch


def _npz_member(path: str, key: str):
    """Opens ``key`` of an ``.npz`` without reading it: (zip, file object positioned at the data, shape, dtype)."""
    import zipfile

    zf = zipfile.ZipFile(path)
    try:
        f = zf.open(f"{key}.npy")
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except Exception:
        zf.close()
        raise
    if fortran or dtype.hasobject:
        zf.close()
        raise EvalInputError(f"{path}[{key!r}] is stored in Fortran order or as objects; save it with np.savez")
    return zf, f, shape, dtype


class NpzImages:
    """Images stored in an ``.npz`` under ``key`` (``images`` as sample.py writes, or ADM's ``arr_0``).

    Rows are streamed from the zip member batch by batch (compressed or not), so the array never has to fit in
    memory. Scalar entries named like sampler settings (``sampler``, ``steps``, ``eta``, ``guidance_scale``,
    ``step``...) are reported in ``describe()``.
    """

    def __init__(self, path: str, key: str, limit: int | None = None):
        self.path, self.key = path, key
        zf, f, shape, dtype = _npz_member(path, key)
        zf.close()
        _check_images(shape, dtype, f"{path}[{key!r}]")
        with np.load(path, allow_pickle=False) as npz:
            self.settings = {k: npz[k].item() for k in npz.files if k in _SETTING_KEYS and npz[k].ndim == 0}
        self.shape = shape
        self.num_images = min(shape[0], limit) if limit else shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        zf, f, shape, dtype = _npz_member(self.path, self.key)
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        try:
            for start in range(0, self.num_images, batch_size):
                n = min(batch_size, self.num_images - start)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise EvalInputError(f"{self.path}[{self.key!r}] is truncated at image {start}")
                yield _rgb(np.frombuffer(data, dtype).reshape(n, *shape[1:]))
        finally:
            zf.close()

    def describe(self) -> dict[str, Any]:
        kind = "samples npz" if self.key == "images" else "ADM reference batch (arr_0 images)"
        return {"kind": kind, "path": self.path, "num_images": self.num_images, "available": int(self.shape[0]),
                "image_size": list(self.shape[1:3]), "sampler_settings": self.settings or None,
                "checkpoint_step": self.settings.get("step", self.settings.get("checkpoint_step"))}


class FolderImages:
    """Every jpg/png/webp under a folder (recursive, sorted), read through ``lidiff.data.sources``; all the same size.

    Images are not resized here (only the Inception's own 299 resize applies); mixed sizes are refused.
    """

    def __init__(self, path: str, limit: int | None = None):
        from lidiff.data.sources import make_source

        try:
            self.source = make_source("folder", path=path)
        except (ValueError, OSError) as e:
            raise EvalInputError(f"cannot read the image folder {path}: {e}") from None
        if len(self.source) == 0:
            raise EvalInputError(f"{path} holds no jpg/png/webp images")
        self.path = path
        self.num_images = min(len(self.source), limit) if limit else len(self.source)
        first = self._read(0)
        self.image_size = first.shape[:2]

    def _read(self, i: int) -> np.ndarray:
        example = self.source[i]
        if example is None:
            raise EvalInputError(f"cannot decode {self.source.describe(i)}; remove it or fix it")
        return example["image"]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.num_images, batch_size):
            images = []
            for i in range(start, min(start + batch_size, self.num_images)):
                image = self._read(i)
                if image.shape[:2] != self.image_size:
                    raise EvalInputError(
                        f"images in {self.path} have mixed sizes: {self.source.describe(i)} is "
                        f"{image.shape[1]}x{image.shape[0]}, the first image {self.source.describe(0)} is "
                        f"{self.image_size[1]}x{self.image_size[0]} (width x height). Bring them to one size with "
                        "the same resize used for training, or evaluate a dataset config instead."
                    )
                images.append(image)
            yield np.stack(images)

    def describe(self) -> dict[str, Any]:
        return {"kind": "image folder", "path": self.path, "num_images": self.num_images,
                "available": len(self.source), "image_size": list(self.image_size)}


def load_config(spec: str):
    """``configs/x.py`` or ``configs/x.py:arg`` -> the ConfigDict from its ``get_config([arg])``."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise EvalInputError(f"no such config file: {path}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # the folder holding the `configs` package
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_lidiff_eval_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise EvalInputError(f"{path} has no get_config(); it is not a lidiff config")
    return module.get_config(arg) if arg else module.get_config()


class DatasetImages:
    """A dataset through lidiff's training data pipeline (``make_loader(config.data, ...)``): the same source,
    smaller-side resize and centre crop to ``data.resolution`` as training, without random flips.

    The first ``limit`` (default: all) images of the loader's seeded epoch-0 order, each image once.
    """

    def __init__(self, spec: str, limit: int | None = None, seed: int = 0):
        config = load_config(spec)
        self.spec, self.seed = spec, seed
        self.data = config.data.copy_and_resolve_references()
        self.data.unlock()
        self.data.random_flip = False
        self.data.num_threads = min(int(self.data.num_threads), 4)
        probe = self._loader(1)
        self.available = probe.dataset_size
        probe.close()
        self.num_images = min(self.available, limit) if limit else self.available

    def _loader(self, batch_size: int):
        from lidiff.train.common import make_loader

        try:
            return make_loader(self.data, batch_size, self.seed)
        except (ValueError, OSError, RuntimeError, ImportError) as e:
            raise EvalInputError(f"cannot load the dataset of {self.spec}: {e}") from None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        from lidiff.data.transforms import to_uint8

        loader = self._loader(batch_size)
        steps = -(-self.num_images // batch_size)
        try:
            done = 0
            for _, batch in loader.iterate(0, steps):
                take = min(batch_size, self.num_images - done)
                done += take
                yield to_uint8(batch["image"][:take])
        finally:
            loader.close()

    def describe(self) -> dict[str, Any]:
        d = self.data
        return {"kind": "dataset config", "path": self.spec, "num_images": self.num_images, "available": self.available,
                "image_size": [int(d.resolution)] * 2,
                "data": {"source": d.source, "path": d.path or None, "tfds_name": d.tfds_name or None,
                         "split": d.split, "seed": self.seed, "order": "epoch-0 permutation of the loader"},
                "dataset_preprocessing": f"lidiff data pipeline: PIL bicubic resize of the smaller side to "
                                         f"{d.resolution}, centre crop {d.resolution}x{d.resolution}, no flip"}


class StatsInput:
    """Precomputed feature statistics (pytorch-fid ``mu``/``sigma`` npz, or lidiff's with ``meta``)."""

    def __init__(self, path: str):
        try:
            self.stats = load_stats(path, dim=NUM_FEATURES)
        except ValueError as e:
            raise EvalInputError(f"unusable statistics file: {e}") from None
        self.path = path
        self.num_images = self.stats.num_images

    def describe(self) -> dict[str, Any]:
        return {"kind": "statistics (mu, sigma)", "path": self.path, "num_images": self.num_images,
                "recorded_preprocessing": dict(self.stats.meta) if self.stats.meta else "not recorded in the file"}


class ActivationsInput:
    """Precomputed pool3 activations [N, 2048] (an ADM reference batch's ``arr_0`` of float features)."""

    def __init__(self, path: str, key: str, limit: int | None = None):
        with np.load(path, allow_pickle=False) as f:
            acts = np.asarray(f[key], np.float32)
        if acts.ndim != 2 or acts.shape[1] != NUM_FEATURES:
            raise EvalInputError(f"{path}[{key!r}]: activations must be [N, {NUM_FEATURES}], got {acts.shape}")
        self.path, self.features = path, acts[:limit] if limit else acts
        self.num_images = len(self.features)

    def describe(self) -> dict[str, Any]:
        return {"kind": "precomputed activations", "path": self.path, "num_images": self.num_images,
                "recorded_preprocessing": "unknown (computed outside lidiff)"}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a run directory is sampled (the command's sampler flags)."""

    sampler: str = "ddim"
    steps: int = 200
    eta: float = 0.0
    guidance_scale: float = 1.0
    batch_size: int = 16
    checkpoint_step: int | None = None  # default: the latest
    num_samples: int = 50_000


class RunSamples:
    """Images drawn from a trained run directory (EMA params, through ``lidiff.runs``), batch by batch.

    Conditional models sample the classes round-robin (text: the config's ``sample.prompts``; layouts: random or
    the config's layout file; ``lidiff.train.conditioning.sample_inputs``). Batch ``i`` uses the key ``fold_in(seed, i)``,
    so the images do not depend on how many are drawn after them.
    """

    def __init__(self, workdir: str, sampling: Sampling, limit: int | None = None, seed: int = 0):
        from lidiff.runs import load_latent_diffusion

        self.workdir, self.sampling, self.seed = workdir, sampling, seed
        self.model = load_latent_diffusion(workdir, sampling.checkpoint_step)
        self.num_images = min(sampling.num_samples, limit) if limit else sampling.num_samples
        self.image_size = [self.model.config.data.resolution] * 2

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        import jax

        from lidiff.data.transforms import to_uint8
        from lidiff.train.conditioning import sample_inputs

        s, model = self.sampling, self.model
        inputs, _ = sample_inputs(model.config, self.num_images, model.trainer.tokenizer, seed=self.seed)
        steps = None if s.sampler == "ddpm" else s.steps
        key = jax.random.PRNGKey(self.seed)
        for i, start in enumerate(range(0, self.num_images, s.batch_size)):
            n = min(s.batch_size, self.num_images - start)
            images = model.ldm.generate(model.params, model.first_stage_params, model.scale_factor,
                                        jax.random.fold_in(key, i), num=n, latent_shape=model.latent_shape,
                                        inputs={k: v[start:start + n] for k, v in inputs.items()},
                                        sampler=s.sampler, steps=steps, eta=s.eta, guidance_scale=s.guidance_scale)
            yield to_uint8(images)

    def describe(self) -> dict[str, Any]:
        s = self.sampling
        settings = {"sampler": s.sampler, "steps": s.steps if s.sampler != "ddpm" else 0, "eta": s.eta,
                    "guidance_scale": s.guidance_scale, "seed": self.seed, "params": "EMA"}
        return {"kind": "run directory (sampled)", "path": self.workdir, "num_images": self.num_images,
                "image_size": self.image_size, "sampler_settings": settings, "checkpoint_step": self.model.step}


def open_input(spec: str, limit: int | None = None, seed: int = 0, sampling: Sampling | None = None):
    """Decides what ``spec`` is: a run directory (sampled with ``sampling``), a folder, a dataset config
    (``.py``), or an ``.npz`` of images/stats/activations."""
    from lidiff.runs import DIFFUSION, has_stage

    if not spec:
        raise EvalInputError("an input path is empty")
    path = spec.partition(":")[0] if spec.partition(":")[0].endswith(".py") else spec
    if path.endswith(".py"):
        return DatasetImages(spec, limit, seed)
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, DIFFUSION)):
        if not has_stage(path, DIFFUSION):
            raise EvalInputError(f"{path} looks like a run directory but has no stage-2 checkpoint to sample from")
        return RunSamples(path, sampling or Sampling(), limit, seed)
    if os.path.isdir(path):
        return FolderImages(path, limit)
    if not os.path.exists(path):
        raise EvalInputError(f"no such file or folder: {path}")
    if not path.endswith(".npz"):
        raise EvalInputError(
            f"{path}: expected an image folder, an .npz (images / arr_0 / mu+sigma) or a dataset config .py"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files)
            arr0 = f["arr_0"] if "arr_0" in files else None
    except (ValueError, OSError) as e:
        raise EvalInputError(f"cannot read {path} as an .npz: {e}") from None
    if "images" in files:
        return NpzImages(path, "images", limit)
    if arr0 is not None and arr0.ndim == 4:
        return NpzImages(path, "arr_0", limit)
    if arr0 is not None and arr0.ndim == 2:
        return ActivationsInput(path, "arr_0", limit)
    if {"mu", "sigma"} <= files:
        return StatsInput(path)
    raise EvalInputError(
        f"{path} holds {sorted(files)}: expected 'images' uint8 [N,H,W,3] (sample.py), 'mu' and 'sigma' "
        "(pytorch-fid stats), or 'arr_0' images / activations (ADM reference batch)"
    )


def stats_of(inp) -> FeatureStats | None:
    """The precomputed statistics of an input, if it only has statistics."""
    return inp.stats if isinstance(inp, StatsInput) else None
