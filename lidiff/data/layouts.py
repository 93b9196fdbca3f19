"""Bounding-box layouts on the host: box transforms, padding, COCO-style and synthetic digit sources, layout files.

Conventions used everywhere in this module:

- A box is ``(x0, y0, x1, y1)`` as **fractions** of the image it refers to, in [0, 1], with ``x0 < x1`` and
  ``y0 < y1`` (x to the right, y down; pixel ``j`` covers ``[j / W, (j + 1) / W)``). Fractions survive resizing
  unchanged, so only cropping and flipping move boxes.
- Boxes come with integer class ids ``labels``; -1 marks an empty slot (padding, or a box dropped by a crop).
  Empty slots have all-zero boxes.
- Fixed shapes for batching come from ``pad_boxes``: float32 ``[max_boxes, 4]`` and int32 ``[max_boxes]``.

The tokens the model sees are made from these arrays by ``lidiff.models.layout.layout_tokens``.
"""

from __future__ import annotations

import json
import os
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from lidiff.data.sources import _DECODE_ERRORS, DigitsSource, Example, Source
from lidiff.data.transforms import resample_filter


# ---------------------------------------------------------------------------------------------- box transforms


def _crop_offsets(image_hw: Tuple[int, int], resolution: int) -> Tuple[int, int, int, int]:
    """(scaled_h, scaled_w, top, left) exactly as ``transforms.resize_center_crop`` computes them."""
    h, w = int(image_hw[0]), int(image_hw[1])
    if (h, w) != (resolution, resolution) and min(h, w) != resolution:
        scale = resolution / min(h, w)
        h, w = (
            resolution if h <= w else max(resolution, int(round(h * scale))),
            resolution if w <= h else max(resolution, int(round(w * scale))),
        )
    return h, w, (h - resolution) // 2, (w - resolution) // 2


def boxes_after_resize_center_crop(
    boxes, labels, image_hw: Tuple[int, int], resolution: int, min_size: float = 0.02
) -> Tuple[np.ndarray, np.ndarray]:
    """Move boxes as ``transforms.resize_center_crop(image, resolution)`` moves the image.

    Args:
      boxes: float ``[K, 4]`` (x0, y0, x1, y1), fractions of the original ``image_hw`` image.
      labels: int ``[K]``, -1 for empty slots.
      image_hw: (H, W) of the original image in pixels.
      resolution: the crop side R.
      min_size: boxes whose clipped width or height is below this fraction of the crop are (almost) entirely
        outside it; they are dropped (label -1, box zeros).
    Returns:
      boxes float32 ``[K, 4]`` as fractions of the R x R crop, clipped to [0, 1]; labels int32 ``[K]``.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels, np.int32).reshape(-1).copy()
    scaled_h, scaled_w, top, left = _crop_offsets(image_hw, resolution)
    xs = (boxes[:, [0, 2]] * scaled_w - left) / resolution
    ys = (boxes[:, [1, 3]] * scaled_h - top) / resolution
    out = np.clip(np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1), 0.0, 1.0)
    keep = (labels >= 0) & (out[:, 2] - out[:, 0] >= min_size) & (out[:, 3] - out[:, 1] >= min_size)
    labels[~keep] = -1
    out[~keep] = 0.0
    return out.astype(np.float32), labels


def boxes_after_hflip(boxes, labels) -> Tuple[np.ndarray, np.ndarray]:
    """Move boxes as ``transforms.hflip`` mirrors the image: ``x0' = 1 - x1, x1' = 1 - x0``.

    boxes float ``[K, 4]`` fractions, labels int ``[K]`` -> float32 ``[K, 4]``, int32 ``[K]``; empty slots stay
    all-zero.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int32).reshape(-1)
    out = np.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], axis=1)
    out[labels < 0] = 0.0
    return out.astype(np.float32), labels.copy()


