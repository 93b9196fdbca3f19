"""Data fields: labels, caption token ids and layout boxes carried by the DataLoader and the latent cache."""

import logging

import numpy as np
import pytest
from PIL import Image

from lidiff.data import captions, layouts, sources, transforms
from lidiff.data.fields import CaptionTokensField, LabelField, LayoutField, fields_for
from lidiff.data.latents import CachedLatentLoader, build_latent_cache
from lidiff.data.pipeline import DataLoader
from lidiff.data.text import build_wordpiece_tokenizer, tokenize
from lidiff.errors import ConfigError, DataError, MissingInputError

WORDS = ("red", "green", "blue", "small", "large", "round", "square", "bright", "dark", "striped", "dotted", "plain")
H, W = 24, 40  # landscape: resize + centre crop to R cuts columns off both sides
MAX_LENGTH = 8


def caption_of(i):
    return f"a {WORDS[i % len(WORDS)]} {WORDS[(i // len(WORDS)) % len(WORDS)]} box"


class MarkedSource(sources.Source):
    """Example i: a black H x W image whose channel 0 is 10 * i everywhere (to identify it after resizing) and whose
    channel 1 is 255 inside box 0 (pixels x 10+i..18+i, y 4..14, to follow crops and flips); box 1 lies left of
    the centre crop. Caption ``caption_of(i)``, except for indices in ``no_caption`` (missing or blank), label
    i % 3."""

    num_classes = 3

    def __init__(self, n, no_caption=()):
        self.n, self.no_caption = n, set(no_caption)

    def __len__(self):
        return self.n

    @staticmethod
    def rect(i):
        return 10 + i, 4, 18 + i, 14  # left, top, right, bottom (exclusive)

    def __getitem__(self, i):
        image = np.zeros((H, W, 3), np.uint8)
        image[..., 0] = 10 * i
        left, top, right, bottom = self.rect(i)
        image[top:bottom, left:right, 1] = 255
        boxes = np.array([[left / W, top / H, right / W, bottom / H], [0.0, 0.1, 5 / W, 0.5]], np.float32)
        example = {"image": image, "label": i % 3, "boxes": boxes, "box_labels": np.array([i % 10, 7], np.int32)}
        if i not in self.no_caption:
            example["caption"] = caption_of(i)
        elif i % 2:
            example["caption"] = "   "  # blank counts as missing
        return example


def indices(batch):
    """Source indices of the rows of a MarkedSource batch."""
    return np.rint(transforms.to_uint8(batch["image"])[:, 0, 0, 0] / 10).astype(int)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [caption_of(i) for i in range(len(WORDS) ** 2)] + captions.DigitsCaptionSource(0).captions()[:200]
    return build_wordpiece_tokenizer(texts, str(tmp_path_factory.mktemp("tokenizer")), vocab_size=200)


