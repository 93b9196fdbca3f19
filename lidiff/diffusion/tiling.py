"""Tiled application of convolutional networks, for sampling and decoding latents larger than memory allows.

Latent diffusion super-resolution and semantic-synthesis models are convolutional, so the denoiser can run on a
latent much larger than its training size, and the decoder can decode it. When the whole latent does not fit in
memory, ``tiled_map`` applies the network to overlapping tiles one at a time (``jax.lax.scan`` over the static list
of tile offsets, ``lax.dynamic_slice`` in, ``lax.dynamic_update_slice`` out), so the peak memory is about one
tile's activations plus the full-size output accumulator.

Shapes: ``x`` is ``[B, H, W, C]`` (NHWC); every tile is ``[B, th, tw, C]`` with ``th = min(tile, H)`` and
``tw = min(tile, W)`` (``tile_starts`` moves the last tile left so that all tiles have the same shape); ``fn`` maps
a tile to ``[B, th*scale, tw*scale, C_out]`` and the result is ``[B, H*scale, W*scale, C_out]`` (``scale`` > 1 for
a decoder: a latent tile becomes an image tile 4x or 8x larger).

Blending rule: each tile's output is weighted by the outer product of two per-axis windows ``blend_window``
(built at the output size: ``tile*scale`` samples, ramps of ``overlap*scale``), and

    result = sum_tiles(window * out) / sum_tiles(window).

The window is a raised-cosine ramp over the first / last ``overlap`` samples and 1 in between; it is strictly
positive, so the normalised blend is defined everywhere, including at the image border where a tile has no
neighbour (there a single tile contributes and w*out / w = out). Two neighbouring ramps over an overlap of exactly
``overlap`` samples are cos^2 / sin^2 of the same angle, a partition of unity, so the seam is a smooth cross-fade.
An axis covered by a single tile gets weight 1.

Exactness: when H <= tile and W <= tile the result is exactly ``fn(x, *side)`` (a single call, no window). When the
tiles' outputs agree in the overlaps (a pointwise ``fn``) the blend reproduces the untiled result up to float32
rounding. For a network with receptive-field radius r (in input samples), a tile's output differs from the untiled
one only within r samples of the tile's *inner* borders, where the tile zero-pads instead of seeing its neighbour;
with r <= overlap/2 every pixel of an overlap is valid in at least one tile, so the tiles agree closely in the
overlaps, and the only differences are where a tile's zero padding at an inner border is within the receptive
field. ``margin`` (default 0) removes even those: the outer ``margin`` samples of each window get a tiny weight
(``FLOOR`` = 1e-6 instead of the ramp, which then spans the middle ``overlap - 2*margin`` samples), so with
``r <= margin <= overlap/2`` every non-negligible weight lands on a valid output and tiled == untiled to about
``FLOOR`` times the padding error. Without ``margin`` the raised cosine still gives the padded samples small
weights (sin^2 of pi/2 * k/(overlap+1) for the k-th sample from a tile edge). A UNet with downsampling and attention
has a receptive field as large as the tile, so for a denoiser the tiling is an approximation whichever margin is
used; the cross-fade hides the seams.

``fn`` must be a pure function of its array arguments (bind parameters first, e.g.
``lambda x: model.apply(params, x)``); it is traced once and run inside ``lax.scan``.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Weight of the outer ``margin`` samples of a window: small enough that those (zero-padding-affected) outputs are
# negligible next to a neighbour's weight of order 1, large enough that w*out and products of two such weights
# (1e-12 at a tile corner) stay normal float32 numbers.
FLOOR = 1e-6


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a static Python int, got {type(value).__name__} {value!r}") from None


def _check_tile_overlap(tile: int, overlap: int) -> tuple[int, int]:
    tile = _as_int(tile, "tile")
    overlap = _as_int(overlap, "overlap")
    if tile <= 0:
        raise ValueError(f"tile must be positive, got tile={tile}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got overlap={overlap}")
    if overlap >= tile:
        raise ValueError(f"overlap must be smaller than tile, got overlap={overlap} >= tile={tile}")
    return tile, overlap


def tile_starts(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)``, neighbours overlapping by >= ``overlap``.

    Tiles start every ``tile - overlap`` samples; the last one is moved left to end exactly at ``size`` (so its
    overlap with the previous one can be larger, and all tiles have the same length). A single start 0 when
    ``size <= tile``. Raises ValueError for tile <= 0, overlap < 0, overlap >= tile or size <= 0.
    """
    tile, overlap = _check_tile_overlap(tile, overlap)
    size = _as_int(size, "size")
    if size <= 0:
        raise ValueError(f"size must be positive, got size={size}")
    if size <= tile:
        return (0,)
    step = tile - overlap
    n = math.ceil((size - tile) / step) + 1
    return tuple(i * step for i in range(n - 1)) + (size - tile,)


