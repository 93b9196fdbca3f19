"""Host-side data of the spatially conditioned tasks: semantic maps (segmentation -> image) and photo crops
(super-resolution).

Segmentation maps are int32 ``[H, W]`` class ids in ``[0, num_classes)``, aligned pixel for pixel with the example's
image ``[H, W, 3]``. ``SegmentationField`` moves a map exactly as ``transforms.resize_center_crop`` and the flip move
the image (nearest-neighbour resampling, so ids stay ids) and stores it as ``"segmentation": int32 [R, R]``.

Sources (sequences of examples, see ``lidiff.data.sources``)::

    SegmentationFolderSource(path, maps_path)   {"image": uint8 [H, W, 3], "segmentation": int32 [H, W] or None,
                                                 "segmentation_path": str or None}
    DigitsSegmentationSource(resolution)        {"image": uint8 [R, R, 3], "segmentation": int32 [R, R] (0 or
                                                 1 + digit), "label": int digit, "digit_index": int}
    PhotoCropsSource(num_examples, crop)        {"image": uint8 [crop, crop, 3], "photo": str, "top": int,
                                                 "left": int}

``digit_region_maps`` draws maps of several digit-shaped regions for sampling beyond the training size, with the
class and box of every region. ``make_spatial_source`` builds one of the sources from ``config.data``.

Digit ink: a pixel of a bicubic-upscaled scikit-learn digit is ink when its grey level is at least
``INK_THRESHOLD = 64`` (25% of full scale, 255); ink pixels of digit d get class ``1 + d``, all others 0.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from lidiff.data import transforms
from lidiff.data.fields import Field
from lidiff.data.layouts import _sample_layout
from lidiff.data.sources import _DECODE_ERRORS, DigitsSource, Example, ImageFolderSource, Source
from lidiff.errors import ConfigError, DataError, MissingInputError

INK_THRESHOLD = 64  # upscaled digit grey level (0..255) from which a pixel is ink (>= 25% of full scale)
NUM_DIGIT_SEG_CLASSES = 11  # 0 background, 1 + d for digit d

# PIL modes whose pixel values are class ids (P: the palette index, never its colour).
MAP_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


# --------------------------------------------------------------------------------------------------- the field


def _where(example: Example) -> str:
    path = example.get("segmentation_path")
    return f"segmentation map {path!r}" if path else "the segmentation map of an example"


class SegmentationField(Field):
    """``"segmentation"``: int32 ``[R, R]`` per row (``[B, R, R]`` per batch), class ids in ``[0, num_classes)``.

    From ``example["segmentation"]`` (integer ``[H, W]`` or ``[H, W, 1]``, the image's H and W): resized (smaller
    side to R, nearest neighbour), centre-cropped and mirrored exactly like the image
    (``transforms.resize_center_crop(.., "nearest")``, ``transforms.hflip``).

    An example whose map is missing or None is unusable ("no segmentation map"), as is one whose map size differs
    from the image's. A map holding an id outside ``[0, num_classes)`` (e.g. an "ignore" id 255) or a non-integer
    map raises ``DataError`` naming the map (``example["segmentation_path"]`` when the source gives it), the ids and
    ``num_classes``: a wrong class count or unmapped ids are mistakes to fix, not examples to skip.

    Args:
      num_classes: number of segmentation classes C (ids 0..C-1).
      resolution: the loader's R; the spec is fixed, so calls with another resolution raise ValueError.
    """

    def __init__(self, num_classes: int, resolution: int):
        if num_classes <= 0 or resolution <= 0:
            raise ValueError(f"SegmentationField needs num_classes > 0 and resolution > 0, got {num_classes}, "
                             f"{resolution}.")
        self.num_classes, self.resolution = int(num_classes), int(resolution)
        self.specs = {"segmentation": ((self.resolution, self.resolution), np.dtype(np.int32))}

    def __call__(self, example, image_hw, resolution, flip):
        if resolution != self.resolution:
            raise ValueError(f"{self!r} was built for resolution {self.resolution} but called with {resolution}; "
                             f"build it with the loader's resolution.")
        seg = example.get("segmentation")
        if seg is None:
            return "no segmentation map"
        seg = np.asarray(seg)
        if seg.ndim == 3 and seg.shape[-1] == 1:
            seg = seg[..., 0]
        if seg.ndim != 2:
            raise DataError(f"{_where(example)} has shape {seg.shape}; expected [H, W] class ids (one channel).")
        if seg.shape != tuple(image_hw):
            return f"segmentation map is {seg.shape[0]}x{seg.shape[1]} but the image is {image_hw[0]}x{image_hw[1]}"
        if seg.dtype.kind not in "iub":
            raise DataError(f"{_where(example)} has dtype {seg.dtype}; expected integer class ids.")
        if seg.size and (int(seg.min()) < 0 or int(seg.max()) >= self.num_classes):
            bad = np.unique(seg[(seg < 0) | (seg >= self.num_classes)])
            shown = ", ".join(str(int(b)) for b in bad[:8]) + (", ..." if len(bad) > 8 else "")
            raise DataError(
                f"{_where(example)} holds class id(s) {shown} outside [0, num_classes={self.num_classes}) in "
                f"{int(np.isin(seg, bad).sum())} pixels. Set the number of segmentation classes to cover every id, "
                f"or remap the ids in the maps (an 'ignore' id such as 255 must become a real class first)."
            )
        seg = transforms.resize_center_crop(seg.astype(np.int32), self.resolution, "nearest")
        if flip:
            seg = transforms.hflip(seg)
        return {"segmentation": np.ascontiguousarray(seg, np.int32)}

    def __repr__(self) -> str:
        return f"SegmentationField(num_classes={self.num_classes}, resolution={self.resolution})"


# ------------------------------------------------------------------------------------------------ map folders


def read_segmentation_map(path: str) -> np.ndarray:
    """A PNG of class ids -> int32 ``[H, W]``.

    Pixel values are the ids: mode L (0..255), P (the palette index, not its colour), I or I;16 (16-bit PNG).
    Raises DataError naming the file for any other mode (e.g. a colour-coded RGB map); PIL's decode errors pass.
    """
    with Image.open(path) as img:
        if img.mode not in MAP_MODES:
            raise DataError(
                f"Segmentation map {path!r} has PIL mode {img.mode!r}; expected one channel of class ids (mode L, "
                f"P, I or I;16). Convert colour-coded maps to id maps first."
            )
        return np.asarray(img).astype(np.int32)


class SegmentationFolderSource(Source):
    """Images under ``path`` (recursively, like ``ImageFolderSource``) with class-id maps under ``maps_path``.

    Image ``sub/a.jpg`` pairs with map ``maps_path/sub/a.png`` (same relative path and stem, extension .png,
    case-insensitive). Maps are read by ``read_segmentation_map`` (modes L, P, I, I;16).

    ``source[i]`` -> ``{"image": uint8 [H, W, 3], "segmentation": int32 [H, W], "segmentation_path": str}``;
    ``"segmentation": None`` (and path None) when the image has no map, so ``SegmentationField`` skips and counts
    it; None when the image or its map cannot be decoded.

    Raises:
      FileNotFoundError naming a missing folder; ValueError naming the folder when it holds no images, or when no
      image has a map.
    """

    def __init__(self, path: str, maps_path: str):
        self.images = ImageFolderSource(path)
        self.path, self.maps_path = self.images.path, os.fspath(maps_path)
        if not os.path.isdir(self.maps_path):
            raise MissingInputError(
                f"Segmentation map folder {self.maps_path!r} does not exist or is not a folder. Expected one PNG "
                f"of class ids per image of {self.path!r}, same relative path and stem (a.jpg <-> a.png); set "
                f"config.data.maps_path to it."
            )
        maps: Dict[str, str] = {}
        for root, dirs, names in os.walk(self.maps_path, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                stem, ext = os.path.splitext(name)
                if not name.startswith(".") and ext.lower() == ".png":
                    rel = os.path.relpath(os.path.join(root, stem), self.maps_path)
                    maps[rel] = os.path.join(root, name)
        self.map_files: Tuple[Optional[str], ...] = tuple(
            maps.get(os.path.splitext(f)[0]) for f in self.images.files
        )
        if not any(self.map_files):
            raise ValueError(
                f"None of the {len(self.map_files)} images of {self.path!r} has a map in {self.maps_path!r}: "
                f"expected <maps_path>/<relative path of the image, extension .png> (a.jpg <-> a.png)."
            )

    @property
    def num_missing_maps(self) -> int:
        """How many images have no map (they are skipped by ``SegmentationField``)."""
        return sum(m is None for m in self.map_files)

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        index = self._check_index(index)
        map_file = self.map_files[index]
        return f"{self.images.describe(index)} (map {map_file if map_file else 'missing from ' + self.maps_path})"

    def __getitem__(self, index: int) -> Optional[Example]:
        index = self._check_index(index)
        example = self.images[index]
        if example is None:
            return None
        map_file = self.map_files[index]
        if map_file is None:
            return {"image": example["image"], "segmentation": None, "segmentation_path": None}
        try:
            seg = read_segmentation_map(map_file)
        except _DECODE_ERRORS:
            return None
        return {"image": example["image"], "segmentation": seg, "segmentation_path": map_file}


# ---------------------------------------------------------------------------------------------------- digits


def _upscaled_digit(digits: DigitsSource, row: int, width: int, height: int) -> np.ndarray:
    """Grey uint8 ``[height, width]``: digit ``row`` upscaled with PIL bicubic (as ``resize_center_crop`` does)."""
    grey = Image.fromarray(np.ascontiguousarray(digits.images[row, :, :, 0]))
    return np.asarray(grey.resize((width, height), Image.Resampling.BICUBIC))


def _digit_rows(digits: DigitsSource, digit_indices: Optional[Sequence[int]]) -> np.ndarray:
    rows = np.arange(len(digits)) if digit_indices is None else np.asarray(digit_indices, np.int64).reshape(-1)
    if len(rows) == 0 or rows.min() < 0 or rows.max() >= len(digits):
        raise ValueError(f"digit_indices must be non-empty rows in [0, {len(digits)}) of DigitsSource.")
    return rows


class DigitsSegmentationSource(Source):
    """scikit-learn's 8x8 digits upscaled to R x R (PIL bicubic), with their ink as a segmentation map.

    ``source[i]`` -> ``{"image": uint8 [R, R, 3] (the grey digit, repeated to RGB), "segmentation": int32 [R, R]
    (``1 + d`` where the grey level >= INK_THRESHOLD = 64, else 0), "label": d, "digit_index": row}``; example i is
    DigitsSource row ``digit_indices[i]``. The image is exactly ``resize_center_crop(DigitsSource()[row]["image"],
    R)``, so image and map carry the same digit.

    Args:
      resolution: R (>= 8).
      digit_indices: DigitsSource rows to use (e.g. a train split); default all 1797.
    """

    num_classes = 10  # the "label" digits
    num_seg_classes = NUM_DIGIT_SEG_CLASSES

    def __init__(self, resolution: int = 32, digit_indices: Optional[Sequence[int]] = None):
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 (the digits are 8x8), got {resolution}.")
        self.resolution = int(resolution)
        self.digits = DigitsSource()
        self.digit_indices = _digit_rows(self.digits, digit_indices)

    def __len__(self) -> int:
        return len(self.digit_indices)

    def describe(self, index: int) -> str:
        return f"digits segmentation [{index}] (DigitsSource row {self.digit_indices[self._check_index(index)]})"

    def __getitem__(self, index: int) -> Example:
        row = int(self.digit_indices[self._check_index(index)])
        grey = _upscaled_digit(self.digits, row, self.resolution, self.resolution)
        label = int(self.digits.labels[row])
        seg = np.where(grey >= INK_THRESHOLD, 1 + label, 0).astype(np.int32)
        return {"image": np.repeat(grey[..., None], 3, axis=-1), "segmentation": seg, "label": label,
                "digit_index": row}


class RegionMaps(NamedTuple):
    """What ``digit_region_maps`` returns (unpacks as ``maps, labels, boxes``).

    maps: int32 ``[num, size, size]``: 0 background, ``1 + labels[i, k]`` on the ink of region k.
    labels: int32 ``[num, regions]``: the digit 0..9 of each region.
    boxes: float32 ``[num, regions, 4]``: each region's box (x0, y0, x1, y1) as fractions of the map; the region's
      ink lies inside it and boxes do not overlap.
    """

    maps: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray


def digit_region_maps(num: int, size: int = 96, regions: int = 3, seed: int = 0,
                      digit_indices: Optional[Sequence[int]] = None) -> RegionMaps:
    """Segmentation maps of ``regions`` digit-shaped regions each, for sampling at sizes beyond training (32 x 32).

    Each region is the ink (grey >= INK_THRESHOLD after PIL bicubic upscaling) of a DigitsSource row drawn from
    ``digit_indices``, in a box of ``ceil(size / 4)`` to ``floor(size / 2.5)`` px per side (aspect 0.8..1.25) at a
    random position; boxes never overlap. Map i depends only on (seed, i), a stream apart from the layout sources.

    Returns:
      ``RegionMaps(maps int32 [num, size, size], labels int32 [num, regions], boxes float32 [num, regions, 4])``.
    Raises:
      ValueError for num < 1, regions < 1, size < 32, or when the regions cannot be placed without overlap.
    """
    if num < 1 or regions < 1 or size < 32:
        raise ValueError(f"digit_region_maps needs num >= 1, regions >= 1 and size >= 32, got {num}, {regions}, "
                         f"{size}.")
    min_side, max_side = math.ceil(size / 4), math.floor(size / 2.5)
    digits = DigitsSource()
    rows_allowed = _digit_rows(digits, digit_indices)
    maps = np.zeros((num, size, size), np.int32)
    labels = np.zeros((num, regions), np.int32)
    boxes = np.zeros((num, regions, 4), np.float32)
    for i in range(num):
        rng = np.random.default_rng([seed, 2, i])
        for _ in range(20):
            placed = _sample_layout(rng, size, regions, regions, min_side, max_side)
            if len(placed) == regions:
                break
        else:
            raise ValueError(f"could not place {regions} non-overlapping regions of {min_side}..{max_side} px in a "
                             f"{size} x {size} map; use fewer regions or a larger size.")
        rows = rows_allowed[rng.integers(0, len(rows_allowed), regions)]
        for k, ((x, y, w, h), row) in enumerate(zip(placed, rows)):
            digit = int(digits.labels[row])
            ink = _upscaled_digit(digits, int(row), w, h) >= INK_THRESHOLD
            maps[i, y : y + h, x : x + w][ink] = 1 + digit
            labels[i, k] = digit
            boxes[i, k] = (x / size, y / size, (x + w) / size, (y + h) / size)
    return RegionMaps(maps, labels, boxes)


def digit_split(split: str, size: int = 1797) -> np.ndarray:
    """DigitsSource rows of a split: ``held_out`` = every 5th row (0, 5, 10, ...), ``train`` = the others."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; choose one of {', '.join(SPLITS)}.")
    rows = np.arange(size)
    return rows[rows % 5 == 0] if split == "held_out" else rows[rows % 5 != 0]