def stream(loader, start, num):
    return [b for _, b in loader.iterate(start, num)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------------------------------- fields


def test_fields_for_each_kind_and_refusals(tokenizer):
    assert fields_for("none") == []
    (label,) = fields_for("class")
    assert isinstance(label, LabelField) and label.specs == {"label": ((), np.int32)}
    (text,) = fields_for("text", tokenizer=tokenizer, max_length=5)
    assert isinstance(text, CaptionTokensField) and text.specs == {"tokens": ((5,), np.int32)}
    (layout,) = fields_for("layout", max_boxes=4)
    assert isinstance(layout, LayoutField)
    assert layout.specs == {"boxes": ((4, 4), np.float32), "box_labels": ((4,), np.int32)}
    with pytest.raises(ValueError, match=r"'captions'.*none, class, text, layout"):
        fields_for("captions")
    with pytest.raises(ValueError, match="tokenizer"):
        fields_for("text")
    with pytest.raises(ValueError, match="max_boxes"):
        fields_for("layout")
    assert text({"image": None}, (4, 4), 4, False) == "no caption"
    assert text({"caption": " "}, (4, 4), 4, False) == "no caption"
    assert "boxes" in layout({"caption": "x"}, (4, 4), 4, False)
    assert "label" in label({}, (4, 4), 4, False)


def test_loader_refuses_clashing_keys_and_fields_breaking_their_spec():
    src = MarkedSource(4)
    with pytest.raises(ValueError, match="'label'.*already used"):
        DataLoader(src, global_batch_size=2, resolution=8, fields=[LabelField(), LabelField()])

    class Wrong(LabelField):
        def __call__(self, example, image_hw, resolution, flip):
            return {"label": np.zeros(3, np.int32)}

    with DataLoader(src, global_batch_size=2, resolution=8, num_threads=0, fields=[Wrong()]) as loader:
        with pytest.raises(ValueError, match=r"Wrong\(label\) returned shape \(3,\) for 'label'; its spec is shape"):
            loader.batch_at(0)


def test_default_fields_are_the_label_when_the_source_has_classes():
    with DataLoader(MarkedSource(6), global_batch_size=2, resolution=8) as loader:
        assert loader.field_names == ("label",) and loader.has_labels
        batch = loader.batch_at(1)
    assert batch.keys() == {"image", "label"} and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], indices(batch) % 3)
    with DataLoader(sources.SyntheticSource(4, 8), global_batch_size=2, resolution=8) as loader:
        assert loader.field_names == () and not loader.has_labels
        assert loader.batch_at(0).keys() == {"image"}
    with DataLoader(MarkedSource(6), global_batch_size=2, resolution=8, fields=[]) as loader:
        assert loader.field_names == () and not loader.has_labels
        assert loader.batch_at(0).keys() == {"image"}


# ---------------------------------------------------------------------------------------------- text tokens


def test_batches_carry_the_tokens_of_each_rows_caption(tokenizer):
    src = captions.DigitsCaptionSource(seed=3)
    fields = [LabelField(), *fields_for("text", tokenizer=tokenizer, max_length=MAX_LENGTH)]
    with DataLoader(src, global_batch_size=8, resolution=8, seed=1, num_threads=4, fields=fields) as loader:
        assert loader.field_names == ("label", "tokens") and loader.has_labels
        batches = stream(loader, 0, 3)
        rows = [[loader.index_at(p) for p in loader.local_positions(s)] for s in range(3)]
    for batch, row_indices in zip(batches, rows):
        assert batch.keys() == {"image", "label", "tokens"}
        assert batch["image"].shape == (8, 8, 8, 3) and batch["tokens"].shape == (8, MAX_LENGTH)
        assert batch["tokens"].dtype == np.int32 and batch["label"].dtype == np.int32
        expected = tokenize(tokenizer, [src.caption(i) for i in row_indices], MAX_LENGTH)
        np.testing.assert_array_equal(batch["tokens"], expected)
        np.testing.assert_array_equal(batch["label"], src.digits.labels[row_indices])
        np.testing.assert_array_equal(transforms.to_uint8(batch["image"]),
                                      [transforms.resize_center_crop(src[i]["image"], 8) for i in row_indices])
    tokens = np.concatenate([b["tokens"] for b in batches])
    assert len({tuple(t) for t in tokens}) > 4  # captions differ, and so do their ids
    assert (tokens[:, 0] == tokenizer.cls_token_id).all()


def test_uncaptioned_examples_are_skipped_counted_and_logged_with_the_reason(tokenizer, caplog):
    n, no_caption = 12, {2, 5, 6}
    src = MarkedSource(n, no_caption=no_caption)
    fields = fields_for("text", tokenizer=tokenizer, max_length=MAX_LENGTH)
    caplog.set_level(logging.WARNING)
    with DataLoader(src, global_batch_size=4, resolution=16, num_threads=2, fields=fields) as loader:
        batches = stream(loader, 0, 6)  # two epochs
        expected, skipped = [], 0
        for position in range(24):
            k = 0
            while loader.index_at(position + k) in no_caption:
                k += 1
            expected.append(loader.index_at(position + k))
            skipped += k
        assert loader.num_skipped == skipped >= 6  # each bad index sits in both epochs
    got = np.concatenate([indices(b) for b in batches])
    np.testing.assert_array_equal(got, expected)
    assert all(b["tokens"].shape == (4, MAX_LENGTH) for b in batches)  # batches stay full
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches]),
                                  tokenize(tokenizer, [caption_of(i) for i in got], MAX_LENGTH))
    warnings = [r.getMessage() for r in caplog.records if "no caption" in r.getMessage()]
    assert len(warnings) == len(no_caption)  # once per example


