"""Spatial-task data (lidiff.data.spatial): segmentation maps aligned with images, map folders, digit maps,
photo crops and the config factory."""

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from lidiff.data import spatial, transforms
from lidiff.data.pipeline import DataLoader, prepare_example
from lidiff.data.sources import DigitsSource
from lidiff.errors import ConfigError, DataError

# Eight classes, colours at the corners of the RGB cube (far apart after bicubic blur).
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                    [255, 255, 0], [255, 0, 255], [0, 255, 255], [255, 255, 255]], np.uint8)


def _class_map(h, w):
    """An asymmetric int32 [h, w] map of classes 1, 3, 5, 2 in uneven vertical stripes, 7 in the lower left."""
    xs = (np.arange(w) + 0.5) / w
    stripes = np.array([1, 3, 5, 2])[np.searchsorted([0.3, 0.55, 0.8], xs)]
    seg = np.broadcast_to(stripes, (h, w)).copy()
    seg[h * 3 // 5 :, : w * 2 // 5] = 7
    return seg.astype(np.int32)


def _interior(seg, margin):
    """bool [R, R]: pixels whose (2*margin+1)^2 neighbourhood (clipped at the border) holds one class only."""
    r = seg.shape[0]
    out = np.zeros(seg.shape, bool)
    for y in range(r):
        for x in range(r):
            patch = seg[max(0, y - margin) : y + margin + 1, max(0, x - margin) : x + margin + 1]
            out[y, x] = (patch == seg[y, x]).all()
    return out


@pytest.mark.parametrize("hw, resolution", [((60, 100), 20), ((100, 45), 16), ((12, 20), 32), ((24, 24), 24)])
@pytest.mark.parametrize("flip", [False, True])
def test_segmentation_field_stays_aligned_with_the_image(hw, resolution, flip):
    seg = _class_map(*hw)
    example = {"image": PALETTE[seg], "segmentation": seg}
    field = spatial.SegmentationField(num_classes=8, resolution=resolution)
    image, values = prepare_example(example, [field], resolution, flip=flip)
    out = values["segmentation"]
    assert out.shape == (resolution, resolution) and out.dtype == np.int32
    assert set(np.unique(out)) <= set(np.unique(seg))  # nearest: ids stay ids
    inside = _interior(out, 1)
    assert inside.mean() > 0.3, "test pattern too fine to check alignment"
    pixels = transforms.to_uint8(image).astype(np.int32)  # [R, R, 3]
    nearest_class = np.argmin(((pixels[:, :, None, :] - PALETTE[None, None].astype(np.int32)) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(nearest_class[inside], out[inside])
    # The flip is applied to the map, not only to the image.
    unflipped = field(example, hw, resolution, False)["segmentation"]
    np.testing.assert_array_equal(out, unflipped[:, ::-1] if flip else unflipped)
    if flip:
        assert not np.array_equal(unflipped, unflipped[:, ::-1])


def test_segmentation_field_keeps_large_ids_and_matches_nearest_resize():
    seg = (np.arange(30 * 50).reshape(30, 50) % 40000).astype(np.int64)  # ids far above 255 (and 16 bits)
    field = spatial.SegmentationField(num_classes=40000, resolution=24)
    out = field({"segmentation": seg}, (30, 50), 24, False)["segmentation"]
    # PIL nearest on a 30x50 -> 24x40 resize, then the centre 24 columns (offset 8).
    ys = np.floor((np.arange(24) + 0.5) * 30 / 24).astype(int)
    xs = np.floor((np.arange(40) + 0.5) * 50 / 40).astype(int)
    np.testing.assert_array_equal(out, seg[np.ix_(ys, xs)][:, 8:32])


def test_segmentation_field_skips_missing_or_mismatched_maps():
    field = spatial.SegmentationField(num_classes=4, resolution=8)
    image = np.zeros((10, 12, 3), np.uint8)
    assert prepare_example({"image": image}, [field], 8) == "no segmentation map"
    assert prepare_example({"image": image, "segmentation": None}, [field], 8) == "no segmentation map"
    reason = prepare_example({"image": image, "segmentation": np.zeros((12, 10), np.int32)}, [field], 8)
    assert isinstance(reason, str) and "12x10" in reason and "10x12" in reason


def test_segmentation_field_refuses_out_of_range_ids():
    field = spatial.SegmentationField(num_classes=5, resolution=8)
    seg = np.zeros((10, 10), np.uint8)
    seg[2:4, 2:4] = 255
    example = {"image": np.zeros((10, 10, 3), np.uint8), "segmentation": seg, "segmentation_path": "/maps/a.png"}
    with pytest.raises(DataError) as info:
        prepare_example(example, [field], 8)
    message = str(info.value)
    for part in ("/maps/a.png", "255", "num_classes=5", "4 pixels", "ignore"):
        assert part in message, (part, message)
    with pytest.raises(DataError, match=r"-1 outside \[0, num_classes=5\)"):
        field({"segmentation": np.full((4, 4), -1)}, (4, 4), 8, False)
    with pytest.raises(DataError, match="float"):
        field({"segmentation": np.zeros((4, 4), np.float32)}, (4, 4), 8, False)
    with pytest.raises(ValueError, match="resolution 8"):
        field({"segmentation": np.zeros((4, 4), np.int32)}, (4, 4), 16, False)


# ------------------------------------------------------------------------------------------------ map folders


def _write_folder(tmp_path):
    """Images a (L map), b (palette map), c (16-bit map with id 300), d (no map), e (unreadable) and their maps."""
    images, maps = tmp_path / "images", tmp_path / "maps"
    images.mkdir(), maps.mkdir()
    seg_a = _class_map(10, 14)
    Image.fromarray(PALETTE[seg_a]).save(images / "a.png")
    Image.fromarray(seg_a.astype(np.uint8), mode="L").save(maps / "a.png")

    seg_b = np.array([[0, 1, 2], [3, 2, 1]], np.uint8)
    Image.fromarray(PALETTE[seg_b]).save(images / "b.jpg")
    palette_map = Image.new("P", (3, 2))
    palette_map.putdata(seg_b.reshape(-1).tolist())
    palette_map.putpalette([200, 10, 10, 10, 200, 10, 90, 90, 90, 7, 7, 7] + [0] * (256 * 3 - 12))
    palette_map.save(maps / "b.png")

    seg_c = np.array([[300, 0, 5], [7, 300, 299]], np.uint16)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(images / "c.png")
    Image.fromarray(seg_c).save(maps / "c.png")  # mode I;16

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / "d.png")
    (images / "e.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((2, 2), np.uint8), mode="L").save(maps / "e.png")
    return images, maps, {"a": seg_a, "b": seg_b, "c": seg_c}


def test_segmentation_folder_pairs_images_and_maps(tmp_path):
    images, maps, segs = _write_folder(tmp_path)
    source = spatial.SegmentationFolderSource(str(images), str(maps))
    assert len(source) == 5 and source.num_missing_maps == 1
    names = [source.describe(i) for i in range(5)]
    for i, stem in enumerate("abc"):
        example = source[i]
        assert stem in names[i] and str(maps / f"{stem}.png") in names[i]
        assert example["segmentation"].dtype == np.int32
        np.testing.assert_array_equal(example["segmentation"], segs[stem])  # palette index, 16-bit ids kept
        assert example["image"].shape == segs[stem].shape + (3,) and example["image"].dtype == np.uint8
        assert example["segmentation_path"] == str(maps / f"{stem}.png")
    assert source[3]["segmentation"] is None and "missing" in names[3]
    assert source[4] is None  # unreadable image

    field = spatial.SegmentationField(num_classes=301, resolution=8)
    assert prepare_example(source[3], [field], 8) == "no segmentation map"
    with DataLoader(source, global_batch_size=4, resolution=8, num_threads=0, fields=[field]) as loader:
        batch = loader.batch_at(0)
        assert batch["segmentation"].shape == (4, 8, 8) and batch["segmentation"].dtype == np.int32
        assert loader.num_skipped >= 1  # at least one of d / e was replaced


def test_segmentation_folder_refusals(tmp_path):
    images, maps, _ = _write_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        spatial.SegmentationFolderSource(str(images), str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="missing_images"):
        spatial.SegmentationFolderSource(str(tmp_path / "missing_images"), str(maps))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        spatial.SegmentationFolderSource(str(empty), str(maps))
    with pytest.raises(ValueError, match="has a map"):
        spatial.SegmentationFolderSource(str(images), str(empty))
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(maps / "a.png")  # a colour map
    source = spatial.SegmentationFolderSource(str(images), str(maps))
    with pytest.raises(DataError, match=r"a\.png.*'RGB'"):
        source[0]


# ---------------------------------------------------------------------------------------------------- digits


def test_digits_segmentation_is_the_digit_and_its_ink():
    source = spatial.DigitsSegmentationSource(resolution=24, digit_indices=range(0, 60, 3))
    digits = DigitsSource()
    assert len(source) == 20 and source.num_seg_classes == 11
    for i in range(len(source)):
        example = source[i]
        row = example["digit_index"]
        assert row == 3 * i and example["label"] == digits.labels[row]
        np.testing.assert_array_equal(example["image"], transforms.resize_center_crop(digits[row]["image"], 24))
        seg = example["segmentation"]
        assert seg.shape == (24, 24) and seg.dtype == np.int32
        bright = example["image"][..., 0] >= spatial.INK_THRESHOLD
        np.testing.assert_array_equal(seg > 0, bright)
        assert set(np.unique(seg)) == {0, 1 + example["label"]}
        assert 0.05 < bright.mean() < 0.8


def test_digit_region_maps_places_disjoint_digits_inside_their_boxes():
    maps, labels, boxes = spatial.digit_region_maps(6, size=96, regions=3, seed=1, digit_indices=range(100))
    assert maps.shape == (6, 96, 96) and maps.dtype == np.int32
    assert labels.shape == (6, 3) and labels.dtype == np.int32 and boxes.dtype == np.float32
    assert maps.min() == 0 and maps.max() <= 10 and labels.min() >= 0 and labels.max() <= 9
    for i in range(6):
        px = np.rint(boxes[i] * 96).astype(int)
        np.testing.assert_allclose(px, boxes[i] * 96, atol=1e-3)  # whole-pixel boxes
        covered = np.zeros((96, 96), bool)
        for k in range(3):
            x0, y0, x1, y1 = px[k]
            assert 24 <= x1 - x0 <= 38 and 24 <= y1 - y0 <= 38
            assert not covered[y0:y1, x0:x1].any(), "regions overlap"
            covered[y0:y1, x0:x1] = True
            inside = maps[i, y0:y1, x0:x1]
            assert set(np.unique(inside)) == {0, 1 + labels[i, k]}
            assert (inside > 0).mean() > 0.05
        assert not maps[i][~covered].any(), "ink outside every box"
    again = spatial.digit_region_maps(6, size=96, regions=3, seed=1, digit_indices=range(100))
    np.testing.assert_array_equal(again.maps, maps)
    other = spatial.digit_region_maps(6, size=96, regions=3, seed=2, digit_indices=range(100))
    assert not np.array_equal(other.maps, maps)
    with pytest.raises(ValueError, match="could not place"):
        spatial.digit_region_maps(1, size=32, regions=12)


# ----------------------------------------------------------------------------------------------- photo crops


def test_photo_crops_are_deterministic_real_crops_without_the_held_out_photo():
    source = spatial.PhotoCropsSource(200, crop=32, seed=3, held_out="chelsea")
    same = spatial.PhotoCropsSource(200, crop=32, seed=3, held_out="chelsea")
    other_seed = spatial.PhotoCropsSource(200, crop=32, seed=4, held_out="chelsea")
    photos = set()
    for i in range(len(source)):
        example = source[i]
        photos.add(example["photo"])
        np.testing.assert_array_equal(example["image"], same[i]["image"])
        top, left = example["top"], example["left"]
        np.testing.assert_array_equal(example["image"], spatial.load_photo(example["photo"])[top:top + 32,
                                                                                              left:left + 32])
    assert photos == set(spatial.PHOTOS) - {"chelsea"}
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert sum(np.array_equal(source[i]["image"], other_seed[i]["image"]) for i in range(20)) < 3
    assert "astronaut" in spatial.PhotoCropsSource(10, 8, held_out="astronaut", split="held_out").describe(0)

    held = spatial.PhotoCropsSource(30, crop=32, seed=3, held_out="chelsea", split="held_out")
    chelsea = spatial.load_photo("chelsea")
    for i in range(len(held)):
        example = held[i]
        assert example["photo"] == "chelsea" and f"[{example['top']}:" in held.describe(i)
        top, left = example["top"], example["left"]
        np.testing.assert_array_equal(example["image"], chelsea[top:top + 32, left:left + 32])
    # The same index of the two splits is a different draw (the split is part of the seed).
    assert not all(source[i]["top"] == held[i]["top"] for i in range(10))


def test_photo_crops_refusals():
    with pytest.raises(ValueError, match=r"'chelsea' is 300x451, smaller than crop 301"):
        spatial.PhotoCropsSource(4, crop=301, held_out="chelsea", split="held_out")
    with pytest.raises(ValueError, match="'coffee' is 400x600"):
        spatial.PhotoCropsSource(4, crop=401, held_out="chelsea")
    with pytest.raises(ValueError, match="unknown held-out photo 'dog'"):
        spatial.PhotoCropsSource(4, crop=32, held_out="dog")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        spatial.PhotoCropsSource(4, crop=32, split="test")


# ---------------------------------------------------------------------------------------------------- config


def _data(**fields):
    data = ConfigDict()
    data.update(fields)
    return data


def test_make_spatial_source(tmp_path):
    images, maps, _ = _write_folder(tmp_path)
    source = spatial.make_spatial_source(_data(source="segmentation_folder", path=str(images),
                                               maps_path=str(maps)), seed=0)
    assert isinstance(source, spatial.SegmentationFolderSource) and len(source) == 5
    with pytest.raises(ConfigError, match=r"config\.data\.maps_path is empty.*--config\.data\.maps_path="):
        spatial.make_spatial_source(_data(source="segmentation_folder", path=str(images), maps_path=""), 0)
    with pytest.raises(ConfigError, match=r"--config\.data\.path="):
        spatial.make_spatial_source(_data(source="segmentation_folder", path="", maps_path=str(maps)), 0)

    digits = spatial.make_spatial_source(_data(source="digits_segmentation", resolution=16, split="train"), 0)
    assert isinstance(digits, spatial.DigitsSegmentationSource) and digits[0]["segmentation"].shape == (16, 16)
    held = spatial.make_spatial_source(_data(source="digits_segmentation", resolution=16, split="held_out"), 0)
    assert len(digits) + len(held) == 1797 and not set(digits.digit_indices) & set(held.digit_indices)
    np.testing.assert_array_equal(held.digit_indices, np.arange(0, 1797, 5))  # every 5th digit is held out
    regions = spatial.make_spatial_source(_data(source="digit_region_maps", resolution=64, num_examples=3,
                                                split="held_out"), seed=1)
    example = regions[2]
    assert example["segmentation"].shape == (64, 64) and example["boxes"].shape == (3, 4)
    np.testing.assert_array_equal(np.unique(example["segmentation"]),
                                  np.unique(np.concatenate([[0], 1 + example["box_labels"]])))

    crops = spatial.make_spatial_source(_data(source="photo_crops", resolution=16, num_examples=7,
                                              held_out="rocket", split="held_out"), seed=5)
    assert len(crops) == 7 and crops.seed == 5 and crops[0]["photo"] == "rocket"
    assert crops[0]["image"].shape == (16, 16, 3)
    with pytest.raises(ConfigError, match=r"--config\.data\.held_out=chelsea"):
        spatial.make_spatial_source(_data(source="photo_crops", resolution=16, num_examples=7, held_out="",
                                          split="train"), 0)
    with pytest.raises(ConfigError, match="unknown config.data.source 'folder'.*photo_crops"):
        spatial.make_spatial_source(_data(source="folder"), 0)
