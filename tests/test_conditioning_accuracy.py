"""``benchmarks/conditioning_accuracy.py`` scores the spatial demos' ``samples.npz`` as their docstring says:
inpainted digits against the masked inputs and the originals, map regions like layout boxes, super-resolution by
PSNR / SSIM against bicubic upsampling. Checked on samples made from real digits and photos, where the answer is
known."""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from lidiff.data import transforms
from lidiff.data.sources import DigitsSource
from lidiff.data.spatial import digit_region_maps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("conditioning_accuracy",
                                              os.path.join(REPO, "benchmarks", "conditioning_accuracy.py"))
ca = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ca)


@pytest.fixture(scope="module")
def classifier():
    return ca.fit_digit_classifier()[0]


def digits_32(n: int):
    source = DigitsSource()
    rows = np.arange(0, 5 * n, 5)
    images = np.stack([transforms.resize_center_crop(source[i]["image"], 32) for i in rows])
    return images, source.labels[rows]


def save(tmp_path, **arrays) -> str:
    path = str(tmp_path / "samples.npz")
    np.savez(path, **arrays)
    return path


def test_inpainting_scores_results_masked_inputs_and_originals(tmp_path, classifier):
    targets, labels = digits_32(60)
    masks = np.ones((60, 32, 32), np.uint8)
    masks[:, 8:24, :] = 0  # the middle half of every digit unknown
    perfect = save(tmp_path, images=targets, targets=targets, masks=masks, labels=labels)
    assert ca.detect_kind(np.load(perfect).files) == "inpaint"
    result = ca.evaluate(perfect, classifier)
    assert result["accuracy"] == result["original_accuracy"] >= 0.9  # a perfect inpainter reads as the originals
    assert result["masked_accuracy"] < result["accuracy"] - 0.2  # ... and the masked inputs far worse
    assert result["unknown_fraction"] == pytest.approx(0.5)
    blank = np.where(masks[..., None] > 0, targets, 0).astype(np.uint8)  # an inpainter that leaves the hole black
    result = ca.evaluate(save(tmp_path, images=blank, targets=targets, masks=masks, labels=labels), classifier)
    assert result["accuracy"] == result["masked_accuracy"]


def test_semantic_regions_read_like_layout_boxes(tmp_path, classifier):
    maps, labels, boxes = digit_region_maps(12, size=96, seed=3)
    ink = np.repeat(np.where(maps > 0, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)
    path = save(tmp_path, images=ink, segmentations=maps, boxes=boxes, box_labels=labels)
    assert ca.detect_kind(np.load(path).files) == "semantic"
    result = ca.evaluate(path, classifier)
    assert len(result["labels"]) == 36 and result["accuracy"] == result["map_accuracy"] >= 0.7
    dark = save(tmp_path, images=np.zeros_like(ink), segmentations=maps, boxes=boxes, box_labels=labels)
    assert ca.evaluate(dark, classifier)["accuracy"] < 0.5


def test_super_resolution_against_bicubic(tmp_path):
    rng = np.random.default_rng(0)
    from skimage import data as skdata

    photo = skdata.coffee()  # [400, 600, 3]
    targets = np.stack([photo[y:y + 64, x:x + 64] for y, x in rng.integers(0, 300, (6, 2))])
    inputs = np.stack([np.asarray(Image.fromarray(t).resize((16, 16), Image.Resampling.BICUBIC)) for t in targets])
    close = np.clip(targets.astype(int) + rng.integers(-2, 3, targets.shape), 0, 255).astype(np.uint8)
    path = save(tmp_path, images=close, inputs=inputs, targets=targets)
    assert ca.detect_kind(np.load(path).files) == "superres"
    result = ca.evaluate(path)
    assert result["psnr"] > 40 > result["bicubic_psnr"] > 15 and result["ssim"] > result["bicubic_ssim"]
    flat = np.full_like(targets, 128)
    worse = ca.evaluate(save(tmp_path, images=flat, inputs=inputs, targets=targets))
    assert worse["psnr"] < worse["bicubic_psnr"] and worse["bicubic_psnr"] == pytest.approx(result["bicubic_psnr"])
