"""Layout tokens: bounding boxes with class ids -> one integer sequence for a layout transformer (tau_theta).

The scheme follows the object/bounding-box conditional builder of CompVis/taming-transformers, which the
layout2img-openimages256 LDM uses (vocabulary 8192, 30 objects, sequence 92)::

    per box k:   [class_k, coord(x0_k, y0_k), coord(x1_k, y1_k)]          -> tokens [B, 3K]
    coord(x, y) = round(y * (S - 1)) * S + round(x * (S - 1)),  S = int(sqrt(vocab_size))
    no box:      [none, none, none],  none = vocab_size - 1

Class tokens and coordinate tokens share one vocabulary: a class id ``c`` is emitted as token ``c`` itself, the
same integer as the coordinate token of grid cell ``c`` (CompVis does the same). Only the position in the
sequence (slot 3k for classes, 3k+1 and 3k+2 for corners) tells the transformer which meaning a token has, so
the transformer needs learned position embeddings. ``round`` is round-half-to-even, like Python's ``round``.

Differences from CompVis, on purpose:
- No crop tokens. CompVis appends two tokens for the random-crop window (92 = 30 * 3 + 2); our data pipeline
  crops deterministically (``resize_center_crop``), so the sequence is exactly ``3K`` long.
- No random shuffling of boxes here: tokens follow the slot order given (the host side decides the order).
- A padded slot (label -1) may sit anywhere; it gives a ``none`` triple at that position.
- Vocabularies whose coordinate grid reaches the ``none`` token (``S * S > vocab_size - 1``, e.g. 16) are
  refused, as are class ids that would reach ``none``; CompVis lets those collide.
- No group/occluded/depiction modifiers on class tokens (OpenImages-only attributes).

Pure jax.numpy: no I/O, jit-able (``num_classes`` and ``vocab_size`` are static Python ints).
"""

from __future__ import annotations

import math
from typing import Tuple

import jax.numpy as jnp


def layout_sections(vocab_size: int) -> int:
    """Grid sections per side, ``S = int(sqrt(vocab_size))``: coordinates quantise to ``S x S`` cells."""
    return int(math.sqrt(vocab_size))


def none_token(vocab_size: int) -> int:
    """The padding token of a missing box: ``vocab_size - 1``."""
    return vocab_size - 1


def check_layout_vocab(num_classes: int, vocab_size: int) -> int:
    """Grid sections per side for a vocabulary that keeps class and coordinate tokens below ``none``; raises
    ValueError saying why otherwise."""
    sections = layout_sections(vocab_size)
    if sections < 2:
        raise ValueError(f"vocab_size must be at least 4 (a 2x2 coordinate grid plus none), got {vocab_size}.")
    if sections * sections > vocab_size - 1:
        raise ValueError(
            f"vocab_size={vocab_size} gives a {sections}x{sections} coordinate grid whose last cell "
            f"({sections * sections - 1}) is the none token ({vocab_size - 1}); use a vocab_size that is not a "
            f"perfect square (CompVis uses 8192)."
        )
    if not 0 < num_classes <= vocab_size - 1:
        raise ValueError(
            f"num_classes must be in [1, vocab_size - 1 = {vocab_size - 1}] so class tokens stay below the none "
            f"token, got {num_classes}."
        )
    return sections


def coordinate_tokens(x, y, *, vocab_size: int):
    """Quantise points to one token each: ``round(y * (S - 1)) * S + round(x * (S - 1))``.

    Args:
      x, y: float arrays of the same shape, fractions of the image side in [0, 1] (values outside are clipped).
      vocab_size: vocabulary size; ``S = int(sqrt(vocab_size))``.
    Returns:
      int32 array of that shape, in ``[0, S * S)``.
    """
    sections = layout_sections(vocab_size)
    scale = jnp.float32(sections - 1)
    xd = jnp.round(jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0) * scale).astype(jnp.int32)
    yd = jnp.round(jnp.clip(jnp.asarray(y, jnp.float32), 0.0, 1.0) * scale).astype(jnp.int32)
    return yd * sections + xd


