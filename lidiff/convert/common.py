"""Strict conversion of PyTorch state dicts (NCHW) into lidiff parameter trees (NHWC).

lidiff names its parameters after the CompVis modules, so a CompVis key maps onto a param path by one rule
(``compvis_key_to_path``): dots separate levels, and numeric segments are glued to the segment before them::

    encoder.down.0.block.1.norm1.weight   ->  encoder / down_0 / block_1 / norm1 / scale
    input_blocks.4.1.proj_out.weight      ->  input_blocks_4_1 / proj_out / kernel
    time_embed.0.bias                     ->  time_embed_0 / bias

The leaf name and layout come from the target tree (from ``jax.eval_shape`` of the model's ``init``):

====================  ===============================  =====================
torch leaf            target leaf                      conversion
====================  ===============================  =====================
Conv2d weight 4-D     ``kernel`` 4-D (kH, kW, I, O)    ``transpose(2, 3, 1, 0)``
Conv2d 1x1 weight     ``kernel`` 2-D (I, O) (Dense)    ``w[:, :, 0, 0].T``
Conv1d 1x1 weight     ``kernel`` 2-D (I, O) (Dense)    ``w[:, :, 0].T``
Linear weight 2-D     ``kernel`` 2-D (I, O)            ``w.T``
Linear weight 2-D     ``kernel`` 4-D (1, 1, I, O)      ``w.T[None, None]``
Norm weight 1-D       ``scale``                        copy
Embedding weight      ``embedding``                    copy
any bias              ``bias``                         copy
====================  ===============================  =====================

Conversion is strict: every target parameter must be filled and every source key used, otherwise
``ConversionError`` lists the missing and unexpected names and any shape mismatch.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

Params = dict[str, Any]


class ConversionError(ValueError):
    """A state dict does not map one to one onto the target parameter tree."""


def to_numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Returns ``{key: float32/int numpy array}`` from torch tensors or arrays (torch is not imported)."""
    out = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu()
            if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
                value = value.float()
            value = value.numpy()
        out[key] = np.asarray(value)
    return out


