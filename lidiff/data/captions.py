"""Captioned image sources for text-to-image LDMs.

Same contract as ``lidiff.data.sources`` (random access, ``None`` for an unreadable example, which the DataLoader
skips and counts), with a caption in every example::

    source[i]          {"image": uint8 [H, W, 3], "caption": str} (+ "label": int where the source has labels)
    source.describe(i) a short name of example i, for messages
    source.captions()  every caption, in index order, to build a tokenizer vocabulary from

Sources: a folder with a ``<stem>.txt`` caption next to each image, a JSONL/CSV manifest, a tfds dataset with a text
feature (e.g. ``coco_captions``), and scikit-learn's digits with generated captions ("a handwritten seven").
"""

from __future__ import annotations

import csv
import json
import os
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from lidiff.data.sources import (
    _DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    DigitsSource,
    Example,
    ImageFolderSource,
    Source,
    TfdsSource,
)
from lidiff.data.transforms import ensure_rgb_uint8


def _read_caption(path: str) -> Optional[str]:
    """The stripped text of ``path``, or None when it is missing, unreadable or blank."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


class CaptionedFolderSource(Source):
    """Images under ``path`` (as ``ImageFolderSource``) each captioned by a sidecar ``<stem>.txt`` next to it.

    ``photos/cat.jpg`` is captioned by ``photos/cat.txt`` (UTF-8, surrounding whitespace stripped). An image whose
    caption file is missing or blank has ``"caption": None``: the loader's caption field skips and counts it, with
    the reason "no caption" (an undecodable image gives ``None``, "unreadable").
    """

    def __init__(self, path: str, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.images = ImageFolderSource(path, extensions)
        self.path = self.images.path

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return self.images.describe(index)

    def caption_path(self, index: int) -> str:
        """The sidecar caption file of example ``index``."""
        return os.path.splitext(self.images.describe(index))[0] + ".txt"

    def caption(self, index: int) -> Optional[str]:
        return _read_caption(self.caption_path(index))

    def __getitem__(self, index: int) -> Optional[Example]:
        example = self.images[index]
        if example is None:
            return None
        example["caption"] = self.caption(index)
        return example

    def captions(self) -> List[str]:
        """The captions that exist (examples without one are left out), in index order."""
        return [c for c in (self.caption(i) for i in range(len(self))) if c is not None]


class CaptionManifestSource(Source):
    """Image/caption pairs listed in a JSONL or CSV manifest.

    - ``.jsonl``/``.json``: one JSON object per line, ``{"image": path, "caption": text}``; blank lines are skipped.
    - ``.csv``: a header row with (at least) ``image`` and ``caption`` columns.

    Relative image paths are resolved against the manifest's folder. A malformed line (bad JSON, not an object,
    a missing or non-string field) raises ``ValueError`` naming the manifest and the line number when the source
    is built. At read time an image that cannot be decoded, or a blank caption, gives ``None``.
    """

    def __init__(self, manifest: str):
        self.manifest = os.fspath(manifest)
        if not os.path.isfile(self.manifest):
            raise FileNotFoundError(
                f"Caption manifest {self.manifest!r} does not exist. Expected a .jsonl file of "
                f'{{"image": path, "caption": text}} lines or a .csv file with image,caption columns.'
            )
        ext = os.path.splitext(self.manifest)[1].lower()
        if ext in (".jsonl", ".json"):
            rows = self._read_jsonl()
        elif ext == ".csv":
            rows = self._read_csv()
        else:
            raise ValueError(f"Caption manifest {self.manifest!r}: unknown format {ext!r}; use .jsonl or .csv.")
        if not rows:
            raise ValueError(f"Caption manifest {self.manifest!r} lists no examples.")
        root = os.path.dirname(os.path.abspath(self.manifest))
        self.files = tuple(os.path.join(root, image) for image, _ in rows)  # join keeps absolute paths
        self._captions = tuple(caption for _, caption in rows)

    def _bad(self, line: int, why: str) -> ValueError:
        return ValueError(f"Caption manifest {self.manifest!r}, line {line}: {why}")

    def _read_jsonl(self):
        rows = []
        with open(self.manifest, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise self._bad(line_number, f"not valid JSON ({e.msg}): {line.strip()[:80]!r}") from None
                if not isinstance(record, dict):
                    raise self._bad(line_number, f"expected a JSON object with image and caption, got {record!r:.80}")
                rows.append(self._row(line_number, record))
        return rows

    def _read_csv(self):
        rows = []
        with open(self.manifest, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if "image" not in fields or "caption" not in fields:
                raise self._bad(1, f"the header must name image and caption columns, got {fields}")
            for record in reader:
                rows.append(self._row(reader.line_num, record))
        return rows

    def _row(self, line: int, record: dict):
        for key in ("image", "caption"):
            if key not in record or record[key] is None:
                raise self._bad(line, f"missing {key!r} (got keys {sorted(k for k in record if k is not None)})")
            if not isinstance(record[key], str):
                raise self._bad(line, f"{key!r} must be a string, got {type(record[key]).__name__}")
        if not record["image"].strip():
            raise self._bad(line, "empty image path")
        return record["image"].strip(), record["caption"].strip()

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return self.files[self._check_index(index)]

    def __getitem__(self, index: int) -> Optional[Example]:
        index = self._check_index(index)
        if not self._captions[index]:
            return None
        try:
            with Image.open(self.files[index]) as img:
                image = np.asarray(img.convert("RGB"))
        except _DECODE_ERRORS:
            return None
        return {"image": image, "caption": self._captions[index]}

    def captions(self) -> List[str]:
        return [c for c in self._captions if c]


def _feature_at(features, key_path: str):
    """The tfds feature at a '/'-separated path, looking through Sequence features."""
    node = features
    for part in key_path.split("/"):
        inner = getattr(node, "feature", node)  # tfds.features.Sequence wraps its element feature
        if not hasattr(inner, "keys") or part not in inner.keys():
            keys = list(inner.keys()) if hasattr(inner, "keys") else []
            raise KeyError(f"no feature {part!r} in {key_path!r}; available there: {keys}")
        node = inner[part]
    return node


def _as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsCaptionSource(TfdsSource):
    """A tfds split with an image and a text feature, read by random access (see ``TfdsSource``).

    Args:
      name, split, data_dir, manual_dir, prepare: as ``TfdsSource``.
      image_key: the image feature.
      caption_key: the text feature, a '/'-separated path into nested features (``coco_captions``:
        ``"captions/text"``). When it holds several captions (a Sequence), example i takes caption
        ``(i + caption_seed) % n``: deterministic, and a different seed picks other captions.
      label_key: an optional ClassLabel feature kept as ``"label"``.

    ``captions()`` reads every record (images included) and returns all captions of every example; on a large
    dataset that takes as long as an epoch of decoding, so build vocabularies from a subset or a manifest there.
    """

    def __init__(
        self,
        name: str,
        split: str,
        image_key: str = "image",
        caption_key: str = "caption",
        data_dir: Optional[str] = None,
        manual_dir: Optional[str] = None,
        label_key: Optional[str] = None,
        caption_seed: int = 0,
        prepare: bool = True,
    ):
        super().__init__(name, split, data_dir=data_dir, manual_dir=manual_dir, image_key=image_key,
                         label_key=label_key, prepare=prepare)
        import tensorflow_datasets as tfds  # lazy, as in TfdsSource

        try:
            _feature_at(tfds.builder(name, data_dir=data_dir).info.features, caption_key)
        except KeyError as e:
            raise KeyError(f"tfds dataset {name!r}: {e.args[0]}") from None
        self.caption_key, self.caption_seed = caption_key, int(caption_seed)

    def _all_captions(self, record) -> List[str]:
        value = record
        for part in self.caption_key.split("/"):
            value = value[part]
        values = value.tolist() if isinstance(value, np.ndarray) and value.ndim > 0 else (
            list(value) if isinstance(value, (list, tuple)) else [value])
        return [_as_text(v).strip() for v in values]

    def __getitem__(self, index: int) -> Optional[Example]:
        index = self._check_index(index)
        record = self._data[index]
        captions = self._all_captions(record)
        if not captions:
            return None
        caption = captions[(index + self.caption_seed) % len(captions)]
        if not caption:
            return None
        example: Example = {"image": ensure_rgb_uint8(record[self.image_key]), "caption": caption}
        if self.label_key is not None:
            example["label"] = int(record[self.label_key])
        return example

    def captions(self) -> List[str]:
        return [c for i in range(len(self)) for c in self._all_captions(self._data[i]) if c]


# ---------------------------------------------------------------------------------------------- digits

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {w}: the digit as a word, {n}: as a numeral.
DIGIT_TEMPLATES = (
    "a handwritten {w}",
    "the digit {n}",
    "number {n}",
    "a picture of a {n}",
    "handwritten digit {w}",
    "the number {w}",
    "a scanned {n}",
    "an image of the digit {w}",
)


def digit_caption(digit: int, template: int) -> str:
    """``DIGIT_TEMPLATES[template]`` filled in for ``digit`` in 0..9."""
    return DIGIT_TEMPLATES[template % len(DIGIT_TEMPLATES)].format(w=DIGIT_WORDS[digit], n=digit)


def digit_prompts(digits: Sequence[int], seed: int = 0) -> List[str]:
    """One prompt per entry of ``digits``; repeats of a digit get different phrasings (up to 8 distinct).

    ``digit_prompts([7, 7, 7, 3])`` -> e.g. ``["number 7", "a picture of a 7", "handwritten digit seven",
    "number 3"]``: the k-th occurrence of a digit uses template ``seed + k``.
    """
    seen: dict = {}
    prompts = []
    for d in digits:
        d = int(d)
        if not 0 <= d <= 9:
            raise ValueError(f"digit_prompts: {d} is not a digit 0..9")
        k = seen.get(d, 0)
        seen[d] = k + 1
        prompts.append(digit_caption(d, seed + k))
    return prompts


class DigitsCaptionSource(Source):
    """scikit-learn's digits (``DigitsSource``, 8x8 RGB uint8) captioned by their digit in varied phrasings.

    Example i: ``{"image": uint8 [8, 8, 3], "label": digit, "caption": str}``, the template chosen by a generator
    seeded with ``(seed, i)``: the same for every read, different across seeds.
    """

    num_classes = 10

    def __init__(self, seed: int = 0):
        self.digits = DigitsSource()
        self.seed = int(seed)
        self._templates = np.array(
            [np.random.default_rng([self.seed, i]).integers(len(DIGIT_TEMPLATES)) for i in range(len(self.digits))]
        )

    def __len__(self) -> int:
        return len(self.digits)

    def describe(self, index: int) -> str:
        return f"digits[{self._check_index(index)}]"

    def caption(self, index: int) -> str:
        index = self._check_index(index)
        return digit_caption(int(self.digits.labels[index]), int(self._templates[index]))

    def __getitem__(self, index: int) -> Example:
        example = dict(self.digits[index])
        example["caption"] = self.caption(index)
        return example

    def captions(self) -> List[str]:
        return [self.caption(i) for i in range(len(self))]