def layout_tokens(boxes, labels, *, num_classes: int, vocab_size: int):
    """Boxes with class ids -> token sequence ``[class, coord(x0, y0), coord(x1, y1)]`` per box.

    Args:
      boxes: float ``[B, K, 4]`` as ``(x0, y0, x1, y1)``, fractions of the image in [0, 1] (clipped to it).
      labels: int ``[B, K]``: class ids in ``[0, num_classes)``, or -1 for an empty slot (padding). Ids are
        not range-checked inside jit; the host side (``lidiff.data.layouts``) validates them.
      num_classes: number of box classes C (static); must be at most ``vocab_size - 1``.
      vocab_size: token vocabulary V (static), e.g. 8192; ``none = V - 1``.
    Returns:
      int32 ``[B, 3K]`` in ``[0, V)``; empty slots give ``none`` for all three tokens.
    """
    check_layout_vocab(num_classes, vocab_size)
    boxes = jnp.asarray(boxes)
    labels = jnp.asarray(labels)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, K, 4] (x0, y0, x1, y1), got shape {boxes.shape}.")
    if labels.shape != boxes.shape[:2]:
        raise ValueError(f"labels must be [B, K] = {boxes.shape[:2]} to match boxes, got shape {labels.shape}.")
    first = coordinate_tokens(boxes[..., 0], boxes[..., 1], vocab_size=vocab_size)  # [B, K]
    second = coordinate_tokens(boxes[..., 2], boxes[..., 3], vocab_size=vocab_size)  # [B, K]
    triples = jnp.stack([labels.astype(jnp.int32), first, second], axis=-1)  # [B, K, 3]
    present = (labels >= 0)[..., None]
    triples = jnp.where(present, triples, jnp.int32(none_token(vocab_size)))
    return triples.reshape(boxes.shape[0], 3 * boxes.shape[1])


def null_layout(batch: int, max_boxes: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """The "no boxes" input for classifier-free guidance and ``p_uncond`` dropout.

    Returns:
      boxes float32 ``[batch, max_boxes, 4]`` of zeros and labels int32 ``[batch, max_boxes]`` all -1, whose
      ``layout_tokens`` are all ``none``.
    """
    return (
        jnp.zeros((batch, max_boxes, 4), jnp.float32),
        jnp.full((batch, max_boxes), -1, jnp.int32),
    )


def layout_map(boxes, labels, *, num_classes: int, size: Tuple[int, int]):
    """Boxes with class ids -> a per-class coverage map, the spatial half of ``hybrid`` layout conditioning.

    Cell ``(i, j)`` of an ``h x w`` grid spans ``[j/w, (j+1)/w) x [i/h, (i+1)/h)`` of the image; channel ``c``
    holds the largest fraction of that cell covered by one box of class ``c`` (1 inside a box, fractions on its
    border cells, 0 elsewhere), so a box smaller than a cell still shows and two boxes of one class do not add up.

    Args:
      boxes: float ``[B, K, 4]`` ``(x0, y0, x1, y1)``, fractions of the image (clipped to [0, 1]).
      labels: int ``[B, K]`` class ids in ``[0, num_classes)``, -1 for an empty slot (which draws nothing).
      num_classes: channels C (static).
      size: ``(h, w)`` of the map (static), e.g. the latent's.
    Returns:
      float32 ``[B, h, w, C]`` in [0, 1]; all zeros for "no boxes".
    """
    h, w = size
    boxes = jnp.clip(jnp.asarray(boxes, jnp.float32), 0.0, 1.0)
    labels = jnp.asarray(labels)

    def cover(lo, hi, n):  # [B, K] box sides -> [B, K, n] fraction of each of the n cells along one axis
        edges = jnp.arange(n + 1, dtype=jnp.float32) / n
        overlap = jnp.minimum(hi[..., None], edges[1:]) - jnp.maximum(lo[..., None], edges[:-1])
        return jnp.clip(overlap * n, 0.0, 1.0)

    per_box = cover(boxes[..., 1], boxes[..., 3], h)[..., :, None] * cover(boxes[..., 0], boxes[..., 2], w)[..., None, :]
    one_hot = (labels[..., None] == jnp.arange(num_classes)).astype(jnp.float32)  # [B, K, C]; -1 matches nothing
    return jnp.max(per_box[..., None] * one_hot[:, :, None, None, :], axis=1)  # [B, h, w, C]
