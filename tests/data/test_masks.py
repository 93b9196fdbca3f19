"""Inpainting masks: shapes and values, coverage, box sides, stroke thickness, masked images, resizing, jit."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch

from lidiff.data.masks import MASK_KINDS, box_masks, freeform_masks, mask_images, random_masks, resize_mask
from lidiff.errors import ConfigError

N, H, W = 64, 32, 40  # one batch shape for most tests, so each jitted function compiles once


@jax.jit
def all_kinds(rng):
    """{kind: random_masks(rng, N, H, W, kind=kind)}, compiled once for the module."""
    return {kind: random_masks(rng, N, H, W, kind=kind) for kind in MASK_KINDS}


@functools.partial(jax.jit, static_argnums=(1, 2, 3), static_argnames=("max_strokes", "max_vertices", "width_range",
                                                                        "length_range"))
def freeform_jit(rng, batch, height, width, **kwargs):
    return freeform_masks(rng, batch, height, width, **kwargs)


def bbox(mask2d):
    rows, cols = np.flatnonzero(mask2d.any(axis=1)), np.flatnonzero(mask2d.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_shape_values_coverage_under_jit(kind):
    m = np.asarray(all_kinds(jax.random.key(0))[kind])
    assert m.shape == (N, H, W, 1) and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    cov = m.mean(axis=(1, 2, 3))
    # Measured coverage (key 0, 64 masks of 32x40), mean (min..max): box 0.154 (0.056..0.312), freeform 0.109
    # (0.008..0.236), mixed 0.165 (0.034..0.395).
    assert 0.1 <= cov.mean() <= 0.7, cov.mean()
    assert cov.min() > 0 and cov.max() < 1  # every mask non-empty and not full
    assert cov.std() > 0.02  # masks vary


def test_mixed_draws_box_freeform_and_union():
    """For one key, each mixed mask is that key's box mask, its free-form mask, or their union; all three occur."""
    out = {k: np.asarray(v) for k, v in all_kinds(jax.random.key(1)).items()}
    box, free, mixed = out["box"], out["freeform"], out["mixed"]
    union = np.maximum(box, free)
    seen = set()
    for i in range(N):
        kinds = [k for k, c in (("box", box), ("free", free), ("union", union)) if np.array_equal(mixed[i], c[i])]
        assert kinds, i
        seen.add("union" if kinds == ["union"] else kinds[0])
    assert seen == {"box", "free", "union"}


def test_deterministic_per_rng_and_rng_dependent():
    a, b, c = (all_kinds(jax.random.key(k)) for k in (5, 5, 6))
    for kind in MASK_KINDS:
        np.testing.assert_array_equal(a[kind], b[kind])
        assert float(jnp.abs(a[kind] - c[kind]).mean()) > 0.05, kind


def test_box_sides_within_requested_fractions():
    m = np.asarray(all_kinds(jax.random.key(2))["box"])[..., 0]  # min_frac=0.2, max_frac=0.6
    heights, widths = [], []
    for mask in m:
        r0, r1, c0, c1 = bbox(mask)
        assert mask.sum() == (r1 - r0) * (c1 - c0)  # a filled axis-aligned rectangle
        heights.append(r1 - r0)
        widths.append(c1 - c0)
    heights, widths = np.array(heights), np.array(widths)
    assert heights.min() >= round(0.2 * H) and heights.max() <= round(0.6 * H), (heights.min(), heights.max())
    assert widths.min() >= round(0.2 * W) and widths.max() <= round(0.6 * W), (widths.min(), widths.max())
    # spread over the range, not a constant
    assert heights.max() - heights.min() >= 0.7 * (0.6 - 0.2) * H
    assert widths.max() - widths.min() >= 0.7 * (0.6 - 0.2) * W
    # placement covers the image: boxes touch every border somewhere
    assert (m.any(axis=2)[:, 0]).any() and (m.any(axis=2)[:, -1]).any()
    assert (m.any(axis=1)[:, 0]).any() and (m.any(axis=1)[:, -1]).any()


