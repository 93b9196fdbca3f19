"""Tiled application of convolutional networks: tile offsets, blending windows, exactness and seams."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidiff.diffusion.tiling import FLOOR, blend_window, tile_starts, tiled_denoiser, tiled_map


class ConvNet(nn.Module):
    """Three 3x3 'SAME' convs with tanh in between: receptive-field radius 3."""

    features: int = 3

    @nn.compact
    def __call__(self, x):
        for f in (16, 16):
            x = jnp.tanh(nn.Conv(f, (3, 3), padding="SAME")(x))
        return nn.Conv(self.features, (3, 3), padding="SAME")(x)


RADIUS = 3


def _normal(seed, shape):
    """Standard-normal float32 test data drawn with numpy (jax.random.normal compiles for seconds on CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _conv_fn(seed=0, channels=3):
    """Random weights for ConvNet (kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2)), drawn with numpy: flax's own
    init costs seconds of compilation on CPU."""
    net = ConvNet()
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, channels)))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(size=leaf.shape) * scale, jnp.float32)

    params = jax.tree.map(draw, shapes)
    return lambda x: net.apply(params, x)


def _smooth_image(h=64, w=64):
    yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    img = np.stack([np.sin(2 * np.pi * yy + 0.3) * np.cos(4 * np.pi * xx),
                    np.cos(2 * np.pi * (yy + xx)),
                    np.sin(3 * np.pi * xx + 2 * np.pi * yy)], axis=-1)
    return img[None].astype(np.float32)


# ---------------------------------------------------------------------------------------------------- tile_starts


@pytest.mark.parametrize("size,tile,overlap,expected", [
    (10, 4, 1, (0, 3, 6)),
    (11, 4, 1, (0, 3, 6, 7)),       # last tile moved left to end at 11
    (9, 4, 0, (0, 4, 5)),
    (8, 4, 0, (0, 4)),
    (5, 4, 3, (0, 1)),
    (64, 24, 8, (0, 16, 32, 40)),
    (4, 4, 2, (0,)),
    (3, 4, 2, (0,)),
    (1, 1, 0, (0,)),
])
def test_tile_starts_hand_computed(size, tile, overlap, expected):
    assert tile_starts(size, tile, overlap) == expected


def test_tile_starts_cover_with_equal_tiles_and_enough_overlap():
    for size in range(1, 41):
        for tile in range(1, 13):
            for overlap in range(tile):
                starts = tile_starts(size, tile, overlap)
                if size <= tile:
                    assert starts == (0,)
                    continue
                assert starts[0] == 0 and starts[-1] + tile == size  # every tile has length `tile` inside [0, size)
                assert all(isinstance(s, int) for s in starts)
                covered = np.zeros(size, int)
                for s in starts:
                    covered[s:s + tile] += 1
                assert covered.min() >= 1
                gaps = np.diff(starts)
                assert gaps.min() >= 1, (size, tile, overlap, starts)
                assert (tile - gaps).min() >= overlap, (size, tile, overlap, starts)  # neighbour overlap


@pytest.mark.parametrize("tile,overlap,match", [
    (4, 4, "overlap must be smaller than tile"),
    (4, 5, "overlap must be smaller than tile"),
    (4, -1, "overlap must be >= 0"),
    (0, 0, "tile must be positive"),
    (-3, 0, "tile must be positive"),
])
def test_tile_starts_refuses_bad_arguments(tile, overlap, match):
    with pytest.raises(ValueError, match=match):
        tile_starts(10, tile, overlap)
    with pytest.raises(ValueError, match=match):
        blend_window(tile, overlap)
    with pytest.raises(ValueError, match=match):
        tiled_map(lambda x: x, jnp.zeros((1, 10, 10, 1)), tile=tile, overlap=overlap)


def test_refuses_bad_size_margin_and_shapes():
    with pytest.raises(ValueError, match="size must be positive"):
        tile_starts(0, 4, 1)
    with pytest.raises(TypeError, match="static Python int"):
        tile_starts(10, 4.0, 1)
    with pytest.raises(ValueError, match="margin"):
        blend_window(10, 4, margin=3)
    x = jnp.zeros((1, 20, 20, 2))
    with pytest.raises(ValueError, match="margin"):
        tiled_map(lambda t: t, x, tile=8, overlap=2, margin=2)
    with pytest.raises(ValueError, match=r"side\[0\] must be \[B, H, W"):
        tiled_map(lambda t, s: t, x, tile=8, overlap=2, side=(jnp.zeros((1, 19, 20, 1)),))
    with pytest.raises(ValueError, match="fn must map"):
        tiled_map(lambda t: t[:, ::2], x, tile=8, overlap=2)
    with pytest.raises(ValueError, match="scale=2"):
        tiled_map(lambda t: t, x, tile=8, overlap=2, scale=2)
    with pytest.raises(ValueError, match=r"x must be \[B, H, W, C\]"):
        tiled_map(lambda t: t, jnp.zeros((20, 20, 2)), tile=8, overlap=2)


# --------------------------------------------------------------------------------------------------- blend_window


