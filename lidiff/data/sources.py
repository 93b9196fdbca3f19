"""Random-access image sources: an image folder, a tfds dataset, scikit-learn's digits, and synthetic images.

Every source is a sequence of examples::

    len(source)            number of examples N
    source[i]              {"image": uint8 [H, W, 3] (any H, W), "label": int (only for labelled sources)},
                           or None when example i cannot be read (a corrupt file); the DataLoader skips it
    source.num_classes     number of classes when examples carry "label", else None
    source.describe(i)     a short human-readable name of example i (a file path), for messages

Sources are thread-safe for reading and never resize: ``lidiff.data.transforms`` brings images to the training
resolution. TensorFlow is imported only inside ``TfdsSource``; the folder, digits and synthetic sources need
nothing but numpy and PIL (scikit-learn for digits).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from lidiff.data.transforms import ensure_rgb_uint8

Example = Dict[str, Any]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# What PIL raises for unreadable files: missing/truncated/unidentified files are OSError, some malformed
# PNG/GIF chunks are SyntaxError or ValueError, empty streams EOFError.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class Source:
    """Base class: a sequence of examples with optional integer labels (see the module docstring)."""

    num_classes: Optional[int] = None

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Optional[Example]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"{type(self).__name__}[{index}]"

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        return index % n


class ImageFolderSource(Source):
    """All images under ``path`` (recursively), in sorted order of their relative paths.

    Args:
      path: a folder of .jpg/.jpeg/.png/.webp images, searched recursively (hidden files and folders are skipped,
        symlinked folders are followed). Extensions match case-insensitively.
      extensions: file suffixes to include.
      class_from_subdir: label each image by the index of its first-level subfolder in sorted order (like
        torchvision's ImageFolder); every subfolder must hold images and no image may sit directly in ``path``.

    ``source[i]`` decodes with PIL and converts to RGB: ``{"image": uint8 [H, W, 3]}`` (plus ``"label"``), or None
    for a file PIL cannot read.
    """

    def __init__(
        self,
        path: str,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        class_from_subdir: bool = False,
    ):
        self.path = os.fspath(path)
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        expected = (
            f"a folder of {'/'.join(e.lstrip('.') for e in self.extensions)} images (searched recursively)"
        )
        if not os.path.exists(self.path):
            raise FileNotFoundError(
                f"Image folder {self.path!r} does not exist. Expected {expected}; set config.data.path to it."
            )
        if not os.path.isdir(self.path):
            raise NotADirectoryError(
                f"{self.path!r} is not a folder. Expected {expected}; set config.data.path to it."
            )
        files = []
        for root, dirs, names in os.walk(self.path, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in self.extensions:
                    files.append(os.path.relpath(os.path.join(root, name), self.path))
        if not files:
            raise ValueError(
                f"No images found in {self.path!r}: searched recursively for files ending in "
                f"{', '.join(self.extensions)} (case-insensitive). Expected {expected}."
            )
        # Sort on path components so the order is the same on every OS and file system.
        self.files: Tuple[str, ...] = tuple(sorted(files, key=lambda f: f.split(os.sep)))
        self.classes: Optional[Tuple[str, ...]] = None
        self._labels: Optional[np.ndarray] = None
        if class_from_subdir:
            self._init_classes()

    def _init_classes(self) -> None:
        at_root = [f for f in self.files if os.sep not in f]
        if at_root:
            raise ValueError(
                f"class_from_subdir=True needs every image inside a class subfolder of {self.path!r}, but "
                f"{len(at_root)} sit directly in it (e.g. {at_root[0]!r})."
            )
        classes = sorted(
            d for d in os.listdir(self.path)
            if not d.startswith(".") and os.path.isdir(os.path.join(self.path, d))
        )
        first_level = [f.split(os.sep, 1)[0] for f in self.files]
        empty = sorted(set(classes) - set(first_level))
        if empty:
            raise ValueError(
                f"class_from_subdir=True: class subfolders {empty} of {self.path!r} contain no "
                f"{'/'.join(self.extensions)} images; remove them or add images (labels are subfolder indices)."
            )
        index = {c: i for i, c in enumerate(classes)}
        self.classes = tuple(classes)
        self.num_classes = len(classes)
        self._labels = np.asarray([index[d] for d in first_level], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return os.path.join(self.path, self.files[self._check_index(index)])

    def __getitem__(self, index: int) -> Optional[Example]:
        index = self._check_index(index)
        try:
            with Image.open(os.path.join(self.path, self.files[index])) as img:
                image = np.asarray(img.convert("RGB"))
        except _DECODE_ERRORS:
            return None
        example: Example = {"image": image}
        if self._labels is not None:
            example["label"] = int(self._labels[index])
        return example


class TfdsSource(Source):
    """A TensorFlow Datasets split read by random access (ArrayRecord files, ``builder.as_data_source``).

    Args:
      name: tfds name, optionally with config/version (``"celeb_a_hq/256"``).
      split: split expression (``"train"``, ``"train[:90%]"``).
      data_dir: tfds data dir (tfds default ``~/tensorflow_datasets`` when None).
      manual_dir: where manually downloaded files lie, for datasets that need them (celeb_a_hq); default
        ``<data_dir>/downloads/manual``.
      image_key / label_key: feature names of the image and (optionally) of an integer label.
      prepare: if the dataset is not prepared in ``data_dir``, run ``download_and_prepare`` into ArrayRecord
        files. No network is assumed: datasets that need manual files are checked first and stop with the
        dataset's own instructions and the folder to put the files in; other downloads fail with a message
        saying to prepare elsewhere and copy the folder. With ``prepare=False`` an unprepared dataset raises.

    Examples: ``{"image": uint8 [H, W, 3]}`` plus ``"label": int`` when ``label_key`` is given.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: Optional[str] = None,
        manual_dir: Optional[str] = None,
        image_key: str = "image",
        label_key: Optional[str] = None,
        prepare: bool = True,
    ):
        try:
            import tensorflow_datasets as tfds  # lazy: only this source needs TensorFlow
        except ImportError as e:
            raise ImportError(
                "TfdsSource needs tensorflow-datasets (and tensorflow-cpu): pip install tensorflow-datasets "
                "tensorflow-cpu. Folder, digits and synthetic sources work without them."
            ) from e
        self.name, self.split = name, split
        self.image_key, self.label_key = image_key, label_key
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            self._prepare(tfds, builder, manual_dir, prepare)
        try:
            self._data = builder.as_data_source(split=split)
        except NotImplementedError as e:
            raise ValueError(
                f"tfds dataset {name!r} at {builder.data_dir} is not stored in a random-access format, which "
                f"TfdsSource needs. Re-prepare it with file_format='array_record' in a fresh data_dir. ({e})"
            ) from e
        features = builder.info.features
        for key in (image_key, label_key):
            if key is not None and key not in features:
                raise KeyError(f"tfds dataset {name!r} has no feature {key!r}; features: {list(features.keys())}")
        self.num_classes = None
        if label_key is not None:
            self.num_classes = getattr(features[label_key], "num_classes", None)
            if self.num_classes is None:
                raise ValueError(f"Feature {label_key!r} of tfds dataset {name!r} is not a ClassLabel.")

    @staticmethod
    def _prepare(tfds, builder, manual_dir: Optional[str], prepare: bool) -> None:
        name, where = builder.info.full_name, builder.data_dir_root
        if not prepare:
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared in {str(where)!r}; pass prepare=True to build it, or "
                f"point data_dir at a folder where it was prepared (file_format='array_record')."
            )
        if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
            manual = os.fspath(manual_dir or os.path.join(os.fspath(where), "downloads", "manual"))
            if not os.path.isdir(manual) or not os.listdir(manual):
                raise FileNotFoundError(
                    f"tfds dataset {name!r} is not prepared and needs files downloaded by hand, which are missing "
                    f"from manual_dir {manual!r} (this machine has no network). Place the files there, then "
                    f"run again and it will be prepared into {str(where)!r}; or prepare it on another machine "
                    f"with file_format='array_record' and copy the data_dir here. The dataset's instructions:\n"
                    f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}"
                )
        config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        try:
            builder.download_and_prepare(download_config=config, file_format="array_record")
        except Exception as e:  # re-raised with context; the original stays chained
            raise RuntimeError(
                f"Could not prepare tfds dataset {name!r} into {str(where)!r}: {type(e).__name__}: {e}. "
                f"Without network access, prepare it elsewhere (file_format='array_record') and copy the "
                f"data_dir here."
            ) from e

    def __len__(self) -> int:
        return len(self._data)

    def describe(self, index: int) -> str:
        return f"tfds {self.name}/{self.split}[{index}]"

    def __getitem__(self, index: int) -> Optional[Example]:
        record = self._data[self._check_index(index)]
        example: Example = {"image": ensure_rgb_uint8(record[self.image_key])}
        if self.label_key is not None:
            example["label"] = int(record[self.label_key])
        return example