def blend_window(tile: int, overlap: int, *, margin: int = 0) -> np.ndarray:
    """Per-axis blending weights [tile] float32: a raised-cosine ramp over the first / last ``overlap`` samples,
    1 in between (where tile >= 2*overlap), strictly positive everywhere, symmetric.

    Ramp sample k (0-based from the edge) is sin^2(pi/2 * (k+1)/(overlap+1)), so the ramps of two tiles that
    overlap by exactly ``overlap`` samples sum to 1. With ``margin`` > 0 the outer ``margin`` samples get weight
    ``FLOOR`` and the ramp is sin^2(pi/2 * (k-margin+1)/(overlap-2*margin+1)) over the middle
    ``overlap - 2*margin`` samples of the overlap (still a partition of unity). Needs 0 <= 2*margin <= overlap.
    If tile < 2*overlap the two ramps meet and the smaller weight is kept.
    """
    tile, overlap = _check_tile_overlap(tile, overlap)
    margin = _as_int(margin, "margin")
    if margin < 0 or 2 * margin > overlap:
        raise ValueError(f"margin must satisfy 0 <= 2*margin <= overlap, got margin={margin}, overlap={overlap}")
    length = overlap - 2 * margin
    k = np.arange(length, dtype=np.float64)
    ramp = np.concatenate([np.full(margin, FLOOR), np.sin(0.5 * np.pi * (k + 1) / (length + 1)) ** 2, np.ones(margin)])
    w = np.ones(tile, np.float64)
    if overlap:
        w[:overlap] = np.minimum(w[:overlap], ramp)
        w[tile - overlap:] = np.minimum(w[tile - overlap:], ramp[::-1])
    return w.astype(np.float32)


def _axis_plan(size: int, tile: int, overlap: int, margin: int, scale: int):
    """(tile length, starts, output window [tile*scale] float32) for one spatial axis."""
    starts = tile_starts(size, tile, overlap)
    if len(starts) == 1:
        return size, starts, np.ones(size * scale, np.float32)
    return tile, starts, blend_window(tile * scale, overlap * scale, margin=margin * scale)


def _normaliser(size: int, length: int, starts: Sequence[int], window: np.ndarray, scale: int) -> np.ndarray:
    total = np.zeros(size * scale, np.float64)
    for s in starts:
        total[s * scale: (s + length) * scale] += window
    return total