@pytest.mark.parametrize("tile,overlap,margin", [(24, 8, 0), (24, 8, 3), (24, 8, 4), (10, 1, 0), (7, 0, 0), (6, 5, 0),
                                                 (16, 6, 1)])
def test_blend_window_positive_symmetric_flat_middle(tile, overlap, margin):
    w = blend_window(tile, overlap, margin=margin)
    assert w.shape == (tile,) and w.dtype == np.float32
    assert w.min() > 0
    np.testing.assert_array_equal(w, w[::-1])
    assert w.max() <= 1.0
    if tile >= 2 * overlap:
        np.testing.assert_array_equal(w[overlap:tile - overlap], 1.0)
        assert np.all(w[:overlap - margin] < 1.0)
        assert np.all(np.diff(w[:overlap + 1]) >= 0)  # ramps up
        # Two neighbours overlapping by exactly `overlap` samples cross-fade: the ramps sum to 1 (+ FLOOR).
        np.testing.assert_allclose(w[:overlap] + w[tile - overlap:], 1.0, atol=2 * FLOOR)
    if margin:
        np.testing.assert_allclose(w[:margin], FLOOR)


# ----------------------------------------------------------------------------------------------------- exactness


def test_single_tile_is_exactly_the_untiled_call_eager_and_jit():
    fn = _conv_fn()
    x = _normal(1, (2, 20, 24, 3))
    np.testing.assert_array_equal(tiled_map(fn, x, tile=24, overlap=8), fn(x))
    tiled = jax.jit(lambda z: tiled_map(fn, z, tile=24, overlap=8))
    np.testing.assert_array_equal(tiled(x), jax.jit(fn)(x))

    def up_conv(z):  # decoder-like: nearest 2x upsampling then the conv net
        return fn(jnp.repeat(jnp.repeat(z, 2, axis=1), 2, axis=2))

    np.testing.assert_array_equal(tiled_map(up_conv, x, tile=24, overlap=8, scale=2), up_conv(x))


def _mlp_fn(seed=0, c_in=3, c_out=4):
    w1 = _normal(100 + seed, (c_in, 8)) / np.sqrt(c_in)
    w2 = _normal(200 + seed, (8, c_out)) / np.sqrt(8)
    return lambda x: jnp.tanh(x @ w1) @ w2 + 0.5


def test_pointwise_fn_tiled_equals_untiled():
    x = _normal(2, (2, 50, 37, 3))
    for fn in (lambda z: z * 2.0 + 1.0, _mlp_fn()):
        want = fn(x)
        got = tiled_map(fn, x, tile=16, overlap=5)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        np.testing.assert_allclose(jax.jit(lambda z: tiled_map(fn, z, tile=16, overlap=5, margin=2))(x), want,
                                   atol=1e-6, rtol=0)
    # one dimension smaller than the tile: that axis is a single tile of its full size
    x_thin = x[:, :10]
    np.testing.assert_allclose(tiled_map(_mlp_fn(), x_thin, tile=16, overlap=5), _mlp_fn()(x_thin), atol=1e-6, rtol=0)


def test_pointwise_fn_with_scale_and_side():
    x = _normal(3, (1, 41, 30, 3))
    side = _normal(4, (1, 41, 30, 2))
    mlp = _mlp_fn(c_out=2)

    def up(z):  # nearest 2x upsampling of a pointwise op
        return jnp.repeat(jnp.repeat(mlp(z), 2, axis=1), 2, axis=2)

    got = tiled_map(up, x, tile=12, overlap=4, scale=2)
    assert got.shape == (1, 82, 60, 2)
    np.testing.assert_allclose(got, up(x), atol=1e-6, rtol=0)

    def with_side(z, s):
        return mlp(z) * s[..., :1] + s[..., 1:]

    np.testing.assert_allclose(tiled_map(with_side, x, tile=12, overlap=4, side=(side,)), with_side(x, side),
                               atol=1e-6, rtol=0)


def test_fn_only_ever_sees_tile_shaped_inputs():
    seen = []

    def fn(z, s):
        seen.append((z.shape, s.shape))
        return z + s

    x = jnp.ones((2, 40, 30, 3))
    tiled_map(fn, x, tile=16, overlap=4, side=(jnp.ones((2, 40, 30, 3)),))
    assert seen and all(shapes == ((2, 16, 16, 3), (2, 16, 16, 3)) for shapes in seen)


# -------------------------------------------------------------------------------------------------------- seams


TILE, OVERLAP = 24, 8
STARTS = tile_starts(64, TILE, OVERLAP)  # (0, 16, 32, 40)
INNER_EDGES = sorted({s for s in STARTS if s > 0} | {s + TILE for s in STARTS if s + TILE < 64})  # 16 24 32 40 56


def _padding_affected(size=64):
    """Samples within RADIUS of some tile's inner border: the only places a tile's output can differ."""
    bad = np.zeros(size, bool)
    for s in STARTS:
        if s > 0:
            bad[s:s + RADIUS] = True
        if s + TILE < size:
            bad[s + TILE - RADIUS:s + TILE] = True
    return bad