def compvis_key_to_path(key: str) -> tuple[str, ...]:
    """``'input_blocks.4.1.norm.weight'`` -> ``('input_blocks_4_1', 'norm', 'weight')``."""
    path: list[str] = []
    for segment in key.split("."):
        if segment.isdigit() and path:
            path[-1] = f"{path[-1]}_{segment}"
        else:
            path.append(segment)
    return tuple(path)


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> ``{path tuple: leaf}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
    """``{path tuple: leaf}`` -> nested dict."""
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _convert_weight(w: np.ndarray, target_leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
    if target_leaf in ("scale", "embedding", "bias"):
        return w
    if target_leaf != "kernel":
        return w
    if w.ndim == 4 and len(target_shape) == 4:
        return w.transpose(2, 3, 1, 0)
    if w.ndim == 4 and len(target_shape) == 2 and w.shape[2:] == (1, 1):
        return w[:, :, 0, 0].T
    if w.ndim == 3 and len(target_shape) == 2 and w.shape[2] == 1:
        return w[:, :, 0].T
    if w.ndim == 2 and len(target_shape) == 2:
        return w.T
    if w.ndim == 2 and len(target_shape) == 4 and target_shape[:2] == (1, 1):
        return w.T[None, None]
    return w


_LEAF_FOR = {"weight": ("kernel", "scale", "embedding"), "bias": ("bias",)}


def convert_state_dict(
    state_dict: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    key_to_path: Callable[[str], tuple[str, ...]] = compvis_key_to_path,
    ignore: Iterable[str] = (),
) -> Params:
    """Converts a (CompVis-named) torch state dict onto ``target``'s structure, strictly.

    Args:
      state_dict: ``{torch key: tensor or array}``; keys already in CompVis naming.
      target: the lidiff ``params`` tree (arrays or ``jax.ShapeDtypeStruct``), e.g. from ``jax.eval_shape``.
      key_to_path: maps a torch key to the param path ending in ``weight``/``bias`` (or a lidiff leaf name).
      ignore: regular expressions of torch keys to drop (e.g. ``r'^loss\\.'``).

    Returns:
      a nested dict of numpy arrays with exactly ``target``'s paths, shapes and float32 dtype.

    Raises:
      ConversionError: naming every missing target param, unused source key and shape mismatch.
    """
    patterns = [re.compile(p) for p in ignore]
    source = to_numpy_state_dict(state_dict)
    flat_target = flatten(target)
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched = [], []
    for key, w in source.items():
        if any(p.search(key) for p in patterns):
            continue
        path = key_to_path(key)
        candidates = _LEAF_FOR.get(path[-1], (path[-1],))
        match = next((path[:-1] + (leaf,) for leaf in candidates if path[:-1] + (leaf,) in flat_target), None)
        if match is None:
            unexpected.append(key)
            continue
        want = tuple(flat_target[match].shape)
        converted = _convert_weight(w, match[-1], want)
        if tuple(converted.shape) != want:
            mismatched.append(f"{key} {tuple(w.shape)} -> {'/'.join(match)} expects {want}")
            continue
        if match in out:
            unexpected.append(f"{key} (duplicate of {'/'.join(match)})")
            continue
        out[match] = converted.astype(np.float32) if np.issubdtype(converted.dtype, np.floating) else converted
    missing = ["/".join(p) for p in flat_target if p not in out]
    if missing or unexpected or mismatched:
        lines = ["state dict does not match the lidiff parameter tree:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(sorted(missing)[:50]))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)[:50]))
        if mismatched:
            lines.append(f"  shape mismatch ({len(mismatched)}): " + "; ".join(mismatched[:50]))
        raise ConversionError("\n".join(lines))
    return unflatten(out)


def load_checked_safetensors(path: str, expected: Mapping[str, Any], what: str, recreate: str) -> Params:
    """Reads a converted weights file written as ``{"a/b/c": array}`` and checks it against ``expected`` (a
    nested tree of arrays or ``ShapeDtypeStruct`` giving every name and shape) -> the nested tree, float32 numpy.

    Raises ``ConversionError`` listing every missing, unexpected and mis-shaped tensor, ending with ``recreate``
    (the command that writes the file). The caller checks that ``path`` exists.
    """
    from safetensors.numpy import load_file

    tensors = load_file(path)
    shapes = {"/".join(k): tuple(v.shape) for k, v in flatten(expected).items()}
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    mismatched = [f"{k} {tuple(tensors[k].shape)} (expected {shapes[k]})"
                  for k in sorted(set(shapes) & set(tensors)) if tuple(tensors[k].shape) != shapes[k]]
    if missing or unexpected or mismatched:
        lines = [f"{path} does not hold the {what}:"]
        for name, items, sep in (("missing", missing, ", "), ("unexpected", unexpected, ", "),
                                 ("shape mismatch", mismatched, "; ")):
            if items:
                lines.append(f"  {name} ({len(items)}): " + sep.join(items[:50]))
        lines.append(f"  re-create it with: {recreate}")
        raise ConversionError("\n".join(lines))
    return unflatten({tuple(k.split("/")): np.asarray(v, np.float32) for k, v in tensors.items()})


def torch_state_dict(path: str, sources: str) -> Mapping[str, Any]:
    """A ``.pth`` state dict loaded with ``torch.load(weights_only=True)`` (no arbitrary unpickling), unwrapping a
    ``{"state_dict": ...}`` checkpoint; stops the converting command with a message when it cannot.
    ``sources``: where the user gets the file, for the missing-file message."""
    import os

    try:
        import torch
    except ImportError as e:
        raise SystemExit(f"reading {path} needs PyTorch, which is not installed: pip install torch==2.13.0") from e
    if not os.path.isfile(path):
        raise SystemExit(f"no such file: {path}. {sources}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise SystemExit(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj
