"""How often do the conditioned digit demos draw the digit they were asked for?

    python benchmarks/conditioning_accuracy.py runs/digits_text              # a finished workdir
    python benchmarks/conditioning_accuracy.py runs/digits_layout/samples.npz
    python benchmarks/conditioning_accuracy.py runs/digits_inpaint     # also digits_semantic, photos_sr4x

The kind of run is read from the keys of ``samples.npz``:

- text (``configs/digits_text.py``; ``prompts`` [N] str and ``labels`` [N], the digit each prompt names): each
  32x32 sample is classified as in ``benchmarks/quickstart_accuracy.py`` (box-downscale to 8x8, grey levels
  0..16, a LogisticRegression fitted on three quarters of ``load_digits()``); the score is the fraction read as
  the prompt's digit, per digit, per phrasing and overall.
- layout (``configs/digits_layout.py``; ``boxes`` [N, K, 4] fractions and ``box_labels`` [N, K], -1 = no box):
  every present box of every sample is cut out and resized to 32x32 (``lidiff.data.layouts.crop_boxes``, box
  filter), then read by the same classifier; the score is the fraction of boxes read as their label, per digit,
  per number of boxes in the layout and overall, plus the fraction of layouts with every box right. For scale,
  the same crops of real ``DigitsLayoutSource`` layouts (the training distribution) are scored too: that is the
  ceiling the crop-and-classify reading allows.
- class (``labels`` only, e.g. the quickstart): as ``quickstart_accuracy.py``.
- inpaint (``configs/digits_inpaint.py``; ``targets``, ``masks`` 1 = known, ``labels``): the inpainted digits read
  as above, against the same reading of the masked inputs (what the model was given) and of the originals.
- semantic (``configs/digits_semantic.py``; ``segmentations`` and each region's ``boxes`` / ``box_labels``): every
  region cropped and read like a layout box, against the reading of the maps' own ink.
- superres (``configs/photos_sr4x.py``; ``inputs``, ``targets``): PSNR / SSIM of the outputs and of bicubic
  upsampling of the inputs, against the targets.

Each table ends with chance: the same readings scored against shuffled labels (``chance_accuracy``), which is
what a generator that ignores its conditioning gets; it exceeds 10% when the classifier favours one digit.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any

import numpy as np

CROP_SIZE = 32  # crops are read like 32x32 samples: box-downscaled to 8x8 by samples_to_digit_features


def _load_quickstart_accuracy():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart_accuracy.py")
    spec = importlib.util.spec_from_file_location("quickstart_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qa = _load_quickstart_accuracy()
fit_digit_classifier = qa.fit_digit_classifier
samples_to_digit_features = qa.samples_to_digit_features


def detect_kind(keys) -> str:
    """``samples.npz`` keys -> "superres" (inputs + targets), "inpaint" (masks + targets + labels), "semantic"
    (segmentations + region boxes), "layout" (boxes), "text" (prompts) or "class" (labels only)."""
    keys = set(keys)
    if {"inputs", "targets"} <= keys:
        return "superres"
    if {"masks", "targets", "labels"} <= keys:
        return "inpaint"
    if {"segmentations", "boxes", "box_labels"} <= keys:
        return "semantic"
    if {"boxes", "box_labels"} <= keys:
        return "layout"
    if "prompts" in keys and "labels" in keys:
        return "text"
    if "labels" in keys:
        return "class"
    raise ValueError(f"samples.npz holds {sorted(keys)}: no labels, prompts or boxes to score the samples against")


def chance_accuracy(predicted: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> float:
    """The accuracy the same predictions would get against randomly permuted labels:
    ``sum_c P(predicted = c) * P(label = c)``. A generator that ignores its conditioning scores about this, which
    can sit well above 1/num_classes when the classifier favours one digit (blurry blobs read as 4, for one)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if not len(labels):
        return float("nan")
    return float(sum(np.mean(predicted == c) * np.mean(labels == c) for c in range(num_classes)))


def read_boxes(classifier: Any, images: np.ndarray, boxes: np.ndarray, box_labels: np.ndarray) -> dict[str, Any]:
    """Crops every present box (``box_labels >= 0``) of uint8 ``images`` [N, H, W, 3] to 32x32 and classifies it.

    Returns {"predicted" [M], "labels" [M], "where" [M, 2] (image, slot)}, one row per present box.
    """
    from lidiff.data.layouts import crop_boxes

    crops, labels, where = crop_boxes(images, boxes, box_labels, CROP_SIZE)
    predicted = classifier.predict(samples_to_digit_features(crops)) if len(crops) else np.zeros(0, np.int64)
    return {"predicted": np.asarray(predicted), "labels": labels, "where": where}