def test_conv_net_with_margin_at_least_radius_matches_untiled():
    fn = _conv_fn()
    img = _smooth_image()
    want = np.asarray(fn(img))
    for margin in (RADIUS, OVERLAP // 2):
        got = np.asarray(jax.jit(lambda z: tiled_map(fn, z, tile=TILE, overlap=OVERLAP, margin=margin))(img))
        # every non-FLOOR weight lands on an output whose receptive field is inside the tile: the padding error
        # (O(1)) enters with weight FLOOR = 1e-6 (measured 1.8e-6)
        assert np.abs(got - want).max() < 1e-5


def test_conv_net_without_margin_errs_only_near_inner_borders_and_shows_no_seam():
    fn = _conv_fn()
    img = _smooth_image()
    want = np.asarray(fn(img))
    got = np.asarray(tiled_map(fn, img, tile=TILE, overlap=OVERLAP))
    diff = np.abs(got - want)
    out_range = want.max() - want.min()
    # Away from inner tile borders every covering tile sees the whole receptive field: exact up to rounding.
    bad = _padding_affected()
    exact = ~bad[:, None] & ~bad[None, :]
    assert diff[0][exact].max() < 1e-5
    # Near them the padded outputs (the RADIUS outermost samples) enter with the ramp's smallest weights
    # sin^2(pi/2 * k/(OVERLAP+1)), k <= 3, i.e. <= 0.25 against >= 0.75 from the neighbour: measured max 0.096,
    # 2.9% of the output range (3.33).
    assert diff.max() < 0.05 * out_range
    # No seam: the jump across each inner tile border (columns and rows) is not much larger than the untiled one
    # (measured ratio 0.98 to 1.09; plain averaging with a flat window gives up to 4.2).
    for axis in (2, 1):
        here = np.take(got, INNER_EDGES, axis=axis) - np.take(got, [e - 1 for e in INNER_EDGES], axis=axis)
        ref = np.take(want, INNER_EDGES, axis=axis) - np.take(want, [e - 1 for e in INNER_EDGES], axis=axis)
        other = tuple(a for a in (0, 1, 2, 3) if a != axis)
        ratio = np.abs(here).mean(axis=other) / np.abs(ref).mean(axis=other)
        assert ratio.max() < 1.5, (axis, ratio)


# ------------------------------------------------------------------------------------------------ tiled_denoiser


def _toy_model():
    """Pointwise in x and concat; uses t, context (through its mean) and y, and checks they arrive whole."""
    mlp = _mlp_fn(c_in=5, c_out=3)

    def model_fn(x, t, cond):
        b = x.shape[0]
        assert t.shape == (b,)
        out = mlp(jnp.concatenate([x, cond["concat"]], axis=-1)) * (1.0 + t[:, None, None, None] / 1000.0)
        assert cond["context"].shape == (b, 7, 4) and cond["y"].shape == (b,)
        out = out + jnp.mean(cond["context"], axis=(1, 2))[:, None, None, None]
        return out + cond["y"][:, None, None, None].astype(out.dtype)

    return model_fn


def _cond(seed, b, h, w):
    return {"concat": _normal(seed, (b, h, w, 2)),
            "context": _normal(seed + 1, (b, 7, 4)),
            "y": jnp.array([3, 1])[:b]}


def test_tiled_denoiser_matches_untiled():
    model_fn = _toy_model()
    tiled = tiled_denoiser(model_fn, tile=16, overlap=6)
    t = jnp.array([10, 900], jnp.int32)

    x = _normal(5, (2, 16, 12, 3))  # fits one tile: exact
    cond = _cond(6, 2, 16, 12)
    np.testing.assert_array_equal(tiled(x, t, cond), model_fn(x, t, cond))

    x = _normal(7, (2, 45, 38, 3))  # many tiles
    cond = _cond(8, 2, 45, 38)
    want = model_fn(x, t, cond)
    np.testing.assert_allclose(jax.jit(tiled)(x, t, cond), want, atol=1e-5, rtol=0)
    # context and y reach every tile unchanged: a different context / y changes every output pixel
    other = dict(cond, context=cond["context"] + 1.0)
    np.testing.assert_allclose(tiled(x, t, other), want + 1.0, atol=1e-5, rtol=0)
    other = dict(cond, y=cond["y"] + 2)
    np.testing.assert_allclose(tiled(x, t, other), want + 2.0, atol=1e-5, rtol=0)


def test_tiled_denoiser_without_cond_uses_conv_net():
    fn = _conv_fn()

    def model_fn(x, t, cond):
        assert cond is None
        return fn(x) * t[:, None, None, None].astype(x.dtype)

    x = _normal(9, (2, 20, 20, 3))
    t = jnp.array([1, 2], jnp.int32)
    np.testing.assert_array_equal(tiled_denoiser(model_fn, tile=24, overlap=8)(x, t, None), model_fn(x, t, None))
    big = jnp.asarray(np.repeat(_smooth_image(), 2, axis=0))
    got = tiled_denoiser(model_fn, tile=TILE, overlap=OVERLAP, margin=RADIUS)(big, t, None)
    assert np.abs(np.asarray(got) - np.asarray(model_fn(big, t, None))).max() < 1e-5
