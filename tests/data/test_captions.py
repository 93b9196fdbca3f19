"""Caption sources: sidecar .txt folder, JSONL/CSV manifests, tfds text features, captioned digits."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds  # a test requirement, as in test_sources.py
from PIL import Image

from lidiff.data import captions
from lidiff.data.captions import DIGIT_WORDS
from lidiff.data.pipeline import DataLoader


def _write_image(path, seed, size=(5, 6)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return image


# ---------------------------------------------------------------------------------------------- sidecar folder


def test_folder_with_sidecar_captions_skips_uncaptioned_images(tmp_path):
    cat = _write_image(str(tmp_path / "a" / "cat.png"), 0)
    (tmp_path / "a" / "cat.txt").write_text("  a cat on a mat\n", encoding="utf-8")
    _write_image(str(tmp_path / "b" / "dog.png"), 1)  # no dog.txt
    _write_image(str(tmp_path / "b" / "owl.png"), 2)
    (tmp_path / "b" / "owl.txt").write_text("   \n")  # blank
    tree = _write_image(str(tmp_path / "tree.png"), 3)
    (tmp_path / "tree.txt").write_text("une forêt")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.txt").write_text("never decoded")

    src = captions.CaptionedFolderSource(str(tmp_path))
    assert len(src) == 5  # captions are not images
    by_name = {os.path.basename(src.describe(i)): src[i] for i in range(len(src))}
    assert by_name["cat.png"]["caption"] == "a cat on a mat"
    np.testing.assert_array_equal(by_name["cat.png"]["image"], cat)
    assert by_name["tree.png"]["caption"] == "une forêt"
    np.testing.assert_array_equal(by_name["tree.png"]["image"], tree)
    assert by_name["dog.png"]["caption"] is None and by_name["owl.png"]["caption"] is None  # the field skips them
    assert by_name["broken.png"] is None  # unreadable
    assert sorted(src.captions()) == ["a cat on a mat", "never decoded", "une forêt"]
    assert src.caption_path(0).endswith(".txt")

    with DataLoader(src, global_batch_size=2, resolution=4, num_threads=1) as loader:
        batches = [b for _, b in loader.iterate(0, num_steps=2)]
    assert all(b["image"].shape == (2, 4, 4, 3) for b in batches)


# ---------------------------------------------------------------------------------------------- manifests


def test_jsonl_manifest_resolves_relative_paths(tmp_path):
    one = _write_image(str(tmp_path / "imgs" / "1.png"), 4)
    two = _write_image(str(tmp_path / "elsewhere" / "2.png"), 5)
    lines = [
        json.dumps({"image": "imgs/1.png", "caption": "first"}),
        "",
        json.dumps({"image": str(tmp_path / "elsewhere" / "2.png"), "caption": "second ", "extra": 1}),
        json.dumps({"image": "imgs/missing.png", "caption": "gone"}),
        json.dumps({"image": "imgs/1.png", "caption": ""}),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    src = captions.CaptionManifestSource(str(tmp_path / "m.jsonl"))
    assert len(src) == 4
    assert src[0]["caption"] == "first" and src[1]["caption"] == "second"
    np.testing.assert_array_equal(src[0]["image"], one)
    np.testing.assert_array_equal(src[1]["image"], two)
    assert src[2] is None and src[3] is None  # unreadable image, blank caption
    assert src.describe(0) == str(tmp_path / "imgs" / "1.png")
    assert src.captions() == ["first", "second", "gone"]


def test_csv_manifest(tmp_path):
    image = _write_image(str(tmp_path / "x.png"), 6)
    (tmp_path / "m.csv").write_text('image,caption\nx.png,"a red, round thing"\nx.png,plain\n')
    src = captions.CaptionManifestSource(str(tmp_path / "m.csv"))
    assert [src[i]["caption"] for i in range(2)] == ["a red, round thing", "plain"]
    np.testing.assert_array_equal(src[1]["image"], image)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"image": "a.png", "caption": "ok"}\n\n{"image": "b.png", "caption": \n',
         r"line 3: not valid JSON"),
        ("bad.jsonl", '{"image": "a.png", "caption": "ok"}\n{"image": "b.png"}\n', r"line 2: missing 'caption'"),
        ("bad.jsonl", '["a.png", "ok"]\n', r"line 1: expected a JSON object"),
        ("bad.jsonl", '{"image": "a.png", "caption": 7}\n', r"line 1: 'caption' must be a string"),
        ("bad.csv", "path,text\na.png,x\n", r"line 1: the header must name image and caption"),
        ("bad.csv", "image,caption\na.png,x\nb.png\n", r"line 3: missing 'caption'"),
        ("bad.txt", "a.png\tx\n", r"unknown format '\.txt'"),
    ],
)
def test_bad_manifest_lines_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        captions.CaptionManifestSource(str(tmp_path / name))
    assert str(tmp_path / name) in str(err.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        captions.CaptionManifestSource(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------------------------- digits


def test_digit_captions_name_their_label_in_several_phrasings():
    src = captions.DigitsCaptionSource(seed=0)
    assert len(src) == 1797 and src.num_classes == 10
    caps = src.captions()
    for i in range(0, len(src), 7):
        ex = src[i]
        assert ex["image"].shape == (8, 8, 3) and ex["caption"] == caps[i]
        label = ex["label"]
        named = {w for w in DIGIT_WORDS if w in ex["caption"].split()} | {
            int(t) for t in ex["caption"].split() if t.isdigit()}
        assert named in ({label}, {DIGIT_WORDS[label]}), (label, ex["caption"])
    templates = {c.replace(DIGIT_WORDS[src[i]["label"]], "W").replace(str(src[i]["label"]), "N")
                 for i, c in enumerate(caps)}
    assert len(templates) >= 6 and any("W" in t for t in templates) and any("N" in t for t in templates)
    assert captions.DigitsCaptionSource(seed=0).captions() == caps  # deterministic
    other = captions.DigitsCaptionSource(seed=1).captions()
    assert other != caps and sum(a != b for a, b in zip(caps, other)) > len(caps) // 2


def test_digit_prompts_vary_per_digit():
    prompts = captions.digit_prompts([7, 7, 7, 3, 3], seed=0)
    assert len(prompts) == 5 and len(set(prompts[:3])) == 3 and len(set(prompts[3:])) == 2
    assert all("7" in p.split() or "seven" in p.split() for p in prompts[:3])
    assert all("3" in p.split() or "three" in p.split() for p in prompts[3:])
    assert captions.digit_prompts([7], seed=1) != captions.digit_prompts([7], seed=0)
    with pytest.raises(ValueError, match="12"):
        captions.digit_prompts([12])


# ---------------------------------------------------------------------------------------------- tfds


_TINY = [
    ("red square", "a red block"),
    ("blue sky",),
    ("green field", "grass", "a meadow"),
]


class LidiffTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """3 images with 1-3 captions each, nested like coco_captions (``captions/text``)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                "title": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, texts in enumerate(_TINY):
            image = np.full((4 + i, 5, 3), 40 * i, np.uint8)
            yield i, {"image": image, "captions": {"text": list(texts)}, "title": texts[0]}