class DigitRegionMapsSource(Source):
    """``digit_region_maps`` as a source, to sample from: ``source[i]`` -> ``{"image": uint8 zeros [S, S, 3] (no
    image goes with a made-up map), "segmentation": int32 [S, S], "boxes": float32 [K, 4], "box_labels": int32
    [K]}``; the boxes let each region be scored like a layout box."""

    num_classes = None

    def __init__(self, num_examples: int, size: int = 96, regions: int = 3, seed: int = 0,
                 digit_indices: Optional[Sequence[int]] = None):
        self.maps, self.labels, self.boxes = digit_region_maps(num_examples, size, regions, seed, digit_indices)

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, index: int) -> Example:
        index = self._check_index(index)
        size = self.maps.shape[1]
        return {"image": np.zeros((size, size, 3), np.uint8), "segmentation": self.maps[index],
                "boxes": self.boxes[index], "box_labels": self.labels[index]}


# ----------------------------------------------------------------------------------------------- photo crops

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
SKLEARN_PHOTOS = ("china", "flower")
PHOTOS = SKIMAGE_PHOTOS + SKLEARN_PHOTOS  # colour photos bundled in the scikit-image and scikit-learn wheels
SPLITS = ("train", "held_out")


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A bundled colour photo by name (``PHOTOS``): uint8 ``[H, W, 3]``, read-only, cached. No network."""
    if name in SKIMAGE_PHOTOS:
        try:
            import skimage.data  # lazy: only the photo crops need scikit-image
        except ImportError as e:
            raise ImportError("PhotoCropsSource needs scikit-image for its bundled photos: pip install "
                              "scikit-image") from e
        image = getattr(skimage.data, name)()
    elif name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image  # lazy

        image = load_sample_image(f"{name}.jpg")
    else:
        raise ValueError(f"unknown photo {name!r}; choose one of {', '.join(PHOTOS)}.")
    image = np.array(transforms.ensure_rgb_uint8(image))
    image.flags.writeable = False
    return image


class PhotoCropsSource(Source):
    """Random ``crop x crop`` crops of real photos bundled in scikit-image and scikit-learn (``PHOTOS``).

    ``split="train"`` draws from every photo except ``held_out``; ``split="held_out"`` only from ``held_out``. Example
    i depends only on (seed, split, i): a photo drawn uniformly from the split's photos, then a uniform top-left
    corner. No flip here (the loader flips). ``source[i]`` -> ``{"image": uint8 [crop, crop, 3], "photo": name,
    "top": int, "left": int}`` with ``image == load_photo(photo)[top:top + crop, left:left + crop]``.

    Args:
      num_examples: N, the length of the source (crops are drawn, not enumerated).
      crop: side of the crops; every photo of the split must be at least this large.
      held_out: the photo kept out of training (one of ``PHOTOS``), or None to train on all.
    Raises:
      ValueError for an unknown photo or split, a held_out split without a held-out photo, or a crop larger than
      a photo of the split (naming it and its size).
    """

    def __init__(self, num_examples: int, crop: int, seed: int = 0, held_out: Optional[str] = "chelsea",
                 split: str = "train"):
        if num_examples <= 0 or crop <= 0:
            raise ValueError(f"num_examples and crop must be positive, got {num_examples}, {crop}.")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}.")
        if held_out is not None and held_out not in PHOTOS:
            raise ValueError(f"unknown held-out photo {held_out!r}; choose one of {', '.join(PHOTOS)}.")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose 'train' (all photos but the held-out one) or "
                             f"'held_out' (only it).")
        if split == "held_out" and held_out is None:
            raise ValueError("split='held_out' needs a held-out photo (held_out is None).")
        self.num_examples, self.crop, self.seed = int(num_examples), int(crop), int(seed)
        self.held_out, self.split = held_out, split
        self.photo_names: Tuple[str, ...] = (
            tuple(p for p in PHOTOS if p != held_out) if split == "train" else (held_out,)
        )
        self.photos = [load_photo(name) for name in self.photo_names]
        for name, photo in zip(self.photo_names, self.photos):
            if min(photo.shape[:2]) < self.crop:
                raise ValueError(
                    f"photo {name!r} is {photo.shape[0]}x{photo.shape[1]}, smaller than crop {self.crop}; use a "
                    f"crop of at most {min(min(p.shape[:2]) for p in self.photos)} px for split {split!r}."
                )

    def __len__(self) -> int:
        return self.num_examples

    def _draw(self, index: int) -> Tuple[int, int, int]:
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        k = int(rng.integers(len(self.photos)))
        h, w = self.photos[k].shape[:2]
        return k, int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))

    def describe(self, index: int) -> str:
        index = self._check_index(index)
        k, top, left = self._draw(index)
        return (f"photo crops {self.split}[{index}]: {self.photo_names[k]}[{top}:{top + self.crop}, "
                f"{left}:{left + self.crop}]")

    def __getitem__(self, index: int) -> Example:
        k, top, left = self._draw(self._check_index(index))
        image = self.photos[k][top : top + self.crop, left : left + self.crop].copy()
        return {"image": image, "photo": self.photo_names[k], "top": top, "left": left}


# ------------------------------------------------------------------------------------------------- config


SPATIAL_SOURCE_KINDS = ("segmentation_folder", "digits_segmentation", "digit_region_maps", "photo_crops")


def _require(data, name: str, why: str, example: str) -> None:
    if not data[name]:
        raise ConfigError(f"config.data.{name} is empty: {why}, e.g. --config.data.{name}={example}")


def make_spatial_source(data, seed: int) -> Source:
    """The source of a spatial task from ``config.data`` (an ml_collections ConfigDict).

    ``data.source``:
      ``segmentation_folder``: ``SegmentationFolderSource(data.path, data.maps_path)``;
      ``digits_segmentation``: ``DigitsSegmentationSource(data.resolution)`` on the rows of
      ``digit_split(data.split)`` (train: 4 of 5 digits, held_out: every 5th);
      ``digit_region_maps``: ``DigitRegionMapsSource(data.num_examples, size=data.resolution, seed)`` drawing
      regions from ``digit_split(data.split)``;
      ``photo_crops``: ``PhotoCropsSource(data.num_examples, crop=data.resolution, seed, data.held_out,
      data.split)``.
    Only the fields a kind needs are read. Raises ConfigError naming an unknown kind or an empty field with an
    example flag; the sources' own errors (missing folder, crop too large) pass through.
    """
    kind = data.source
    if kind == "segmentation_folder":
        _require(data, "path", "point it at a folder of jpg/png/webp images", "/data/images")
        _require(data, "maps_path", "point it at a folder of PNG class-id maps named like the images (a.jpg <-> "
                 "a.png)", "/data/maps")
        return SegmentationFolderSource(data.path, data.maps_path)
    if kind == "digits_segmentation":
        return DigitsSegmentationSource(resolution=data.resolution, digit_indices=digit_split(data.split))
    if kind == "digit_region_maps":
        return DigitRegionMapsSource(data.num_examples, size=data.resolution, seed=seed,
                                     digit_indices=digit_split(data.split))
    if kind == "photo_crops":
        _require(data, "held_out", f"name the photo kept out of training, one of {', '.join(PHOTOS)}", "chelsea")
        _require(data, "split", "choose train or held_out", "train")
        return PhotoCropsSource(num_examples=data.num_examples, crop=data.resolution, seed=seed,
                                held_out=data.held_out, split=data.split)
    raise ConfigError(f"unknown config.data.source {kind!r} for a spatial task; choose one of "
                      f"{', '.join(SPATIAL_SOURCE_KINDS)}")
