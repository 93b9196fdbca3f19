"""sample.py's readers of spatial conditioning files: values, pairing by name, and refusals naming the flag."""

import numpy as np
import pytest
from PIL import Image

from lidiff.data import cond_images
from lidiff.errors import ConfigError


def save(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_inpainting_reads_white_as_the_region_to_fill_and_blanks_it(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 12, 3), np.uint8)
    mask = np.zeros((8, 12), np.uint8)
    mask[2:5, 3:9] = 255
    mask[6, 0] = 127  # below half scale: kept
    out = cond_images.read_inpainting(save(tmp_path / "a.png", image), save(tmp_path / "a_mask.png", mask))
    assert out["masked_image"].shape == (1, 8, 12, 3) and out["mask"].shape == (1, 8, 12, 1)
    fill = mask >= 128
    np.testing.assert_array_equal(out["mask"][0, ..., 0], fill.astype(np.float32))
    assert (out["masked_image"][0][fill] == -1.0).all()
    np.testing.assert_allclose(out["masked_image"][0][~fill], image[~fill] / 127.5 - 1.0, atol=1e-6)


def test_inpainting_folders_pair_by_name(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "masks").mkdir()
    for name, value in (("b", 10), ("a", 200)):
        save(tmp_path / "img" / f"{name}.jpg", np.full((4, 4, 3), value, np.uint8))
        mask = np.zeros((4, 4), np.uint8)
        mask[0, 0 if name == "a" else 3] = 255
        save(tmp_path / "masks" / f"{name}.png", mask)
    out = cond_images.read_inpainting(str(tmp_path / "img"), str(tmp_path / "masks"))
    assert out["mask"][0, 0, 0, 0] == 1 and out["mask"][1, 0, 3, 0] == 1  # a first, then b, each with its mask


@pytest.mark.parametrize("case", ["no mask", "wrong size", "unpaired", "missing file"])
def test_inpainting_refusals_name_the_flag_and_the_fix(tmp_path, case):
    image = save(tmp_path / "photo.png", np.zeros((8, 8, 3), np.uint8))
    if case == "no mask":
        call, words = (image, None), ("needs --mask=FILE_OR_FOLDER", "white = the region to fill")
    elif case == "wrong size":
        call = (image, save(tmp_path / "m.png", np.zeros((4, 8), np.uint8)))
        words = ("--mask", "m.png is 4x8 but its image photo.png is 8x8", "a mask of the image's size")
    elif case == "unpaired":
        (tmp_path / "i").mkdir()
        (tmp_path / "m").mkdir()
        for name in ("x", "y"):
            save(tmp_path / "i" / f"{name}.png", np.zeros((8, 8, 3), np.uint8))
        save(tmp_path / "m" / "x.png", np.zeros((8, 8), np.uint8))
        save(tmp_path / "m" / "z.png", np.zeros((8, 8), np.uint8))
        call, words = (str(tmp_path / "i"), str(tmp_path / "m")), ("--mask: no file named like y.png", "pair by name")
    else:
        call, words = (str(tmp_path / "nothing.png"), image), ("--cond_image=", "no such file or folder")
    with pytest.raises(ConfigError) as info:
        cond_images.read_inpainting(*call)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_lowres_and_segmentation_readers(tmp_path):
    low = cond_images.read_lowres(save(tmp_path / "low.png", np.full((3, 5, 3), 255, np.uint8)))
    assert low["lowres"].shape == (1, 3, 5, 3) and np.allclose(low["lowres"], 1.0)
    seg = np.zeros((6, 6), np.uint8)
    seg[1:3, 1:3] = 4
    out = cond_images.read_segmentation(save(tmp_path / "seg.png", seg), num_classes=5)
    np.testing.assert_array_equal(out["segmentation"][0], seg.astype(np.int32))
    with pytest.raises(ConfigError, match=r"holds class id 4, outside \[0, 4\)"):
        cond_images.read_segmentation(str(tmp_path / "seg.png"), num_classes=4)
    with pytest.raises(ConfigError, match="has mode RGB; a segmentation map stores one class id per pixel"):
        cond_images.read_segmentation(save(tmp_path / "rgb.png", np.zeros((6, 6, 3), np.uint8)), num_classes=4)
    save(tmp_path / "big.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ConfigError, match="the files differ in size"):
        cond_images.read_lowres(str(tmp_path))