def evaluate_text(data: dict[str, np.ndarray], classifier: Any) -> dict[str, Any]:
    images, labels, prompts = data["images"], data["labels"], data["prompts"]
    predicted = classifier.predict(samples_to_digit_features(images))
    correct = predicted == labels
    per_prompt = []
    for prompt in dict.fromkeys(prompts.tolist()):  # first-seen order
        rows = prompts == prompt
        per_prompt.append((str(prompt), int(labels[rows][0]), int(rows.sum()), int(correct[rows].sum())))
    return {"kind": "text", "accuracy": float(np.mean(correct)), "predicted": predicted, "labels": labels,
            "per_class": qa.per_class_accuracy(predicted, labels), "per_prompt": per_prompt}


def evaluate_class(data: dict[str, np.ndarray], classifier: Any) -> dict[str, Any]:
    images, labels = data["images"], data["labels"]
    predicted = classifier.predict(samples_to_digit_features(images))
    return {"kind": "class", "accuracy": float(np.mean(predicted == labels)), "predicted": predicted,
            "labels": labels, "per_class": qa.per_class_accuracy(predicted, labels)}


def evaluate_layout(data: dict[str, np.ndarray], classifier: Any) -> dict[str, Any]:
    boxes, box_labels = data["boxes"], data["box_labels"]
    read = read_boxes(classifier, data["images"], boxes, box_labels)
    predicted, labels, where = read["predicted"], read["labels"], read["where"]
    correct = predicted == labels
    n_boxes = (box_labels >= 0).sum(axis=1)  # [N]
    per_count = []
    for k in range(1, box_labels.shape[1] + 1):
        rows = n_boxes[where[:, 0]] == k
        per_count.append((k, int(np.sum(n_boxes == k)), int(rows.sum()), int(correct[rows].sum())))
    wrong_images = set(where[~correct, 0].tolist())
    with_boxes = np.flatnonzero(n_boxes > 0)
    all_right = float(np.mean([i not in wrong_images for i in with_boxes])) if len(with_boxes) else float("nan")
    return {"kind": "layout", "accuracy": float(np.mean(correct)) if len(correct) else float("nan"),
            "predicted": predicted, "labels": labels, "per_class": qa.per_class_accuracy(predicted, labels),
            "per_count": per_count, "layouts_all_right": all_right, "num_images": len(box_labels)}


def real_layout_accuracy(classifier: Any, canvas: int, max_boxes: int, num: int = 500, seed: int = 12345) -> float:
    """The same crop-and-classify reading on ``num`` real ``DigitsLayoutSource`` layouts (the training data's
    distribution, digits drawn from all of ``load_digits()``): the score a perfect generator would get."""
    from lidiff.data.layouts import DigitsLayoutSource, pad_boxes

    source = DigitsLayoutSource(num, canvas=canvas, max_digits=max_boxes, seed=seed)
    images, boxes, labels = [], [], []
    for i in range(num):
        example = source[i]
        b, lab = pad_boxes(example["boxes"], example["box_labels"], max_boxes)
        images.append(example["image"])
        boxes.append(b)
        labels.append(lab)
    read = read_boxes(classifier, np.stack(images), np.stack(boxes), np.stack(labels))
    return float(np.mean(read["predicted"] == read["labels"]))


def evaluate_inpaint(data: dict[str, np.ndarray], classifier: Any) -> dict[str, Any]:
    """Digits read from the inpainted results, from the masked inputs (unknown pixels black, as the model got
    them) and from the originals (the ceiling)."""
    labels, masks = data["labels"], data["masks"]
    masked = np.where(masks[..., None] > 0, data["targets"], 0).astype(np.uint8)
    read = {name: classifier.predict(samples_to_digit_features(x))
            for name, x in (("inpainted", data["images"]), ("masked", masked), ("original", data["targets"]))}
    return {"kind": "inpaint", "accuracy": float(np.mean(read["inpainted"] == labels)), "labels": labels,
            "predicted": read["inpainted"], "per_class": qa.per_class_accuracy(read["inpainted"], labels),
            "masked_accuracy": float(np.mean(read["masked"] == labels)),
            "original_accuracy": float(np.mean(read["original"] == labels)),
            "unknown_fraction": float(1.0 - masks.mean())}