def test_tfds_caption_source_nested_and_flat_text(tmp_path):
    data_dir = str(tmp_path / "tfds")
    src = captions.TfdsCaptionSource("lidiff_tiny_captions", "train", caption_key="captions/text", data_dir=data_dir)
    assert len(src) == 3
    for i in range(3):
        ex = src[i]
        k = ex["image"].shape[0] - 4  # which example (tfds stores them shuffled)
        assert ex["image"].dtype == np.uint8 and (ex["image"] == 40 * k).all()
        assert ex["caption"] == _TINY[k][i % len(_TINY[k])]
    shifted = captions.TfdsCaptionSource("lidiff_tiny_captions", "train", caption_key="captions/text",
                                         data_dir=data_dir, caption_seed=1)
    assert [shifted[i]["caption"] for i in range(3)] != [src[i]["caption"] for i in range(3)]
    assert sorted(src.captions()) == sorted(c for texts in _TINY for c in texts)
    flat = captions.TfdsCaptionSource("lidiff_tiny_captions", "train", caption_key="title", data_dir=data_dir)
    assert sorted(flat[i]["caption"] for i in range(3)) == sorted(t[0] for t in _TINY)
    with pytest.raises(KeyError, match=r"no feature 'txt'.*\['text'\]"):
        captions.TfdsCaptionSource("lidiff_tiny_captions", "train", caption_key="captions/txt", data_dir=data_dir)
