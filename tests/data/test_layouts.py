"""Layouts on the host (lidiff.data.layouts): box transforms, padding, COCO and digit sources, layout files."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from lidiff.data import layouts, transforms


def _box_image(h, w, rects):
    """Black uint8 [h, w, 3] with white filled pixel rectangles (left, top, right, bottom), right/bottom exclusive."""
    image = np.zeros((h, w, 3), np.uint8)
    for left, top, right, bottom in rects:
        image[top:bottom, left:right] = 255
    return image


def _assert_box_covers_blob(image, box):
    """The white blob of image [R, R, 3] spans the box (fractions) to within one pixel on every side."""
    r = image.shape[0]
    ys, xs = np.nonzero(image[..., 0] > 127)
    assert len(xs), "rectangle vanished from the image"
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    np.testing.assert_allclose(found, np.asarray(box, np.float64) * r, atol=1.0)


@pytest.mark.parametrize("hw, rect, kept", [
    ((60, 100), (25, 10, 60, 30), True),     # landscape: inside the centre crop
    ((60, 100), (5, 20, 40, 50), True),      # partly left of the crop: clipped at x0 = 0
    ((60, 100), (0, 10, 12, 40), False),     # entirely left of the crop: dropped
    ((90, 40), (8, 20, 30, 50), True),       # portrait: partly above the crop
])
def test_resize_center_crop_and_hflip_move_boxes_with_the_image(hw, rect, kept):
    h, w = hw
    image = _box_image(h, w, [rect])
    box = np.array([[rect[0] / w, rect[1] / h, rect[2] / w, rect[3] / h]])
    cropped = transforms.resize_center_crop(image, 32)
    boxes, labels = layouts.boxes_after_resize_center_crop(box, [4], (h, w), 32)
    assert boxes.dtype == np.float32 and labels.dtype == np.int32
    if not kept:
        assert labels.tolist() == [-1] and not boxes.any()
        assert not (cropped[..., 0] > 127).any()
        return
    assert labels.tolist() == [4] and boxes.min() >= 0 and boxes.max() <= 1
    _assert_box_covers_blob(cropped, boxes[0])
    flipped_boxes, flipped_labels = layouts.boxes_after_hflip(boxes, labels)
    _assert_box_covers_blob(transforms.hflip(cropped), flipped_boxes[0])
    assert flipped_labels.tolist() == [4]


def test_padding_slots_survive_transforms_as_empty():
    boxes, labels = layouts.boxes_after_hflip(np.zeros((2, 4)), [-1, -1])
    assert not boxes.any() and labels.tolist() == [-1, -1]
    boxes, labels = layouts.boxes_after_resize_center_crop(np.zeros((1, 4)), [-1], (40, 40), 32)
    assert labels.tolist() == [-1]


def test_pad_boxes_keeps_largest_in_order_and_pads():
    boxes = np.array([[0, 0, 0.1, 0.1], [0, 0, 0.9, 0.9], [0, 0, 0.5, 0.5], [0, 0, 0.2, 0.2], [0, 0, 1, 1]])
    labels = np.array([0, 1, 2, -1, 3])
    b, l = layouts.pad_boxes(boxes, labels, 2)
    assert l.tolist() == [1, 3] and b.dtype == np.float32 and l.dtype == np.int32
    b, l = layouts.pad_boxes(boxes[:2], labels[:2], 4)
    assert l.tolist() == [0, 1, -1, -1] and b.shape == (4, 4) and not b[2:].any()


# ------------------------------------------------------------------------------------------------------ COCO


def _write_coco(tmp_path, annotations=None, **overrides):
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    Image.fromarray(_box_image(20, 40, [(4, 2, 12, 10)])).save(image_dir / "a.png")
    Image.fromarray(_box_image(30, 30, [])).save(image_dir / "b.png")
    (image_dir / "bad.png").write_bytes(b"not a png")
    data = {
        "images": [{"id": 10, "file_name": "a.png", "width": 40, "height": 20},
                   {"id": 11, "file_name": "b.png", "width": 30, "height": 30},
                   {"id": 12, "file_name": "bad.png", "width": 8, "height": 8}],
        "annotations": annotations if annotations is not None else [
            {"image_id": 10, "bbox": [4, 2, 8, 8], "category_id": 7, "iscrowd": 0},
            {"image_id": 10, "bbox": [0, 0, 40, 20], "category_id": 3, "iscrowd": 1},
            {"image_id": 11, "bbox": [15, 0, 30, 15], "category_id": 3, "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    data.update(overrides)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(path), str(image_dir)


def test_coco_source_maps_categories_and_boxes(tmp_path):
    source = layouts.CocoLayoutSource(*_write_coco(tmp_path))
    assert len(source) == 3 and source.num_classes is None
    assert source.class_names == ("cat", "dog") and source.num_box_classes == 2
    first = source[0]
    assert first["image"].shape == (20, 40, 3) and first["image"].dtype == np.uint8
    np.testing.assert_allclose(first["boxes"], [[4 / 40, 2 / 20, 12 / 40, 10 / 20]])  # crowd box skipped
    assert first["box_labels"].tolist() == [1]
    np.testing.assert_allclose(source[1]["boxes"], [[0.5, 0.0, 1.0, 0.5]])  # clipped to the image
    assert source[1]["box_labels"].tolist() == [0]
    assert source[2] is None and source.describe(2).endswith("bad.png")
    crowd = layouts.CocoLayoutSource(*_write_coco(tmp_path), include_crowd=True, max_boxes=1)
    assert crowd[0]["box_labels"].tolist() == [0]  # the larger (crowd) box wins


@pytest.mark.parametrize("edit, error, message", [
    (lambda p, d: os.remove(p), FileNotFoundError, "does not exist"),
    (lambda p, d: open(p, "w").write("{oops"), ValueError, "not valid JSON"),
    (lambda p, d: open(p, "w").write("[]"), ValueError, "'images', 'annotations' and 'categories'"),
])
def test_coco_source_refuses_bad_files(tmp_path, edit, error, message):
    path, image_dir = _write_coco(tmp_path)
    edit(path, image_dir)
    with pytest.raises(error, match=message) as info:
        layouts.CocoLayoutSource(path, image_dir)
    assert "instances.json" in str(info.value)


@pytest.mark.parametrize("annotation, message", [
    ({"image_id": 99, "bbox": [0, 0, 1, 1], "category_id": 7}, "unknown image_id 99"),
    ({"image_id": 10, "bbox": [0, 0, 1, 1], "category_id": 5}, "unknown category_id 5"),
    ({"image_id": 10, "bbox": [0, 0, 1], "category_id": 7}, "expected 4 numbers"),
])
def test_coco_source_refuses_bad_annotations(tmp_path, annotation, message):
    with pytest.raises(ValueError, match=message):
        layouts.CocoLayoutSource(*_write_coco(tmp_path, annotations=[annotation]))


def test_coco_source_refuses_missing_image_dir(tmp_path):
    path, _ = _write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        layouts.CocoLayoutSource(path, str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------- digits


def _pixel_boxes(boxes, canvas):
    return np.rint(np.asarray(boxes) * canvas).astype(int)


def test_digit_layouts_are_non_overlapping_drawn_in_their_boxes_and_deterministic():
    source = layouts.DigitsLayoutSource(12, seed=3)
    counts = set()
    for i in range(len(source)):
        ex = source[i]
        image, boxes, labels = ex["image"], ex["boxes"], ex["box_labels"]
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert 1 <= len(labels) <= 3 and boxes.shape == (len(labels), 4)
        counts.add(len(labels))
        assert labels.tolist() == source.digits.labels[ex["digit_indices"]].tolist()
        inside = np.zeros((64, 64), bool)
        for x0, y0, x1, y1 in _pixel_boxes(boxes, 64):
            assert 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64 and 16 <= x1 - x0 <= 32 and 16 <= y1 - y0 <= 32
            assert not inside[y0:y1, x0:x1].any(), "boxes overlap"
            inside[y0:y1, x0:x1] = True
            assert image[y0:y1, x0:x1].max() > 100, "digit missing from its box"
        assert not image[~inside].any(), "ink outside the boxes"
    assert counts == {1, 2, 3}
    again = layouts.DigitsLayoutSource(12, seed=3)[5]
    np.testing.assert_array_equal(again["image"], source[5]["image"])
    assert not np.array_equal(layouts.DigitsLayoutSource(12, seed=4)[5]["image"], source[5]["image"])


def test_digit_indices_restrict_the_digits():
    allowed = [0, 1, 2]
    source = layouts.DigitsLayoutSource(8, digit_indices=allowed)
    used = np.concatenate([source[i]["digit_indices"] for i in range(8)])
    assert set(used.tolist()) <= set(allowed)


def test_random_layouts_are_padded_valid_and_not_the_training_draws():
    boxes, labels = layouts.random_layouts(6, seed=3, max_boxes=3)
    assert boxes.shape == (6, 3, 4) and labels.shape == (6, 3)
    assert ((labels >= -1) & (labels < 10)).all() and (labels[:, 0] >= 0).all()
    present = labels >= 0
    assert (boxes[present][:, 2] > boxes[present][:, 0]).all() and boxes.max() <= 1
    train = layouts.DigitsLayoutSource(6, seed=3)
    assert not all(np.allclose(train[i]["boxes"], boxes[i][present[i]]) for i in range(6)
                   if len(train[i]["boxes"]) == present[i].sum())
    np.testing.assert_array_equal(layouts.random_layouts(6, seed=3)[0], boxes)


# ------------------------------------------------------------------------------------------------ layout files


def _layout_file(tmp_path, content):
    path = tmp_path / "layout.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_read_layout_file_both_forms_and_class_names(tmp_path):
    layout = [{"bbox": [0.1, 0.2, 0.5, 0.6], "label": 7}, {"bbox": [0.5, 0.5, 1.0, 1.0], "label": "three"}]
    names = ["zero", "one", "two", "three"] + [str(d) for d in range(4, 10)]
    for content in ([layout, layout[:1]], {"layouts": [layout, layout[:1]]}):
        boxes, labels = layouts.read_layout_file(_layout_file(tmp_path, content), class_names=names,
                                                 num_classes=10, max_boxes=3)
        assert boxes.dtype == np.float32 and labels.dtype == np.int32 and boxes.shape == (2, 3, 4)
        np.testing.assert_array_equal(labels, [[7, 3, -1], [7, -1, -1]])
        np.testing.assert_allclose(boxes[0, :2], [[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 1.0, 1.0]])


@pytest.mark.parametrize("content, message", [
    ([[{"bbox": [0.1, 0.2, 1.5, 0.6], "label": 1}]], r"layout 0, object 0: bbox .* outside \[0, 1\]"),
    ([[{"bbox": [0.5, 0.2, 0.5, 0.6], "label": 1}]], r"layout 0, object 0: .*expected x0 < x1 and y0 < y1"),
    ([[], [{"bbox": [0.1, 0.7, 0.5, 0.6], "label": 1}]], r"layout 1, object 0: .*x0 < x1 and y0 < y1"),
    ([[{"bbox": [0.1, 0.1, 0.2, 0.2], "label": 1}, {"bbox": [0.1, 0.1, 0.2, 0.2], "label": "seven"}]],
     r"layout 0, object 1: unknown class name 'seven'"),
    ([[{"bbox": [0.1, 0.1, 0.2, 0.2], "label": 10}]], r"class id 10 outside \[0, 10\)"),
    ([[{"bbox": [0.1, 0.1, 0.2, 0.2], "label": 1}] * 4], "4 objects, more than max_boxes=3"),
    ("[[{", "not valid JSON"),
    ({"layout": []}, "expected a non-empty list of layouts"),
    ([[{"box": [0.1, 0.1, 0.2, 0.2], "label": 1}]], "keys 'bbox' and 'label'"),
])
def test_read_layout_file_refusals_name_file_layout_and_object(tmp_path, content, message):
    path = _layout_file(tmp_path, content)
    with pytest.raises(ValueError, match=message) as info:
        layouts.read_layout_file(path, class_names=[str(d) for d in range(10)], num_classes=10, max_boxes=3)
    assert path in str(info.value)


def test_crop_boxes_cuts_the_boxed_region():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[1, 8:24, 4:12] = 200
    boxes = np.array([[[0, 0, 0, 0], [0, 0, 0.5, 0.5]], [[4 / 32, 8 / 32, 12 / 32, 24 / 32], [0, 0, 0, 0]]])
    crops, labels, where = layouts.crop_boxes(images, boxes, [[-1, 3], [5, -1]], size=8)
    assert crops.shape == (2, 8, 8, 3) and crops.dtype == np.uint8
    assert labels.tolist() == [3, 5] and where.tolist() == [[0, 1], [1, 0]]
    assert not crops[0].any() and (crops[1] == 200).all()