def tiled_map(
    fn: Callable[..., jax.Array],
    x: jax.Array,
    *,
    tile: int,
    overlap: int,
    scale: int = 1,
    side: Sequence[jax.Array] = (),
    margin: int = 0,
) -> jax.Array:
    """Apply ``fn`` tile by tile to ``x`` and blend the tile outputs (see the module docstring).

    Args:
      fn: ``fn(x_tile [B, th, tw, C], *side_tiles) -> [B, th*scale, tw*scale, C_out]``, pure.
      x: [B, H, W, C].
      tile, overlap: static ints, tile length and minimum overlap (input samples) along H and W.
      scale: output samples per input sample (1 for a denoiser, 4 or 8 for a decoder).
      side: arrays [B, H, W, ...] cut into tiles at the same positions as ``x`` and passed after it.
      margin: outer samples of each window given weight ``FLOOR`` (see ``blend_window``); 0 <= 2*margin <= overlap.
    Returns:
      [B, H*scale, W*scale, C_out] in ``fn``'s output dtype; exactly ``fn(x, *side)`` when H, W <= tile.
    """
    tile, overlap = _check_tile_overlap(tile, overlap)
    scale = _as_int(scale, "scale")
    margin = _as_int(margin, "margin")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got scale={scale}")
    if margin < 0 or 2 * margin > overlap:
        raise ValueError(f"margin must satisfy 0 <= 2*margin <= overlap, got margin={margin}, overlap={overlap}")
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}")
    b, h, w, c = x.shape
    side = tuple(side)
    for i, s in enumerate(side):
        if s.ndim < 3 or s.shape[:3] != (b, h, w):
            raise ValueError(f"side[{i}] must be [B, H, W, ...] = [{b}, {h}, {w}, ...] like x, got shape {s.shape}")

    th, ys, wy = _axis_plan(h, tile, overlap, margin, scale)
    tw, xs, wx = _axis_plan(w, tile, overlap, margin, scale)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x, *side)

    tile_x = jax.ShapeDtypeStruct((b, th, tw, c), x.dtype)
    tile_side = [jax.ShapeDtypeStruct((b, th, tw) + s.shape[3:], s.dtype) for s in side]
    out_struct = jax.eval_shape(fn, tile_x, *tile_side)
    oh, ow = th * scale, tw * scale
    if len(out_struct.shape) != 4 or out_struct.shape[:3] != (b, oh, ow):
        raise ValueError(f"fn must map a [{b}, {th}, {tw}, {c}] tile to [{b}, {oh}, {ow}, C_out] (scale={scale}), "
                         f"got {out_struct.shape}")
    c_out = out_struct.shape[3]
    acc_dtype = jnp.promote_types(out_struct.dtype, jnp.float32)

    window = jnp.asarray(np.outer(wy, wx)[None, :, :, None], acc_dtype)
    norm = np.outer(_normaliser(h, th, ys, wy, scale), _normaliser(w, tw, xs, wx, scale))
    inv_norm = jnp.asarray((1.0 / norm)[None, :, :, None], acc_dtype)
    offsets = jnp.asarray([(y0, x0) for y0 in ys for x0 in xs], jnp.int32)

    def body(acc, offset):
        y0, x0 = offset[0], offset[1]
        xt = jax.lax.dynamic_slice(x, (0, y0, x0, 0), (b, th, tw, c))
        st = [jax.lax.dynamic_slice(s, (0, y0, x0) + (0,) * (s.ndim - 3), (b, th, tw) + s.shape[3:]) for s in side]
        out = fn(xt, *st).astype(acc_dtype)
        start = (0, y0 * scale, x0 * scale, 0)
        region = jax.lax.dynamic_slice(acc, start, (b, oh, ow, c_out))
        return jax.lax.dynamic_update_slice(acc, region + window * out, start), None

    acc = jnp.zeros((b, h * scale, w * scale, c_out), acc_dtype)
    acc, _ = jax.lax.scan(body, acc, offsets)
    return (acc * inv_norm).astype(out_struct.dtype)


def tiled_denoiser(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    *,
    tile: int,
    overlap: int,
    margin: int = 0,
) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """Wrap ``model_fn(x [B, h, w, c], t [B] int32, cond) -> [B, h, w, c]`` to run tile by tile via ``tiled_map``.

    ``cond`` is None or a dict: ``cond["concat"]`` [B, h, w, c'] is spatial and cut into tiles like ``x``; every
    other entry (``"context"`` [B, L, D], ``"y"`` [B]) and ``t`` are passed unchanged to every tile. The returned
    function has the same signature as ``model_fn``.
    """
    _check_tile_overlap(tile, overlap)

    def denoise(x: jax.Array, t: jax.Array, cond: Any = None) -> jax.Array:
        if cond is None or "concat" not in cond:
            return tiled_map(lambda xt: model_fn(xt, t, cond), x, tile=tile, overlap=overlap, margin=margin)
        rest = {k: v for k, v in cond.items() if k != "concat"}

        def per_tile(xt, concat_t):
            return model_fn(xt, t, {**rest, "concat": concat_t})

        return tiled_map(per_tile, x, tile=tile, overlap=overlap, side=(cond["concat"],), margin=margin)

    return denoise