def test_freeform_dots_have_the_requested_thickness_and_stroke_count():
    """Strokes of (almost) zero length are discs of diameter 0.25 * min(H, W): check area and extent of each lone
    disc, and that the number of discs per mask varies in 1..max_strokes (unused stroke slots draw nothing)."""
    side, frac, max_strokes = 64, 0.25, 4
    m = np.asarray(freeform_jit(jax.random.key(3), 32, side, side, max_strokes=max_strokes, max_vertices=2,
                                width_range=(frac, frac), length_range=(1e-4, 1e-4)))[..., 0]
    r = frac * side / 2
    areas, counts = [], []
    for mask in m:
        labels, n = scipy.ndimage.label(mask)
        counts.append(n)
        for j in range(1, n + 1):
            blob = labels == j
            r0, r1, c0, c1 = bbox(blob)
            if r0 == 0 or c0 == 0 or r1 == side or c1 == side or blob.sum() > 1.5 * math.pi * r * r:
                continue  # cut by the border, or two overlapping discs
            assert abs((r1 - r0) - 2 * r) <= 1.5 and abs((c1 - c0) - 2 * r) <= 1.5, (r1 - r0, c1 - c0, 2 * r)
            areas.append(blob.sum())
    assert len(areas) >= 16
    assert abs(np.mean(areas) / (math.pi * r * r) - 1) < 0.05, (np.mean(areas), math.pi * r * r)
    assert min(counts) == 1 and max(counts) <= max_strokes and len(set(counts)) >= 3, counts


def test_freeform_single_segment_is_one_capsule():
    """One stroke of one segment of length L and thickness 2r: one connected piece, no bigger than the capsule."""
    side, frac_w, frac_l = 64, 0.1, 0.3
    m = np.asarray(freeform_jit(jax.random.key(4), 32, side, side, max_strokes=1, max_vertices=2,
                                width_range=(frac_w, frac_w), length_range=(frac_l, frac_l)))[..., 0]
    r, length = frac_w * side / 2, frac_l * side
    for mask in m:
        assert scipy.ndimage.label(mask)[1] == 1
        r0, r1, c0, c1 = bbox(mask)
        assert max(r1 - r0, c1 - c0) <= length + 2 * r + 1
        assert min(r1 - r0, c1 - c0) >= 2 * r - 1 or min(r0, c0) == 0 or max(r1, c1) == side
        assert mask.sum() <= 2 * r * length + math.pi * r * r + 2 * math.pi * r  # capsule area + a pixel rim
    assert np.mean(m.sum(axis=(1, 2))) > 2 * math.pi * r * r  # segments have length, not just the end discs


def test_mask_images_keeps_known_pixels_and_blacks_out_unknown():
    images = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, (N, H, W, 3)).astype(np.float32))
    masks = all_kinds(jax.random.key(7))["mixed"]
    out = np.asarray(jax.jit(mask_images)(images, masks))
    known = np.broadcast_to(np.asarray(masks) == 0, out.shape)
    np.testing.assert_array_equal(out[known], np.asarray(images)[known])
    np.testing.assert_array_equal(out[~known], -1.0)
    with pytest.raises(ValueError, match=r"masks must be \[B, H, W, 1\] matching images"):
        mask_images(images, masks[:, :-1])


@pytest.mark.parametrize("src,dst", [((32, 40), (8, 10)), ((37, 45), (16, 20)), ((20, 24), (40, 36))])
def test_resize_mask_matches_torch_nearest(src, dst):
    m = (np.random.default_rng(8).random((4, *src, 1)) < 0.5).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(m).permute(0, 3, 1, 2), size=dst)
    ref = ref.permute(0, 2, 3, 1).numpy()
    out = np.asarray(jax.jit(resize_mask, static_argnums=1)(jnp.asarray(m), dst))
    assert out.shape == (4, *dst, 1) and out.dtype == np.float32
    assert set(np.unique(out)) <= {0.0, 1.0}
    np.testing.assert_array_equal(out, ref)


def test_refusals_name_the_problem():
    key = jax.random.key(0)
    with pytest.raises(ConfigError, match=r"unknown mask kind 'ring'.*box, freeform, mixed"):
        random_masks(key, 2, 16, 16, kind="ring")
    with pytest.raises(ValueError, match=r"box \(min_frac, max_frac\).*0.7, 0.5"):
        box_masks(key, 2, 16, 16, min_frac=0.7, max_frac=0.5)
    with pytest.raises(ValueError, match="width_range"):
        freeform_masks(key, 2, 16, 16, width_range=(0.0, 0.1))
    with pytest.raises(ValueError, match="max_vertices must be an int >= 2"):
        freeform_masks(key, 2, 16, 16, max_vertices=1)
    with pytest.raises(ValueError, match="height must be a positive int"):
        box_masks(key, 2, 0, 16)
    with pytest.raises(ValueError, match="size must be"):
        resize_mask(jnp.zeros((1, 8, 8, 1)), (0, 4))