class DigitsSource(Source):
    """scikit-learn's bundled ``load_digits()``: 1797 8x8 handwritten digits, labels 0..9.

    Grey levels 0..16 are scaled to uint8 ``round(v * 255 / 16)`` and repeated to RGB: ``{"image": uint8
    [8, 8, 3], "label": int}``; ``resize_center_crop`` upscales them to the training resolution.
    """

    num_classes = 10

    def __init__(self):
        from sklearn.datasets import load_digits  # lazy: only this source needs scikit-learn

        digits = load_digits()
        grey = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
        self.images = np.repeat(grey[..., None], 3, axis=-1)  # [N, 8, 8, 3]
        self.labels = digits.target.astype(np.int64)  # [N]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Example:
        index = self._check_index(index)
        return {"image": self.images[index], "label": int(self.labels[index])}


class SyntheticSource(Source):
    """Deterministic smooth random images for benchmarks and tests; no I/O.

    Example i depends only on (seed, i): a two-colour linear gradient plus three Gaussian blobs,
    ``{"image": uint8 [R, R, 3]}``. With ``num_classes`` each example also has ``"label"`` in
    ``[0, num_classes)``, and the gradient's first colour is a per-class colour, so labels carry signal.
    """

    def __init__(self, num_examples: int, resolution: int, num_classes: Optional[int] = None, seed: int = 0):
        if num_examples <= 0 or resolution <= 0:
            raise ValueError(f"num_examples and resolution must be positive, got {num_examples}, {resolution}.")
        if num_classes is not None and num_classes <= 0:
            raise ValueError(f"num_classes must be positive or None, got {num_classes}.")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}.")
        self.num_examples, self.resolution, self.seed = int(num_examples), int(resolution), int(seed)
        self.num_classes = num_classes
        grid = (np.arange(self.resolution, dtype=np.float32) + 0.5) / self.resolution
        self._yy, self._xx = np.meshgrid(grid, grid, indexing="ij")  # [R, R] each, in (0, 1)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Example:
        index = self._check_index(index)
        rng = np.random.default_rng([self.seed, index])
        label = None
        if self.num_classes is not None:
            label = int(rng.integers(self.num_classes))
            color0 = np.random.default_rng([self.seed, 2**31, label]).uniform(0.0, 1.0, 3)
        else:
            color0 = rng.uniform(0.0, 1.0, 3)
        color1 = rng.uniform(0.0, 1.0, 3)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        t = 0.5 + 0.5 * (np.cos(angle) * (self._xx - 0.5) + np.sin(angle) * (self._yy - 0.5)) * np.sqrt(2.0)
        image = color0 * (1.0 - t[..., None]) + color1 * t[..., None]  # [R, R, 3]
        for _ in range(3):
            cy, cx = rng.uniform(0.1, 0.9, 2)
            sigma = rng.uniform(0.08, 0.25)
            weight = np.exp(-((self._yy - cy) ** 2 + (self._xx - cx) ** 2) / (2.0 * sigma**2))
            image = image + rng.uniform(-0.6, 0.6, 3) * weight[..., None]
        example: Example = {"image": np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)}
        if label is not None:
            example["label"] = label
        return example


SOURCES: Dict[str, Callable[..., Source]] = {
    "folder": ImageFolderSource,
    "tfds": TfdsSource,
    "digits": DigitsSource,
    "synthetic": SyntheticSource,
}


def make_source(kind: str, **kwargs) -> Source:
    """Build a source by registry name (``"folder"``, ``"tfds"``, ``"digits"``, ``"synthetic"``) and kwargs."""
    try:
        factory = SOURCES[kind]
    except KeyError:
        raise ValueError(f"Unknown data source kind {kind!r}; expected one of {sorted(SOURCES)}.") from None
    return factory(**kwargs)
