"""What the loader stores per row besides the image: class labels, caption token ids, layout boxes.

A ``Field`` turns one example of a source into fixed-shape arrays, one per batch key it declares in ``specs``::

    field.specs                                        {batch key: (per-row shape, dtype)}
    field(example, image_hw, resolution, flip)         {batch key: array of that shape and dtype}, or a str saying
                                                       why the example cannot be used (e.g. "no caption")

``image_hw`` is the (H, W) of the example's image as the source gave it, ``resolution`` the side R it is resized
and centre-cropped to, ``flip`` whether it is mirrored left-right: a field whose values live in image coordinates
(boxes) moves them exactly as the image moves. ``DataLoader`` (``lidiff.data.pipeline``) and the latent cache
(``lidiff.data.latents``) preallocate ``[B, *shape]`` arrays from the specs and fill one row per example; an example
with a reason string is skipped and counted like an unreadable image. Strings never reach a batch: captions are
stored as token ids, since batches go to devices.

``fields_for(kind)`` maps the conditioning kinds ``none | class | text | layout`` to their fields.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from lidiff.data.layouts import boxes_after_hflip, boxes_after_resize_center_crop, pad_boxes
from lidiff.data.text import tokenize

Spec = Tuple[Tuple[int, ...], np.dtype]
FieldValues = Dict[str, np.ndarray]

KINDS = ("none", "class", "text", "layout")


class Field:
    """Base class: per-row arrays of one conditioning input (see the module docstring).

    Attributes:
      specs: batch key -> (per-row shape, numpy dtype); the batch holds ``[B, *shape]`` of that dtype per key.
    """

    specs: Dict[str, Spec] = {}

    def __call__(self, example: Dict[str, Any], image_hw: Tuple[int, int], resolution: int,
                 flip: bool) -> Union[FieldValues, str]:
        """The row's arrays ``{key: array of specs[key]}``, or a str: why ``example`` cannot be used."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.specs)})"


class LabelField(Field):
    """``"label"``: int32 ``[]`` per row (``[B]`` per batch), the example's class id ``example["label"]``.

    An example without ``"label"`` is unusable ("no 'label'").
    """

    def __init__(self):
        self.specs = {"label": ((), np.dtype(np.int32))}

    def __call__(self, example, image_hw, resolution, flip):
        label = example.get("label")
        if label is None:
            return "no 'label' in the example"
        return {"label": np.asarray(label, np.int32)}


class CaptionTokensField(Field):
    """``"tokens"``: int32 ``[max_length]`` per row (``[B, L]`` per batch), ``tokenize(tokenizer, [caption], L)[0]``:
    ``[CLS] words [SEP] [PAD]...`` of ``example["caption"]``, truncated to L.

    An example whose caption is missing, None or blank is unusable ("no caption"). The raw caption stays out of the
    batch. Calls to the tokenizer are serialised by a lock: a transformers fast tokenizer sets its truncation and
    padding state on every call, which is not safe from several loader threads at once ("Already borrowed").
    """

    def __init__(self, tokenizer, max_length: int = 77):
        if tokenizer is None:
            raise ValueError("CaptionTokensField needs a tokenizer (e.g. lidiff.data.text.load_tokenizer(dir)).")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}.")
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        self.specs = {"tokens": ((self.max_length,), np.dtype(np.int32))}
        self._lock = threading.Lock()

    def __call__(self, example, image_hw, resolution, flip):
        caption = example.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            return "no caption"
        with self._lock:
            tokens = tokenize(self.tokenizer, [caption], self.max_length)[0]
        return {"tokens": tokens}


class LayoutField(Field):
    """``"boxes"``: float32 ``[max_boxes, 4]`` (x0, y0, x1, y1) fractions of the R x R crop, and ``"box_labels"``:
    int32 ``[max_boxes]`` (-1 = empty slot, its box all zeros); per batch ``[B, K, 4]`` and ``[B, K]``.

    From ``example["boxes"]`` (float ``[k, 4]`` fractions of the original ``image_hw`` image) and
    ``example["box_labels"]`` (int ``[k]``): moved by the same resize + centre crop to ``resolution`` and the same
    left-right flip as the image (``boxes_after_resize_center_crop``, ``boxes_after_hflip``; boxes left almost
    entirely outside the crop are dropped), then ``pad_boxes(.., max_boxes)`` (the largest kept, order preserved).
    An example without boxes is unusable ("no 'boxes'"); one whose boxes all fall outside the crop is kept with
    every slot empty.
    """

    def __init__(self, max_boxes: int):
        if max_boxes <= 0:
            raise ValueError(f"LayoutField needs max_boxes > 0 (boxes per image, the model's K), got {max_boxes}.")
        self.max_boxes = int(max_boxes)
        self.specs = {
            "boxes": ((self.max_boxes, 4), np.dtype(np.float32)),
            "box_labels": ((self.max_boxes,), np.dtype(np.int32)),
        }

    def __call__(self, example, image_hw, resolution, flip):
        if example.get("boxes") is None or example.get("box_labels") is None:
            return "no 'boxes' and 'box_labels' in the example"
        boxes, labels = boxes_after_resize_center_crop(example["boxes"], example["box_labels"], image_hw, resolution)
        if flip:
            boxes, labels = boxes_after_hflip(boxes, labels)
        boxes, labels = pad_boxes(boxes, labels, self.max_boxes)
        return {"boxes": boxes, "box_labels": labels}


def default_fields(source) -> List[Field]:
    """What the loader stores when not told: ``[LabelField()]`` when ``source.num_classes`` is not None, else []."""
    return [LabelField()] if getattr(source, "num_classes", None) is not None else []


def fields_for(kind: str, *, tokenizer=None, max_length: int = 77, max_boxes: int = 0) -> List[Field]:
    """The fields of a conditioning kind.

    Args:
      kind: ``"none"`` -> [] (images only); ``"class"`` -> [LabelField()]; ``"text"`` ->
        [CaptionTokensField(tokenizer, max_length)]; ``"layout"`` -> [LayoutField(max_boxes)].
      tokenizer: a transformers tokenizer, required for ``"text"``.
      max_length: token ids per caption L (CompVis: 77).
      max_boxes: box slots per image K, required (> 0) for ``"layout"``.
    Raises:
      ValueError naming the kind (unknown) or the missing argument.
    """
    if kind == "none":
        return []
    if kind == "class":
        return [LabelField()]
    if kind == "text":
        if tokenizer is None:
            raise ValueError("conditioning kind 'text' needs a tokenizer to turn captions into token ids.")
        return [CaptionTokensField(tokenizer, max_length)]
    if kind == "layout":
        if max_boxes <= 0:
            raise ValueError(f"conditioning kind 'layout' needs max_boxes > 0 (box slots per image), got {max_boxes}.")
        return [LayoutField(max_boxes)]
    raise ValueError(f"unknown conditioning kind {kind!r} for the data fields; choose one of {', '.join(KINDS)}.")


def check_fields(fields: Sequence[Field], reserved: Sequence[str] = ("image",)) -> Dict[str, Spec]:
    """All specs of ``fields`` in order, refusing a batch key used twice or a ``reserved`` one (ValueError)."""
    specs: Dict[str, Spec] = {}
    owners: Dict[str, str] = {key: "the images" for key in reserved}
    for field in fields:
        for key, (shape, dtype) in field.specs.items():
            if key in owners:
                raise ValueError(f"batch key {key!r} of {field!r} is already used by {owners[key]}.")
            owners[key] = repr(field)
            specs[key] = (tuple(int(d) for d in shape), np.dtype(dtype))
    return specs