def evaluate_semantic(data: dict[str, np.ndarray], classifier: Any) -> dict[str, Any]:
    """Each map region read like a layout box, plus the same reading of the maps themselves (the regions' ink
    white on black): how well the maps' shapes alone read as their digits."""
    result = evaluate_layout(data, classifier)
    ink = np.repeat(np.where(data["segmentations"] > 0, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)
    maps = read_boxes(classifier, ink, data["boxes"], data["box_labels"])
    return {**result, "kind": "semantic", "map_accuracy": float(np.mean(maps["predicted"] == maps["labels"]))}


def evaluate_superres(data: dict[str, np.ndarray], classifier: Any = None) -> dict[str, Any]:
    from lidiff.metrics.reconstruction import super_resolution_quality

    return {"kind": "superres", "num": len(data["images"]),
            **super_resolution_quality(data["images"], data["inputs"], data["targets"])}


def evaluate(npz_path: str, classifier: Any = None) -> dict[str, Any]:
    """Scores ``samples.npz`` of a conditioned run (see the module docstring)."""
    with np.load(npz_path) as f:
        data = {k: f[k] for k in f.files}
    kind = detect_kind(data)
    if kind == "superres":
        return evaluate_superres(data)
    if classifier is None:
        classifier, _ = fit_digit_classifier()
    return {"text": evaluate_text, "layout": evaluate_layout, "class": evaluate_class, "inpaint": evaluate_inpaint,
            "semantic": evaluate_semantic}[kind](data, classifier)


def _table(per_class, what: str) -> None:
    print(f"| digit | {what} | read as the digit | accuracy |")
    print("|------:|------:|------:|------:|")
    for label, n, correct in per_class:
        if n:
            print(f"| {label} | {n} | {correct} | {correct / n:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a digits_text / digits_layout workdir or its samples.npz")
    args = parser.parse_args()
    path = os.path.join(args.path, "samples.npz") if os.path.isdir(args.path) else args.path
    classifier, held_out = fit_digit_classifier()
    result = evaluate(path, classifier)
    if result["kind"] == "superres":
        print(f"samples: {path} (super-resolution, {result['num']} held-out images)")
        print()
        print("| upsampling | PSNR (dB) | SSIM |")
        print("|:-----------|------:|------:|")
        print(f"| the model | {result['psnr']:.2f} | {result['ssim']:.4f} |")
        print(f"| bicubic | {result['bicubic_psnr']:.2f} | {result['bicubic_ssim']:.4f} |")
        return
    print(f"classifier: LogisticRegression on load_digits(), held-out accuracy {held_out:.3f}")
    print(f"samples: {path} ({result['kind']}-conditioned)")
    print()
    if result["kind"] == "inpaint":
        _table(result["per_class"], "digits")
        print()
        print(f"unknown (inpainted) fraction of the pixels: {result['unknown_fraction']:.3f}")
        print("| digits read as their label from | accuracy |")
        print("|:------|------:|")
        print(f"| the inpainted results | {result['accuracy']:.3f} |")
        print(f"| the masked inputs (unknown pixels black) | {result['masked_accuracy']:.3f} |")
        print(f"| the originals | {result['original_accuracy']:.3f} |")
        print(f"chance (the results' readings against shuffled labels): "
              f"{chance_accuracy(result['predicted'], result['labels']):.3f}")
        return
    if result["kind"] == "semantic":
        _table(result["per_class"], "regions")
        print()
        print(f"regions read as their digit: {result['accuracy']:.3f} of {len(result['labels'])}")
        print(f"the same reading of the maps' own ink: {result['map_accuracy']:.3f}")
        print(f"chance (the same readings against shuffled labels): "
              f"{chance_accuracy(result['predicted'], result['labels']):.3f}")
        return
    if result["kind"] == "layout":
        _table(result["per_class"], "boxes")
        n = len(result["labels"])
        print(f"| all | {n} | {int(np.sum(result['predicted'] == result['labels']))} | {result['accuracy']:.3f} |")
        print()
        print("| boxes in the layout | layouts | boxes | read right | accuracy |")
        print("|------:|------:|------:|------:|------:|")
        for k, images, boxes, correct in result["per_count"]:
            if boxes:
                print(f"| {k} | {images} | {boxes} | {correct} | {correct / boxes:.2f} |")
        print()
        print(f"layouts with every box read right: {result['layouts_all_right']:.3f} of {result['num_images']}")
        print(f"chance (the same readings against shuffled labels): "
              f"{chance_accuracy(result['predicted'], result['labels']):.3f}")
        with np.load(path) as f:
            canvas, max_boxes = f["images"].shape[1], f["box_labels"].shape[1]
        print(f"the same reading of real training-distribution layouts: "
              f"{real_layout_accuracy(classifier, canvas, max_boxes):.3f}")
        return
    _table(result["per_class"], "samples")
    n = len(result["labels"])
    print(f"| all | {n} | {int(np.sum(result['predicted'] == result['labels']))} | {result['accuracy']:.3f} |")
    print()
    chance = chance_accuracy(result["predicted"], result["labels"])
    print(f"chance (the same readings against shuffled labels): {chance:.3f}")
    if result["kind"] == "text":
        print()
        print("| prompt | digit | samples | read as the digit |")
        print("|:-------|------:|------:|------:|")
        for prompt, label, n, correct in result["per_prompt"]:
            print(f"| {prompt} | {label} | {n} | {correct} |")


if __name__ == "__main__":
    main()
