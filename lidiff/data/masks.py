"""Random inpainting masks and the conditioning inputs built from them, computed on the device from a PRNG key.

Convention (CompVis): a mask is ``[B, H, W, 1] float32`` in {0, 1}, **1 = region to fill (unknown)**, 0 = known.
Latent inpainting concatenates to the latent the first stage's encoding of ``mask_images(images, masks)`` and the
mask resized to the latent size by ``resize_mask``.

Everything here is pure ``jax.numpy`` with static shapes (batch, height, width and all counts are Python ints), so
it runs inside the jitted train step and a resumed run draws exactly the same masks.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from lidiff.errors import ConfigError

MASK_KINDS = ("box", "freeform", "mixed")
MIN_STROKE_RADIUS = 0.75  # pixels: every stroke covers at least the pixel nearest its start, on any image size


def _check_size(batch, height, width):
    for name, v in (("batch", batch), ("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"mask {name} must be a positive int, got {v!r}")


def _check_fracs(name, lo, hi, upper=1.0):
    if not (0.0 < lo <= hi <= upper):
        raise ConfigError(f"{name} must satisfy 0 < min <= max <= {upper}, got ({lo!r}, {hi!r})")


def box_masks(rng, batch: int, height: int, width: int, *, min_frac=0.2, max_frac=0.6):
    """One random axis-aligned rectangle per image.

    Each side is ``round(u * side)`` pixels (at least 1) with ``u ~ U[min_frac, max_frac]`` drawn independently for
    the height and the width; the position is uniform over the placements that keep the box inside the image.

    Args:
      rng: a PRNG key.
      batch, height, width: static positive ints.
      min_frac, max_frac: static, 0 < min_frac <= max_frac <= 1.

    Returns:
      ``[batch, height, width, 1] float32`` in {0, 1}, 1 inside the box (to fill).
    """
    _check_size(batch, height, width)
    _check_fracs("box (min_frac, max_frac)", min_frac, max_frac)
    k_h, k_w, k_y, k_x = jax.random.split(rng, 4)

    def extent(key_size, key_pos, side):
        frac = jax.random.uniform(key_size, (batch,), minval=min_frac, maxval=max_frac)
        size = jnp.clip(jnp.round(frac * side).astype(jnp.int32), 1, side)
        start = jnp.floor(jax.random.uniform(key_pos, (batch,)) * (side - size + 1)).astype(jnp.int32)
        start = jnp.minimum(start, side - size)
        idx = jnp.arange(side, dtype=jnp.int32)
        return (idx[None, :] >= start[:, None]) & (idx[None, :] < (start + size)[:, None])  # [B, side]

    rows, cols = extent(k_h, k_y, height), extent(k_w, k_x, width)
    return (rows[:, :, None] & cols[:, None, :]).astype(jnp.float32)[..., None]


def freeform_masks(rng, batch: int, height: int, width: int, *, max_strokes=4, max_vertices=6,
                   width_range=(0.05, 0.15), length_range=(0.1, 0.4)):
    """LaMa-style "large" irregular masks: a few thick random polylines per image.

    Per image: ``n ~ U{1..max_strokes}`` strokes. Each stroke starts at a uniform random point, has
    ``U{2..max_vertices}`` vertices, each segment with a uniform random direction and a length ``~ U(length_range)``
    times ``min(height, width)``, every vertex clipped to the image; its thickness (full width) is
    ``~ U(width_range)`` times ``min(height, width)`` (but at least ``2 * MIN_STROKE_RADIUS`` pixels). A pixel is
    masked when its centre lies within half the thickness of a segment of a stroke.

    Computed by the distance from each pixel centre to each of the ``max_strokes * (max_vertices - 1)`` segment
    slots at once (``[B, S, H, W]``, unused strokes and segments masked out by a validity mask); XLA fuses it into
    one reduction, but the unfused intermediates would be ``B * S * H * W * 4`` bytes each.

    Args:
      rng: a PRNG key.
      batch, height, width: static positive ints.
      max_strokes: static int >= 1.
      max_vertices: static int >= 2.
      width_range: static (min, max) fractions of ``min(height, width)``, 0 < min <= max <= 1.
      length_range: static (min, max) fractions of ``min(height, width)``, 0 < min <= max <= 2.

    Returns:
      ``[batch, height, width, 1] float32`` in {0, 1}, 1 on the strokes (to fill); never empty.
    """
    _check_size(batch, height, width)
    if not isinstance(max_strokes, int) or max_strokes < 1:
        raise ConfigError(f"max_strokes must be an int >= 1, got {max_strokes!r}")
    if not isinstance(max_vertices, int) or max_vertices < 2:
        raise ConfigError(f"max_vertices must be an int >= 2 (a stroke has at least one segment), got {max_vertices!r}")
    _check_fracs("width_range", *width_range)
    _check_fracs("length_range", *length_range, upper=2.0)
    side = float(min(height, width))
    k_n, k_seg, k_start, k_angle, k_len, k_width = jax.random.split(rng, 6)
    shape = (batch, max_strokes)
    n_seg_max = max_vertices - 1

    n_strokes = jax.random.randint(k_n, (batch,), 1, max_strokes + 1)
    n_segments = jax.random.randint(k_seg, shape, 1, n_seg_max + 1)
    stroke_ok = jnp.arange(max_strokes)[None, :] < n_strokes[:, None]  # [B, K]
    seg_ok = stroke_ok[..., None] & (jnp.arange(n_seg_max)[None, None, :] < n_segments[..., None])  # [B, K, V-1]

    start = jax.random.uniform(k_start, shape + (2,)) * jnp.array([width, height], jnp.float32)  # (x, y)
    angles = jax.random.uniform(k_angle, shape + (n_seg_max,), maxval=2.0 * math.pi)
    lengths = jax.random.uniform(k_len, shape + (n_seg_max,), minval=length_range[0], maxval=length_range[1]) * side
    steps = jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1) * lengths[..., None]  # [B, K, V-1, 2]
    limit = jnp.array([width, height], jnp.float32)
    vertices = [start]
    for i in range(n_seg_max):  # static and small: clip each vertex to the image, as LaMa does
        vertices.append(jnp.clip(vertices[-1] + steps[:, :, i], 0.0, limit))
    vertices = jnp.stack(vertices, axis=2)  # [B, K, V, 2]
    radius = jnp.maximum(
        0.5 * side * jax.random.uniform(k_width, shape, minval=width_range[0], maxval=width_range[1]),
        MIN_STROKE_RADIUS)

    n_slots = max_strokes * n_seg_max
    p0 = vertices[:, :, :-1].reshape(batch, n_slots, 2)
    d = (vertices[:, :, 1:] - vertices[:, :, :-1]).reshape(batch, n_slots, 2)
    r2 = jnp.repeat(radius, n_seg_max, axis=1) ** 2  # [B, S]
    ok = seg_ok.reshape(batch, n_slots)

    def col(a):
        return a[:, :, None, None]  # [B, S] -> [B, S, 1, 1]

    ax = (jnp.arange(width, dtype=jnp.float32) + 0.5)[None, None, None, :] - col(p0[..., 0])  # [B, S, 1, W]
    ay = (jnp.arange(height, dtype=jnp.float32) + 0.5)[None, None, :, None] - col(p0[..., 1])  # [B, S, H, 1]
    dx, dy = col(d[..., 0]), col(d[..., 1])
    t = jnp.clip((ax * dx + ay * dy) / jnp.maximum(dx * dx + dy * dy, 1e-12), 0.0, 1.0)  # [B, S, H, W]
    dist2 = (ax - t * dx) ** 2 + (ay - t * dy) ** 2
    covered = jnp.any(col(ok) & (dist2 <= col(r2)), axis=1)  # [B, H, W]
    return covered.astype(jnp.float32)[..., None]


def random_masks(rng, batch: int, height: int, width: int, *, kind="mixed", min_frac=0.2, max_frac=0.6,
                 max_strokes=4, max_vertices=6, width_range=(0.05, 0.15), length_range=(0.1, 0.4)):
    """Training masks of one kind, or a per-image mix.

    Args:
      rng: a PRNG key.
      batch, height, width: static positive ints.
      kind: "box" (``box_masks``), "freeform" (``freeform_masks``) or "mixed": per image, uniformly, a box, a
        free-form mask, or the union of both. For one key, "mixed" picks from exactly the masks "box" and
        "freeform" return for that key.
      min_frac, max_frac: passed to ``box_masks``.
      max_strokes, max_vertices, width_range, length_range: passed to ``freeform_masks``.

    Returns:
      ``[batch, height, width, 1] float32`` in {0, 1}, 1 = to fill.
    """
    if kind not in MASK_KINDS:
        raise ConfigError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")
    k_box, k_free, k_pick = jax.random.split(rng, 3)
    box = lambda: box_masks(k_box, batch, height, width, min_frac=min_frac, max_frac=max_frac)  # noqa: E731
    free = lambda: freeform_masks(  # noqa: E731
        k_free, batch, height, width, max_strokes=max_strokes, max_vertices=max_vertices, width_range=width_range,
        length_range=length_range)
    if kind == "box":
        return box()
    if kind == "freeform":
        return free()
    b, f = box(), free()
    pick = jax.random.randint(k_pick, (batch, 1, 1, 1), 0, 3)  # 0: box, 1: free-form, 2: union
    return jnp.where(pick == 0, b, jnp.where(pick == 1, f, jnp.maximum(b, f)))


def mask_images(images, masks):
    """The masked image as CompVis makes it: known pixels unchanged, pixels to fill set to -1 (black).

    Args:
      images: ``[B, H, W, C] float32 in [-1, 1]``.
      masks: ``[B, H, W, 1] float32`` in {0, 1}, 1 = to fill.

    Returns:
      ``images * (1 - masks) + (-1) * masks``, ``[B, H, W, C] float32`` (CompVis: ``(1 - mask) * image`` on [0, 1]
      images, then ``* 2 - 1``). Known pixels are bit-exact copies of ``images``.
    """
    if masks.ndim != 4 or masks.shape[-1] != 1 or masks.shape[:3] != images.shape[:3]:
        raise ConfigError(f"masks must be [B, H, W, 1] matching images {tuple(images.shape)}, "
                          f"got {tuple(masks.shape)}")
    masks = masks.astype(images.dtype)
    return images * (1 - masks) - masks


def resize_mask(masks, size):
    """The mask at the latent size, by nearest-neighbour sampling exactly as PyTorch's ``F.interpolate`` default
    (``mode="nearest"``: source index ``floor(i * in / out)``), which CompVis uses for the concat channel.

    Nearest keeps the values in {0, 1}; an area average thresholded at 0.5 was the alternative, but would not match
    the released CompVis model's conditioning. For an integer ratio f this takes the top-left pixel of each f x f
    block (``masks[:, ::f, ::f]``), not the block centre as ``jax.image.resize(..., "nearest")`` would.

    Note: CompVis's ``scripts/inpaint.py`` maps *every* batch entry, the mask included, through ``x * 2 - 1``, so its
    released inpainting model sees the mask channel in {-1, 1}; pass ``2 * resize_mask(...) - 1`` to match it.

    Args:
      masks: ``[B, H, W, C] float32`` (C = 1 for masks).
      size: static ``(h, w)`` positive ints.

    Returns:
      ``[B, h, w, C] float32``, values taken from ``masks``.
    """
    if masks.ndim != 4:
        raise ConfigError(f"masks must be [B, H, W, 1], got shape {tuple(masks.shape)}")
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ConfigError(f"size must be a (height, width) pair of ints, got {size!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"size must be positive, got {size!r}")
    _, in_h, in_w, _ = masks.shape

    def nearest(n_in, n_out):  # PyTorch: float scale, floor, clamp to the last index
        idx = np.floor(np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out)))
        return np.minimum(idx.astype(np.int64), n_in - 1)

    return masks[:, nearest(in_h, h)][:, :, nearest(in_w, w)]
