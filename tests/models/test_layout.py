"""Layout tokens (lidiff.models.layout): CompVis object-bbox tokenisation without crop tokens."""

import math

import jax
import numpy as np
import pytest

from lidiff.models import layout


def _compvis_coordinate(x, y, vocab_size):
    """The taming-transformers formula, in plain Python floats, as an independent reference."""
    s = int(math.sqrt(vocab_size))
    return int(round(y * (s - 1))) * s + int(round(x * (s - 1)))


def test_hand_computed_tokens_vocab_8192():
    # S = 90: (0.1, 0.2) -> y 18, x 9 -> 18*90 + 9; (0.5, 0.9) -> x round(44.5) = 44 (half to even), y 80.
    boxes = np.array([[[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 0.0, 0.0]]], np.float32)
    labels = np.array([[7, -1]])
    tokens = np.asarray(layout.layout_tokens(boxes, labels, num_classes=600, vocab_size=8192))
    assert tokens.dtype == np.int32 and tokens.shape == (1, 6)
    np.testing.assert_array_equal(tokens, [[7, 18 * 90 + 9, 80 * 90 + 44, 8191, 8191, 8191]])


def test_small_grid_corners_and_padding_anywhere():
    # vocab 17 -> S = 4 (cells 0..15), none = 16.
    boxes = np.array([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.34, 0.66, 0.66, 1.0]]], np.float32)
    labels = np.array([[-1, 3, 0]])
    tokens = np.asarray(layout.layout_tokens(boxes, labels, num_classes=5, vocab_size=17))
    np.testing.assert_array_equal(tokens, [[16, 16, 16, 3, 0, 15, 0, 2 * 4 + 1, 3 * 4 + 2]])


def test_matches_compvis_formula_on_random_boxes():
    rng = np.random.default_rng(0)
    lo = rng.uniform(0, 0.5, (3, 5, 2)).astype(np.float32)
    boxes = np.concatenate([lo, lo + rng.uniform(0.05, 0.5, (3, 5, 2)).astype(np.float32)], -1)
    labels = rng.integers(-1, 30, (3, 5))
    tokens = np.asarray(layout.layout_tokens(boxes, labels, num_classes=30, vocab_size=8192))
    for b in range(3):
        expected = []
        for k in range(5):
            if labels[b, k] < 0:
                expected += [8191] * 3
            else:
                x0, y0, x1, y1 = (float(v) for v in boxes[b, k])
                expected += [int(labels[b, k]), _compvis_coordinate(x0, y0, 8192), _compvis_coordinate(x1, y1, 8192)]
        np.testing.assert_array_equal(tokens[b], expected)


def test_null_layout_is_all_none_and_jit_matches_eager():
    boxes, labels = layout.null_layout(2, 4)
    assert boxes.shape == (2, 4, 4) and labels.shape == (2, 4)
    fn = jax.jit(lambda b, l: layout.layout_tokens(b, l, num_classes=10, vocab_size=8192))
    np.testing.assert_array_equal(np.asarray(fn(boxes, labels)), np.full((2, 12), 8191))
    rng = np.random.default_rng(1)
    b = np.sort(rng.uniform(0, 1, (2, 4, 4)).astype(np.float32), -1)
    l = rng.integers(-1, 10, (2, 4))
    eager = layout.layout_tokens(b, l, num_classes=10, vocab_size=8192)
    np.testing.assert_array_equal(np.asarray(fn(b, l)), np.asarray(eager))


def test_different_layouts_give_different_tokens():
    boxes = np.array([[[0.1, 0.1, 0.4, 0.4]], [[0.5, 0.5, 0.9, 0.9]], [[0.1, 0.1, 0.4, 0.4]]], np.float32)
    labels = np.array([[2], [2], [5]])
    tokens = np.asarray(layout.layout_tokens(boxes, labels, num_classes=10, vocab_size=8192))
    assert len({tuple(t) for t in tokens}) == 3


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="perfect square"):
        layout.layout_tokens(np.zeros((1, 1, 4)), np.zeros((1, 1), int), num_classes=3, vocab_size=16)
    with pytest.raises(ValueError, match="num_classes"):
        layout.layout_tokens(np.zeros((1, 1, 4)), np.zeros((1, 1), int), num_classes=17, vocab_size=17)
    with pytest.raises(ValueError, match=r"\[B, K, 4\]"):
        layout.layout_tokens(np.zeros((1, 4)), np.zeros((1,), int), num_classes=3, vocab_size=17)
    with pytest.raises(ValueError, match="labels must be"):
        layout.layout_tokens(np.zeros((1, 2, 4)), np.zeros((1, 3), int), num_classes=3, vocab_size=17)


def test_layout_map_hand_computed_coverage():
    # a 4x4 grid (cells of 0.25): x in [0.25, 0.6) covers column 1 fully and 0.35 / 0.25 = 40% of column 2;
    # y in [0, 0.5) covers rows 0 and 1. The empty slot draws nothing; other classes stay zero.
    boxes = np.array([[[0.25, 0.0, 0.6, 0.5], [0.0, 0.0, 1.0, 1.0]]], np.float32)
    m = np.asarray(layout.layout_map(boxes, np.array([[2, -1]]), num_classes=3, size=(4, 4)))
    assert m.shape == (1, 4, 4, 3) and m.dtype == np.float32
    expected = np.zeros((4, 4), np.float32)
    expected[:2, 1], expected[:2, 2] = 1.0, 0.4
    np.testing.assert_allclose(m[0, ..., 2], expected, atol=1e-6)
    assert not m[0, ..., :2].any()


def test_layout_map_against_a_supersampled_raster():
    # coverage = the fraction of each cell's area inside the box: compare with a 64x-supersampled point raster
    rng = np.random.default_rng(1)
    lo = rng.uniform(0, 0.6, (2, 3, 2)).astype(np.float32)
    boxes = np.concatenate([lo, lo + rng.uniform(0.05, 0.4, (2, 3, 2)).astype(np.float32)], -1)
    labels = np.array([[0, 1, 2], [3, 3, -1]])
    h, w, s = 6, 5, 64
    m = np.asarray(layout.layout_map(boxes, labels, num_classes=4, size=(h, w)))
    ys, xs = (np.arange(h * s) + 0.5) / (h * s), (np.arange(w * s) + 0.5) / (w * s)
    for b in range(2):
        for c in range(4):
            want = np.zeros((h, w))
            for k in np.flatnonzero(labels[b] == c):
                x0, y0, x1, y1 = boxes[b, k]
                inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
                want = np.maximum(want, inside.reshape(h, s, w, s).mean(axis=(1, 3)))
            np.testing.assert_allclose(m[b, ..., c], want, atol=2.5 / s)


def test_layout_map_of_no_boxes_is_zero():
    boxes, labels = layout.null_layout(2, 3)
    assert not np.asarray(layout.layout_map(boxes, labels, num_classes=5, size=(3, 3))).any()
