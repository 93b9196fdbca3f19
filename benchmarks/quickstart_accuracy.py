"""How often do the quickstart's samples show the digit they were asked for?

    python benchmarks/quickstart_accuracy.py runs/quickstart            # a finished quickstart workdir
    python benchmarks/quickstart_accuracy.py runs/quickstart/samples.npz

A digit classifier (scikit-learn ``LogisticRegression``) is trained on three quarters of ``load_digits()`` (8x8
grey levels 0..16) and checked on the held-out quarter. Each generated 32x32 RGB sample is brought back to that
space the way ``lidiff.data.sources.DigitsSource`` made it, in reverse: box-downscale 32x32 -> 8x8 (4x4 means),
average the channels, and map uint8 0..255 to 0..16 (``v * 16 / 255``). The table gives, per requested label, how
many samples the classifier reads as that label; the bottom line is the overall accuracy.

``tests/test_quickstart.py`` uses the same functions (``fit_digit_classifier``, ``samples_to_digit_features``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np


def samples_to_digit_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, R, R, C] images (R a multiple of 8) -> [N, 64] float64 grey levels in 0..16, as ``load_digits``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] % 8:
        raise ValueError(f"expected square images [N, R, R, C] with R a multiple of 8, got {images.shape}")
    n, r = images.shape[0], images.shape[1]
    k = r // 8
    grey = images.astype(np.float64).mean(axis=-1)  # [N, R, R]
    boxes = grey.reshape(n, 8, k, 8, k).mean(axis=(2, 4))  # [N, 8, 8] box downscale
    return (boxes * (16.0 / 255.0)).reshape(n, 64)


def split_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``load_digits()``: (75% to fit the classifier on, 25% held out), stratified by label."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, held_out = train_test_split(np.arange(len(target)), test_size=0.25, random_state=seed, stratify=target)
    return np.sort(train), np.sort(held_out)


def fit_digit_classifier(seed: int = 0) -> tuple[Any, float]:
    """A LogisticRegression fitted on ``split_digits(seed)[0]`` -> (classifier, accuracy on the held-out 25%)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    train, held_out = split_digits(seed)
    classifier = LogisticRegression(max_iter=5000, C=0.1)
    classifier.fit(digits.data[train], digits.target[train])
    return classifier, float(classifier.score(digits.data[held_out], digits.target[held_out]))


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray, num_classes: int = 10) -> list[tuple[int, int, int]]:
    """-> [(label, samples, correct)] for each label 0..num_classes-1."""
    return [(c, int(np.sum(labels == c)), int(np.sum((labels == c) & (predicted == c)))) for c in range(num_classes)]


def evaluate(npz_path: str, classifier: Any = None) -> dict[str, Any]:
    """Classifies ``samples.npz`` (``images`` uint8 [N, R, R, 3], ``labels`` [N]) -> {"accuracy", "predicted",
    "labels", "per_class"}."""
    if classifier is None:
        classifier, _ = fit_digit_classifier()
    with np.load(npz_path) as data:
        images, labels = data["images"], data["labels"]
    predicted = classifier.predict(samples_to_digit_features(images))
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "predicted": predicted,
        "labels": labels,
        "per_class": per_class_accuracy(predicted, labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a quickstart workdir or its samples.npz")
    args = parser.parse_args()
    path = os.path.join(args.path, "samples.npz") if os.path.isdir(args.path) else args.path
    classifier, held_out = fit_digit_classifier()
    result = evaluate(path, classifier)
    print(f"classifier: LogisticRegression on load_digits(), held-out accuracy {held_out:.3f}")
    print(f"samples: {path}")
    print()
    print("| label | samples | read as label | accuracy |")
    print("|------:|--------:|--------------:|---------:|")
    for label, n, correct in result["per_class"]:
        print(f"| {label} | {n} | {correct} | {correct / max(n, 1):.2f} |")
    n = len(result["labels"])
    print(f"| all | {n} | {int(round(result['accuracy'] * n))} | {result['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
