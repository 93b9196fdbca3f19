"""Sources (folder, tfds, digits, synthetic, registry) and transforms."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds  # a test requirement: a missing install must fail, not skip
from PIL import Image

from lidiff.data import sources, transforms
from lidiff.data.pipeline import DataLoader


def _write(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def _rand_image(rng, h, w, c=3):
    shape = (h, w) if c is None else (h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- image folder


def test_folder_recursive_sorted_and_decoded(tmp_path):
    rng = np.random.default_rng(0)
    rgb = _rand_image(rng, 5, 7)
    grey = _rand_image(rng, 6, 4, c=None)
    rgba = _rand_image(rng, 3, 3, c=4)
    _write(str(tmp_path / "b" / "z.png"), rgb)
    _write(str(tmp_path / "a.PNG"), grey)  # upper-case extension, grey -> RGB
    _write(str(tmp_path / "b" / "c" / "rgba.png"), rgba, fmt="PNG")
    _write(str(tmp_path / "b" / "photo.webp"), rgb, fmt="WEBP")
    (tmp_path / "notes.txt").write_text("not an image")
    _write(str(tmp_path / ".hidden" / "x.png"), rgb)

    src = sources.ImageFolderSource(str(tmp_path))
    # sorted by path components; the .txt file and the hidden folder are not listed
    assert src.files == ("a.PNG", os.path.join("b", "c", "rgba.png"), os.path.join("b", "photo.webp"),
                         os.path.join("b", "z.png"))
    assert src.num_classes is None
    by_name = {f: src[i] for i, f in enumerate(src.files)}
    np.testing.assert_array_equal(by_name[os.path.join("b", "z.png")]["image"], rgb)
    np.testing.assert_array_equal(by_name["a.PNG"]["image"], np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(by_name[os.path.join("b", "c", "rgba.png")]["image"], rgba[..., :3])
    webp = by_name[os.path.join("b", "photo.webp")]["image"]
    assert webp.shape == (5, 7, 3) and webp.dtype == np.uint8
    assert all("label" not in ex for ex in by_name.values())
    assert src.describe(0) == os.path.join(str(tmp_path), src.files[0])


def test_folder_order_is_independent_of_creation_order(tmp_path):
    rng = np.random.default_rng(1)
    names = ["q/1.png", "a/9.png", "m.png", "a/10.png", "b.jpg"]
    for i, name in enumerate(names):
        _write(str(tmp_path / "one" / name), _rand_image(rng, 4, 4))
        _write(str(tmp_path / "two" / names[::-1][i]), _rand_image(rng, 4, 4))
    one = sources.ImageFolderSource(str(tmp_path / "one"))
    two = sources.ImageFolderSource(str(tmp_path / "two"))
    assert one.files == two.files
    assert one.files == tuple(os.path.normpath(n) for n in ["a/10.png", "a/9.png", "b.jpg", "m.png", "q/1.png"])


def test_folder_class_from_subdir(tmp_path):
    rng = np.random.default_rng(2)
    for cls, count in [("dog", 2), ("cat", 3), ("emu", 1)]:
        for i in range(count):
            _write(str(tmp_path / cls / f"{i}.png"), _rand_image(rng, 4, 4))
    _write(str(tmp_path / "cat" / "deep" / "x.png"), _rand_image(rng, 4, 4))
    src = sources.ImageFolderSource(str(tmp_path), class_from_subdir=True)
    assert src.classes == ("cat", "dog", "emu") and src.num_classes == 3
    labels = {f: src[i]["label"] for i, f in enumerate(src.files)}
    for f, label in labels.items():
        assert src.classes[label] == f.split(os.sep)[0]
    assert sorted(labels.values()) == [0, 0, 0, 0, 1, 1, 2]

    _write(str(tmp_path / "loose.png"), _rand_image(rng, 4, 4))
    with pytest.raises(ValueError, match="loose.png"):
        sources.ImageFolderSource(str(tmp_path), class_from_subdir=True)


def test_folder_missing_and_empty_messages(tmp_path):
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError) as err:
        sources.ImageFolderSource(missing)
    msg = str(err.value)
    assert missing in msg and "config.data.path" in msg and "recursively" in msg and "jpg" in msg

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as err:
        sources.ImageFolderSource(str(empty))
    msg = str(err.value)
    assert str(empty) in msg and ".jpg" in msg and ".png" in msg and ".webp" in msg


def test_folder_corrupt_file_returns_none(tmp_path):
    rng = np.random.default_rng(3)
    _write(str(tmp_path / "good.png"), _rand_image(rng, 4, 4))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg" * 10)
    src = sources.ImageFolderSource(str(tmp_path))
    assert src.files == ("bad.jpg", "good.png")
    assert src[0] is None
    assert src[1]["image"].shape == (4, 4, 3)


# ---------------------------------------------------------------------------------------------- digits


def test_digits_source():
    from sklearn.datasets import load_digits

    src = sources.DigitsSource()
    ref = load_digits()
    assert len(src) == 1797 and src.num_classes == 10
    labels = np.array([src[i]["label"] for i in range(len(src))])
    np.testing.assert_array_equal(labels, ref.target)
    assert set(labels.tolist()) == set(range(10))
    ex = src[5]
    assert ex["image"].shape == (8, 8, 3) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image"][..., 0], np.rint(ref.images[5] * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(ex["image"][..., 0], ex["image"][..., 2])
    assert max(src[i]["image"].max() for i in range(50)) == 255


def test_digits_upscaled_look_like_the_8x8_originals():
    src = sources.DigitsSource()
    errors_same, errors_other = [], []
    for i in range(20):
        small = src[i]["image"].astype(np.float32)
        big = transforms.resize_center_crop(src[i]["image"], 32)
        assert big.shape == (32, 32, 3) and big.dtype == np.uint8
        back = np.asarray(Image.fromarray(big).resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
        errors_same.append(np.abs(back - small).mean())
        errors_other.append(np.abs(back - src[i + 100]["image"].astype(np.float32)).mean())
        assert np.corrcoef(back[..., 0].ravel(), small[..., 0].ravel())[0, 1] > 0.95
    assert np.mean(errors_same) < 12.0  # out of 255
    assert np.mean(errors_same) < 0.25 * np.mean(errors_other)


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_source_deterministic_smooth_labelled():
    a = sources.SyntheticSource(10, 32, num_classes=4, seed=0)
    b = sources.SyntheticSource(10, 32, num_classes=4, seed=0)
    c = sources.SyntheticSource(10, 32, num_classes=4, seed=1)
    assert len(a) == 10 and a.num_classes == 4
    for i in range(10):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["label"] == b[i]["label"] and 0 <= a[i]["label"] < 4
        assert a[i]["image"].shape == (32, 32, 3) and a[i]["image"].dtype == np.uint8
    assert any(not np.array_equal(a[i]["image"], c[i]["image"]) for i in range(10))
    assert not np.array_equal(a[0]["image"], a[1]["image"])
    # smooth: neighbouring pixels differ far less than in uniform noise (mean |diff| ~ 85)
    img = a[3]["image"].astype(np.float32)
    assert np.abs(np.diff(img, axis=0)).mean() < 10 and np.abs(np.diff(img, axis=1)).mean() < 10
    assert img.std() > 10  # but not flat
    unlabelled = sources.SyntheticSource(3, 16)
    assert unlabelled.num_classes is None and "label" not in unlabelled[0]
    with pytest.raises(IndexError):
        a[10]


def test_make_source_registry():
    src = sources.make_source("synthetic", num_examples=4, resolution=8)
    assert isinstance(src, sources.SyntheticSource) and len(src) == 4
    assert isinstance(sources.make_source("digits"), sources.DigitsSource)
    with pytest.raises(ValueError) as err:
        sources.make_source("imagenet")
    msg = str(err.value)
    assert "imagenet" in msg and all(k in msg for k in ("folder", "tfds", "digits", "synthetic"))


# ---------------------------------------------------------------------------------------------- transforms


def test_resize_center_crop_matches_smallest_max_size_then_center_crop():
    rng = np.random.default_rng(4)
    wide = _rand_image(rng, 20, 50)
    out = transforms.resize_center_crop(wide, 10)
    # smaller side 20 -> 10, 50 -> 25, then crop columns [7, 17)
    ref = np.asarray(Image.fromarray(wide).resize((25, 10), Image.Resampling.BICUBIC))[:, 7:17]
    np.testing.assert_array_equal(out, ref)
    tall = _rand_image(rng, 30, 12)
    out = transforms.resize_center_crop(tall, 12, resample="nearest")  # no resize, crop rows [9, 21)
    np.testing.assert_array_equal(out, tall[9:21])
    square = _rand_image(rng, 16, 16)
    np.testing.assert_array_equal(transforms.resize_center_crop(square, 16), square)
    up = transforms.resize_center_crop(_rand_image(rng, 3, 5), 9)
    assert up.shape == (9, 9, 3) and up.dtype == np.uint8


def test_resize_center_crop_keeps_the_centre():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 200  # the central 40x40 square is bright, the sides dark
    out = transforms.resize_center_crop(image, 20, resample="box")
    assert out.shape == (20, 20, 3) and out.min() == 200
    with pytest.raises(ValueError, match="bicubical"):
        transforms.resize_center_crop(image, 20, resample="bicubical")


def test_float_uint8_round_trip_and_flip():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    x = transforms.to_float(values)
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_allclose(x[..., 0].ravel(), np.arange(256) / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(transforms.to_uint8(x), values)
    np.testing.assert_array_equal(transforms.to_uint8(np.array([-3.0, -1.0, 0.0, 1.0, 5.0])),
                                  np.array([0, 0, 128, 255, 255], np.uint8))
    img = _rand_image(np.random.default_rng(5), 4, 6)
    np.testing.assert_array_equal(transforms.hflip(img)[:, 0], img[:, -1])
    flips = [not np.array_equal(transforms.random_flip(img, np.random.default_rng(s)), img) for s in range(40)]
    assert 5 < sum(flips) < 35


def test_ensure_rgb_uint8():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(transforms.ensure_rgb_uint8(grey)[..., 1], grey)
    assert transforms.ensure_rgb_uint8(grey[..., None]).shape == (3, 4, 3)
    with pytest.raises(ValueError, match="float32"):
        transforms.ensure_rgb_uint8(np.zeros((3, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(3, 4, 2\)"):
        transforms.ensure_rgb_uint8(np.zeros((3, 4, 2), np.uint8))


# ---------------------------------------------------------------------------------------------- tfds


def _tiny_examples():
    rng = np.random.default_rng(7)
    return [(_rand_image(rng, 6 + i, 9 - i), i % 3) for i in range(5)]


class LidiffTinyImages(tfds.core.GeneratorBasedBuilder):
    """5 random images of varying sizes with labels 0..2, built without downloads."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=3)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (image, label) in enumerate(_tiny_examples()):
            yield i, {"image": image, "label": label}