def pad_boxes(boxes, labels, max_boxes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed-size layout: drop empty slots, keep at most ``max_boxes``, pad with empty slots at the end.

    With more than ``max_boxes`` boxes the largest by area are kept (ties: earlier first); kept boxes stay in
    their original order.

    Args:
      boxes: float ``[K, 4]`` fractions; labels: int ``[K]`` (-1 = empty).
    Returns:
      boxes float32 ``[max_boxes, 4]`` (zeros in empty slots), labels int32 ``[max_boxes]`` (-1 in empty slots).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != boxes.shape[0]:
        raise ValueError(f"boxes [{boxes.shape[0]}, 4] and labels [{labels.shape[0]}] disagree on the box count.")
    present = np.flatnonzero(labels >= 0)
    if len(present) > max_boxes:
        area = (boxes[present, 2] - boxes[present, 0]) * (boxes[present, 3] - boxes[present, 1])
        present = np.sort(present[np.argsort(-area, kind="stable")[:max_boxes]])
    out_boxes = np.zeros((max_boxes, 4), np.float32)
    out_labels = np.full((max_boxes,), -1, np.int32)
    out_boxes[: len(present)] = boxes[present]
    out_labels[: len(present)] = labels[present]
    return out_boxes, out_labels


# ------------------------------------------------------------------------------------------------ COCO source


def _load_json(path: str, what: str) -> Any:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist.")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from e


class CocoLayoutSource(Source):
    """Images with boxes from a COCO-style annotation JSON (instances_*.json).

    Args:
      annotation_json: JSON with "images" (id, file_name, width, height), "annotations" (image_id, bbox
        ``[x, y, w, h]`` in pixels, category_id, iscrowd) and "categories" (id, name).
      image_dir: folder the images' file_name paths are relative to.
      max_boxes: keep at most this many boxes per image, the largest (``pad_boxes`` rule); None keeps all.
      include_crowd: also use ``iscrowd=1`` annotations (default: skip them, one box around a crowd).

    Category ids map to contiguous class ids ``0..C-1`` in sorted id order (``class_names[c]``,
    ``num_box_classes = C``). Boxes with zero width or height are skipped. ``num_classes`` is None: examples have
    no image-level label. ``source[i]`` -> ``{"image": uint8 [H, W, 3], "boxes": float32 [k, 4] fractions of
    the original image (clipped to [0, 1]), "box_labels": int32 [k]}``, or None when the image cannot be read.
    """

    num_classes = None

    def __init__(self, annotation_json: str, image_dir: str, max_boxes: Optional[int] = None,
                 include_crowd: bool = False):
        self.annotation_json, self.image_dir = os.fspath(annotation_json), os.fspath(image_dir)
        data = _load_json(self.annotation_json, "COCO annotation file")
        where = f"COCO annotation file {self.annotation_json!r}"
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in
                                                 ("images", "annotations", "categories")):
            raise ValueError(f"{where} must be an object with lists 'images', 'annotations' and 'categories'.")
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"Image folder {self.image_dir!r} for {where} does not exist.")
        try:
            cat_ids = sorted(int(c["id"]) for c in data["categories"])
            names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
            images = [(int(im["id"]), str(im["file_name"]), int(im["width"]), int(im["height"]))
                      for im in data["images"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed category or image entry ({type(e).__name__}: {e}); categories "
                             f"need id and name, images need id, file_name, width and height.") from e
        class_of = {cid: i for i, cid in enumerate(cat_ids)}
        self.class_names: Tuple[str, ...] = tuple(names[c] for c in cat_ids)
        self.num_box_classes = len(cat_ids)
        self.max_boxes = max_boxes
        self._images = images
        row_of = {im[0]: row for row, im in enumerate(images)}
        per_image: List[List[Tuple[List[float], int]]] = [[] for _ in images]
        for n, ann in enumerate(data["annotations"]):
            try:
                image_id, cat, bbox = int(ann["image_id"]), int(ann["category_id"]), [float(v) for v in ann["bbox"]]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: annotation {n} is malformed ({type(e).__name__}: {e}); expected "
                                 f"image_id, category_id and bbox [x, y, w, h].") from e
            if len(bbox) != 4:
                raise ValueError(f"{where}: annotation {n} has bbox {bbox}; expected 4 numbers [x, y, w, h].")
            if image_id not in row_of:
                raise ValueError(f"{where}: annotation {n} refers to unknown image_id {image_id}.")
            if cat not in class_of:
                raise ValueError(f"{where}: annotation {n} refers to unknown category_id {cat}; known: {cat_ids}.")
            if (ann.get("iscrowd", 0) and not include_crowd) or bbox[2] <= 0 or bbox[3] <= 0:
                continue
            _, _, width, height = images[row_of[image_id]]
            x, y, w, h = bbox
            frac = [x / width, y / height, (x + w) / width, (y + h) / height]
            per_image[row_of[image_id]].append((frac, class_of[cat]))
        self._boxes, self._labels = [], []
        for items in per_image:
            boxes = np.clip(np.asarray([b for b, _ in items], np.float32).reshape(-1, 4), 0.0, 1.0)
            labels = np.asarray([c for _, c in items], np.int32)
            if max_boxes is not None and len(labels) > max_boxes:
                boxes, labels = pad_boxes(boxes, labels, max_boxes)
            self._boxes.append(boxes)
            self._labels.append(labels)

    def __len__(self) -> int:
        return len(self._images)

    def describe(self, index: int) -> str:
        return os.path.join(self.image_dir, self._images[self._check_index(index)][1])

    def __getitem__(self, index: int) -> Optional[Example]:
        index = self._check_index(index)
        try:
            with Image.open(self.describe(index)) as img:
                image = np.asarray(img.convert("RGB"))
        except _DECODE_ERRORS:
            return None
        return {"image": image, "boxes": self._boxes[index].copy(), "box_labels": self._labels[index].copy()}