def test_folder_image_without_caption_file_is_skipped_and_batches_stay_full(tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        if i != 3:
            (tmp_path / f"img{i}.txt").write_text(caption_of(i))
    src = captions.CaptionedFolderSource(str(tmp_path))
    fields = fields_for("text", tokenizer=tokenizer, max_length=MAX_LENGTH)
    with DataLoader(src, global_batch_size=4, resolution=4, num_threads=2, fields=fields) as loader:
        batches = stream(loader, 0, 5)  # 4 epochs of 5 files
        assert loader.num_skipped == 4  # img3 once per epoch
    assert all(b["tokens"].shape == (4, MAX_LENGTH) and b["image"].shape == (4, 4, 4, 3) for b in batches)
    allowed = {tuple(t) for t in tokenize(tokenizer, [caption_of(i) for i in (0, 1, 2, 4)], MAX_LENGTH)}
    assert {tuple(t) for b in batches for t in b["tokens"]} == allowed


def test_all_uncaptioned_raises_naming_the_reason(tokenizer):
    src = MarkedSource(3, no_caption=range(3))
    fields = fields_for("text", tokenizer=tokenizer)
    with DataLoader(src, global_batch_size=2, resolution=8, fields=fields) as loader:
        with pytest.raises(DataError, match="none of the 3 examples.*no caption.*tokens"):
            loader.batch_at(0)


# ------------------------------------------------------------------------------------------------- layouts


def _assert_box_covers_blob(image, box):
    """Channel 1 of ``image`` uint8 [R, R, 3] is bright exactly within ``box`` (fractions), to one pixel."""
    r = image.shape[0]
    ys, xs = np.nonzero(image[..., 1] > 127)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    np.testing.assert_allclose(found, np.asarray(box, np.float64) * r, atol=1.0)


def test_boxes_move_with_the_image_through_crop_and_flip():
    src, r = MarkedSource(9), 16
    with DataLoader(src, global_batch_size=6, resolution=r, random_flip=True, seed=4, num_threads=2,
                    fields=fields_for("layout", max_boxes=3)) as loader:
        assert loader.field_names == ("boxes", "box_labels")
        batches = stream(loader, 0, 4)
        flips = np.concatenate([loader.local_flips(s) for s in range(4)])
    assert 0 < flips.sum() < len(flips)  # both flipped and unflipped rows
    images = np.concatenate([transforms.to_uint8(b["image"]) for b in batches])
    boxes = np.concatenate([b["boxes"] for b in batches])
    labels = np.concatenate([b["box_labels"] for b in batches])
    assert boxes.shape == (24, 3, 4) and boxes.dtype == np.float32
    assert labels.shape == (24, 3) and labels.dtype == np.int32
    rows = np.concatenate([indices(b) for b in batches])
    scaled_w = round(W * r / H)  # H -> r, W -> 27: 5 columns cropped on the left
    for image, box, label, flip, i in zip(images, boxes, labels, flips, rows):
        assert label.tolist() == [i % 10, -1, -1]  # box 1 lies outside the crop; empty slots pad
        assert not box[1:].any()
        _assert_box_covers_blob(image, box[0])
        left, top, right, bottom = MarkedSource.rect(i)
        x0, x1 = ((x / W * scaled_w - (scaled_w - r) // 2) / r for x in (left, right))
        expected = [1 - x1, top / H, 1 - x0, bottom / H] if flip else [x0, top / H, x1, bottom / H]
        np.testing.assert_allclose(box[0], expected, atol=1e-6)


def test_digit_layouts_through_the_loader_equal_the_transformed_source_boxes():
    src = layouts.DigitsLayoutSource(num_examples=10, canvas=32, seed=2)
    with DataLoader(src, global_batch_size=5, resolution=16, random_flip=True, seed=0, num_threads=0,
                    fields=fields_for("layout", max_boxes=4)) as loader:
        for step in range(2):
            batch = loader.batch_at(step)
            for row, (p, flip) in enumerate(zip(loader.local_positions(step), loader.local_flips(step))):
                ex = src[loader.index_at(p)]
                b, lab = layouts.boxes_after_resize_center_crop(ex["boxes"], ex["box_labels"], (32, 32), 16)
                if flip:
                    b, lab = layouts.boxes_after_hflip(b, lab)
                b, lab = layouts.pad_boxes(b, lab, 4)
                np.testing.assert_array_equal(batch["boxes"][row], b)
                np.testing.assert_array_equal(batch["box_labels"][row], lab)
                assert 1 <= (lab >= 0).sum() <= 3


# -------------------------------------------------------------------------------- determinism and sharding


def _all_fields(tokenizer):
    return [LabelField(), CaptionTokensField(tokenizer, MAX_LENGTH), LayoutField(2)]


def test_batch_at_equals_iterate_and_resume_with_fields(tokenizer):
    src = MarkedSource(10, no_caption={4})
    kw = dict(global_batch_size=4, resolution=8, random_flip=True, seed=7, prefetch=3)
    with DataLoader(src, num_threads=3, fields=_all_fields(tokenizer), **kw) as loader:
        full = stream(loader, 0, 8)
    with DataLoader(src, num_threads=0, fields=_all_fields(tokenizer), **kw) as loader:  # a fresh process
        assert_batches_equal(full[5:], stream(loader, 5, 3))
        for s in (0, 3, 6):
            assert_batches_equal([full[s]], [loader.batch_at(s)])
    assert full[0].keys() == {"image", "label", "tokens", "boxes", "box_labels"}


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_stack_into_the_one_process_batch_with_fields(tokenizer, process_count):
    src = MarkedSource(20, no_caption={3, 11})
    kw = dict(global_batch_size=8, resolution=8, random_flip=True, seed=5, num_threads=2)
    with DataLoader(src, fields=_all_fields(tokenizer), **kw) as single:
        whole = stream(single, 0, 3)
    parts = []
    for p in range(process_count):
        with DataLoader(src, process_index=p, process_count=process_count, fields=_all_fields(tokenizer),
                        **kw) as loader:
            parts.append(stream(loader, 0, 3))
    for step, full in enumerate(whole):
        stacked = {k: np.concatenate([part[step][k] for part in parts]) for k in full}
        assert_batches_equal([stacked], [full])


# -------------------------------------------------------------------------------------------- latent cache


def _encode(images):
    """A stand-in first stage: images [B, R, R, 3] -> {"mean": [B, R/2, R/2, 3], "logvar": zeros}."""
    mean = images[:, ::2, ::2]
    return {"mean": mean, "logvar": np.zeros_like(mean)}


def test_latent_cache_stores_fields_aligned_with_the_encodings(tokenizer, tmp_path):
    n, no_caption = 9, {0, 4, 5}  # a leading unusable row takes the first usable example
    src = MarkedSource(n, no_caption=no_caption)
    path = str(tmp_path / "latents.npz")
    build_latent_cache(src, _encode, path, resolution=8, batch_size=4, fields=_all_fields(tokenizer))
    with np.load(path) as data:
        assert sorted(data.files) == ["_fields", "box_labels", "boxes", "label", "logvar", "mean", "tokens"]
        assert data["_fields"].tolist() == ["label", "tokens", "boxes", "box_labels"]
        cache = {k: data[k] for k in data.files}
    rows = np.rint(transforms.to_uint8(cache["mean"])[:, 0, 0, 0] / 10).astype(int)  # which example each row is
    np.testing.assert_array_equal(rows, [1, 1, 2, 3, 3, 3, 6, 7, 8])
    for row, i in enumerate(rows):  # the fields of the example the row's latent came from, unflipped
        np.testing.assert_array_equal(cache["tokens"][row], tokenize(tokenizer, [caption_of(i)], MAX_LENGTH)[0])
        assert cache["label"][row] == i % 3
        expected = LayoutField(2)(src[i], (H, W), 8, False)
        np.testing.assert_array_equal(cache["boxes"][row], expected["boxes"])
        np.testing.assert_array_equal(cache["box_labels"][row], expected["box_labels"])
        assert cache["box_labels"][row].tolist() == [i % 10, -1]
    assert cache["tokens"].dtype == np.int32 and cache["boxes"].dtype == np.float32

    loader = CachedLatentLoader(path, global_batch_size=4, seed=2, required=("mean", "logvar", "tokens", "boxes"))
    assert loader.field_names == ("label", "tokens", "boxes", "box_labels") and loader.has_labels
    batch = loader.batch_at(3)
    assert batch.keys() == {"mean", "logvar", "label", "tokens", "boxes", "box_labels"}
    for key, value in batch.items():
        np.testing.assert_array_equal(value, cache[key][loader.rows(3)])


def test_latent_cache_defaults_to_the_label_and_refuses_another_conditioning(tmp_path):
    path = str(tmp_path / "c" / "latents.npz")
    build_latent_cache(MarkedSource(5), _encode, path, resolution=8, batch_size=2)
    with np.load(path) as data:
        assert sorted(data.files) == ["_fields", "label", "logvar", "mean"]
        np.testing.assert_array_equal(data["label"], np.arange(5) % 3)
    assert CachedLatentLoader(path, global_batch_size=2, required=("mean", "label")).field_names == ("label",)
    with pytest.raises(DataError) as err:
        CachedLatentLoader(path, global_batch_size=2, required=("mean", "tokens"))
    msg = str(err.value)
    assert "'tokens'" in msg and path in msg and "another conditioning" in msg and "Delete it" in msg


def test_latent_cache_with_no_usable_example_raises(tokenizer, tmp_path):
    with pytest.raises(DataError, match="none of the 3 examples.*no caption"):
        build_latent_cache(MarkedSource(3, no_caption=range(3)), _encode, str(tmp_path / "x.npz"), resolution=8,
                           batch_size=2, fields=fields_for("text", tokenizer=tokenizer))


# ----------------------------------------------------------------------------------------- config wiring


def test_make_loader_builds_the_caption_and_layout_sources_and_names_empty_fields(tmp_path):
    from configs.base import data_config
    from lidiff.train.common import make_loader, make_source_from_config

    data = data_config("digits_captions", resolution=8, num_threads=0)
    with make_loader(data, 4, seed=1, fields=fields_for("class")) as loader:
        assert isinstance(loader.source, captions.DigitsCaptionSource) and loader.source.seed == 1
        assert loader.batch_at(0)["label"].shape == (4,)
    data = data_config("digits_layout", resolution=32, num_examples=6, max_boxes=2, num_threads=0)
    source = make_source_from_config(data, seed=0)
    assert isinstance(source, layouts.DigitsLayoutSource) and len(source) == 6 and source.max_digits == 2
    with make_loader(data, 2, seed=0, fields=fields_for("layout", max_boxes=2)) as loader:
        assert loader.batch_at(0)["boxes"].shape == (2, 2, 4)

    for kind, field, example in [("captioned_folder", "path", "--config.data.path="),
                                 ("caption_manifest", "path", ".jsonl"),
                                 ("tfds_captions", "tfds_name", "coco_captions"),
                                 ("coco_layout", "annotation_json", "instances_train2017.json")]:
        with pytest.raises(ConfigError, match=f"config.data.{field} is empty.*{example}"):
            make_loader(data_config(kind), 2, seed=0)
    with pytest.raises(ConfigError, match="config.data.caption_key is empty.*captions/text"):
        make_loader(data_config("tfds_captions", tfds_name="coco_captions"), 2, seed=0)
    with pytest.raises(ConfigError, match="unknown config.data.source 'captions'.*digits_layout"):
        make_source_from_config(data_config("captions"), seed=0)
    with pytest.raises(MissingInputError, match="none.json"):  # the source's own message names the missing file
        make_loader(data_config("coco_layout", annotation_json=str(tmp_path / "none.json"), path=str(tmp_path)),
                    2, seed=0)