class LidiffTinyManual(tfds.core.GeneratorBasedBuilder):
    """Needs a file placed by hand in manual_dir: ``images.npy`` uint8 [N, H, W, 3]."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put images.npy (uint8 [N, H, W, 3]) into manual_dir."

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3))})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(dl_manager.manual_dir / "images.npy")}

    def _generate_examples(self, path):
        with path.open("rb") as f:
            images = np.load(f)
        for i, image in enumerate(images):
            yield i, {"image": image}


def test_tfds_source_prepares_and_reads_a_local_dataset(tmp_path):
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="lidiff_tiny_images"):
        sources.TfdsSource("lidiff_tiny_images", "train", data_dir=data_dir, label_key="label", prepare=False)

    src = sources.make_source("tfds", name="lidiff_tiny_images", split="train", data_dir=data_dir,
                              label_key="label")
    expected = _tiny_examples()
    assert len(src) == 5 and src.num_classes == 3
    by_shape = {image.shape: (image, label) for image, label in expected}  # tfds stores examples shuffled
    read = [src[i] for i in range(len(src))]
    assert sorted(ex["image"].shape for ex in read) == sorted(by_shape)
    for ex in read:
        image, label = by_shape[ex["image"].shape]
        np.testing.assert_array_equal(ex["image"], image)
        assert ex["label"] == label
    # Already prepared: a second source reads the same files; a split slice works.
    again = sources.TfdsSource("lidiff_tiny_images", "train[:2]", data_dir=data_dir)
    assert len(again) == 2 and again.num_classes is None and "label" not in again[1]

    with DataLoader(src, global_batch_size=4, resolution=8, num_threads=2) as loader:
        steps = list(loader.iterate(0, num_steps=3))
    images = np.concatenate([b["image"] for _, b in steps])
    labels = np.concatenate([b["label"] for _, b in steps])
    assert images.shape == (12, 8, 8, 3) and images.dtype == np.float32
    assert sorted(labels[:5].tolist()) == sorted(label for _, label in expected)  # epoch 0 = each example once
    ref = transforms.to_float(transforms.resize_center_crop(read[loader.index_at(0)]["image"], 8))
    np.testing.assert_allclose(steps[0][1]["image"][0], ref)


def test_tfds_manual_dataset_missing_files_message_then_prepares(tmp_path):
    data_dir = str(tmp_path / "tfds")
    manual = str(tmp_path / "manual")
    with pytest.raises(FileNotFoundError) as err:
        sources.TfdsSource("lidiff_tiny_manual", "train", data_dir=data_dir, manual_dir=manual)
    msg = str(err.value)
    assert "lidiff_tiny_manual" in msg and manual in msg and "Put images.npy" in msg

    os.makedirs(manual)
    images = np.random.default_rng(8).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    np.save(os.path.join(manual, "images.npy"), images)
    src = sources.TfdsSource("lidiff_tiny_manual", "train", data_dir=data_dir, manual_dir=manual)
    assert len(src) == 3
    assert sorted(src[i]["image"].tobytes() for i in range(3)) == sorted(im.tobytes() for im in images)


def test_tfds_celeb_a_hq_without_manual_files_explains_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        sources.TfdsSource("celeb_a_hq/256", "train", data_dir=str(tmp_path))
    msg = str(err.value)
    default_manual = os.path.join(str(tmp_path), "downloads", "manual")
    assert "celeb_a_hq" in msg and default_manual in msg and "data1024x1024.tar" in msg