# ------------------------------------------------------------------------------------------ synthetic digits


def _sample_layout(rng: np.random.Generator, canvas: int, min_digits: int, max_digits: int,
                   min_side: int = 16, max_side: int = 32) -> List[Tuple[int, int, int, int]]:
    """1 to max_digits non-overlapping pixel boxes (left, top, width, height) inside a canvas; rejection sampling."""
    count = int(rng.integers(min_digits, max_digits + 1))
    placed: List[Tuple[int, int, int, int]] = []
    for _ in range(200 * count):
        if len(placed) == count:
            break
        w = int(rng.integers(min_side, max_side + 1))
        h = int(np.clip(round(w * rng.uniform(0.8, 1.25)), min_side, max_side))
        x, y = int(rng.integers(0, canvas - w + 1)), int(rng.integers(0, canvas - h + 1))
        if all(x + w <= px or px + pw <= x or y + h <= py or py + ph <= y for px, py, pw, ph in placed):
            placed.append((x, y, w, h))
    return placed  # fewer than count only when the canvas is too crowded (never for 3 digits on 64 px)


class DigitsLayoutSource(Source):
    """Synthetic layouts: 1-3 of scikit-learn's 8x8 digits pasted into non-overlapping boxes of a black canvas.

    Example i depends only on (seed, i). Each digit is upscaled with PIL bicubic (smooth strokes, the same
    filter ``resize_center_crop`` uses for digits) into a box of 16..32 px per side (aspect 0.8..1.25).
    ``source[i]`` -> ``{"image": uint8 [canvas, canvas, 3], "boxes": float32 [k, 4] fractions, "box_labels":
    int32 [k] (the digits 0..9), "digit_indices": int32 [k] (rows of DigitsSource)}``.

    Args:
      digit_indices: which DigitsSource rows may be drawn (e.g. a train split); default all 1797.
    """

    num_classes = None
    num_box_classes = 10
    class_names = tuple(str(d) for d in range(10))

    def __init__(self, num_examples: int, canvas: int = 64, min_digits: int = 1, max_digits: int = 3,
                 seed: int = 0, digit_indices: Optional[Sequence[int]] = None):
        if num_examples <= 0 or canvas < 32:
            raise ValueError(f"num_examples must be positive and canvas at least 32, got {num_examples}, {canvas}.")
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"Need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}.")
        self.digits = DigitsSource()
        self.digit_indices = (np.arange(len(self.digits)) if digit_indices is None
                              else np.asarray(digit_indices, np.int64).reshape(-1))
        if len(self.digit_indices) == 0 or self.digit_indices.min() < 0 or \
                self.digit_indices.max() >= len(self.digits):
            raise ValueError(f"digit_indices must be non-empty rows in [0, {len(self.digits)}).")
        self.num_examples, self.canvas, self.seed = int(num_examples), int(canvas), int(seed)
        self.min_digits, self.max_digits = int(min_digits), int(max_digits)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Example:
        index = self._check_index(index)
        rng = np.random.default_rng([self.seed, 0, index])
        placed = _sample_layout(rng, self.canvas, self.min_digits, self.max_digits)
        rows = self.digit_indices[rng.integers(0, len(self.digit_indices), len(placed))]
        image = np.zeros((self.canvas, self.canvas, 3), np.uint8)
        for (x, y, w, h), row in zip(placed, rows):
            digit = Image.fromarray(self.digits.images[row]).resize((w, h), Image.Resampling.BICUBIC)
            image[y : y + h, x : x + w] = np.asarray(digit)
        boxes = np.asarray([(x, y, x + w, y + h) for x, y, w, h in placed], np.float32).reshape(-1, 4) / self.canvas
        return {"image": image, "boxes": boxes, "box_labels": self.digits.labels[rows].astype(np.int32),
                "digit_indices": rows.astype(np.int32)}


def random_layouts(n: int, seed: int, max_boxes: int = 3, canvas: int = 64, min_digits: int = 1,
                   max_digits: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """Fresh digit layouts for sampling: same distribution as ``DigitsLayoutSource``, a separate seed stream.

    Returns boxes float32 ``[n, max_boxes, 4]`` fractions and labels int32 ``[n, max_boxes]`` (digits 0..9,
    -1 padded); layout i depends only on (seed, i) and never equals a training layout's random draw.
    """
    boxes = np.zeros((n, max_boxes, 4), np.float32)
    labels = np.full((n, max_boxes), -1, np.int32)
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        placed = _sample_layout(rng, canvas, min_digits, max_digits)
        b = np.asarray([(x, y, x + w, y + h) for x, y, w, h in placed], np.float32).reshape(-1, 4) / canvas
        boxes[i], labels[i] = pad_boxes(b, rng.integers(0, 10, len(placed)), max_boxes)
    return boxes, labels


# ------------------------------------------------------------------------------------------- layout files


def read_layout_file(path: str, class_names: Optional[Sequence[str]] = None, num_classes: int = 10,
                     max_boxes: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """Layouts for ``sample.py --layout FILE.json``.

    The file holds a list of layouts or ``{"layouts": [...]}``; a layout is a list of objects
    ``{"bbox": [x0, y0, x1, y1] fractions in [0, 1], "label": class id or class name}``.

    Args:
      class_names: names for string labels (their index is the class id); None allows only integer labels.
      num_classes: class ids must lie in ``[0, num_classes)``.
      max_boxes: the most objects a layout may hold (the model's K).
    Returns:
      boxes float32 ``[N, max_boxes, 4]`` and labels int32 ``[N, max_boxes]`` (-1 padded).
    Raises:
      FileNotFoundError for a missing file; ValueError naming the file, layout and object for anything malformed.
    """
    data = _load_json(path, "Layout file")
    layouts = data.get("layouts") if isinstance(data, dict) else data
    if not isinstance(layouts, list) or not layouts:
        raise ValueError(f"Layout file {path!r}: expected a non-empty list of layouts or {{\"layouts\": [...]}}.")
    index = {name: i for i, name in enumerate(class_names or ())}
    boxes = np.zeros((len(layouts), max_boxes, 4), np.float32)
    labels = np.full((len(layouts), max_boxes), -1, np.int32)
    for i, layout in enumerate(layouts):
        where = f"Layout file {path!r}, layout {i}"
        if not isinstance(layout, list):
            raise ValueError(f"{where}: expected a list of objects {{\"bbox\": [x0, y0, x1, y1], \"label\": ...}}.")
        if len(layout) > max_boxes:
            raise ValueError(f"{where}: {len(layout)} objects, more than max_boxes={max_boxes}.")
        for j, obj in enumerate(layout):
            at = f"{where}, object {j}"
            if not isinstance(obj, dict) or "bbox" not in obj or "label" not in obj:
                raise ValueError(f"{at}: expected an object with keys 'bbox' and 'label', got {obj!r}.")
            bbox, label = obj["bbox"], obj["label"]
            if (not isinstance(bbox, list) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
                raise ValueError(f"{at}: bbox {bbox!r} must be 4 numbers [x0, y0, x1, y1].")
            x0, y0, x1, y1 = (float(v) for v in bbox)
            if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
                raise ValueError(f"{at}: bbox {bbox} lies outside [0, 1]; coordinates are fractions of the image.")
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"{at}: bbox {bbox} is empty; expected x0 < x1 and y0 < y1.")
            if isinstance(label, str):
                if label not in index:
                    raise ValueError(f"{at}: unknown class name {label!r}; known: {list(class_names or [])}.")
                label = index[label]
            elif not isinstance(label, int) or isinstance(label, bool):
                raise ValueError(f"{at}: label {label!r} must be a class id or a class name.")
            if not 0 <= label < num_classes:
                raise ValueError(f"{at}: class id {label} outside [0, {num_classes}).")
            boxes[i, j], labels[i, j] = (x0, y0, x1, y1), label
    return boxes, labels


def crop_boxes(images, boxes, labels, size: int, resample="box") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut out every box and resize it to ``size x size`` (e.g. to score generated digits with a classifier).

    Args:
      images: uint8 ``[N, H, W, 3]``; boxes: float ``[N, K, 4]`` fractions; labels: int ``[N, K]`` (-1 skipped).
      resample: PIL filter name; "box" averages areas, good for downscaling.
    Returns:
      crops uint8 ``[M, size, size, 3]``, their labels int32 ``[M]`` and ``(image, slot)`` int32 ``[M, 2]``, one
      row per non-empty slot. A box covers pixels ``floor(x0 * W) .. ceil(x1 * W) - 1`` (at least one).
    """
    images = np.asarray(images)
    boxes = np.asarray(boxes, np.float64)
    labels = np.asarray(labels)
    n, h, w = images.shape[:3]
    crops, crop_labels, where = [], [], []
    for i, k in zip(*np.nonzero(labels >= 0)):
        x0, y0, x1, y1 = boxes[i, k]
        left, top = min(int(np.floor(x0 * w)), w - 1), min(int(np.floor(y0 * h)), h - 1)
        right, bottom = max(int(np.ceil(x1 * w)), left + 1), max(int(np.ceil(y1 * h)), top + 1)
        patch = Image.fromarray(images[i, top:bottom, left:right])
        crops.append(np.asarray(patch.resize((size, size), resample_filter(resample))))
        crop_labels.append(labels[i, k])
        where.append((i, k))
    return (np.asarray(crops, np.uint8).reshape(-1, size, size, 3), np.asarray(crop_labels, np.int32),
            np.asarray(where, np.int32).reshape(-1, 2))
