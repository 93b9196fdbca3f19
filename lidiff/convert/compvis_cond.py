"""CompVis ``cond_stage_model.*`` weights <-> lidiff conditioning-encoder params, strictly, both ways.

Two encoders are covered:

- the text encoder of txt2img (``BERTEmbedder`` / ``TransformerEmbedder``), keys under
  ``cond_stage_model.transformer.`` -> ``lidiff.models.text_transformer.TransformerEmbedder`` params (the key map
  is in that module's docstring). ``to_logits.{weight,bias}``, the unused language-model head, is dropped
  (``IGNORED_TRANSFORMER_KEYS``) and is not written back by the export.
- the class embedder of cin256 (``ClassEmbedder``), ``cond_stage_model.embedding.weight`` [n_classes, D] ->
  ``{"embedding": {"embedding": [n_classes, D]}}`` (``lidiff.models.conditioning.ClassEmbedder``).

Import (``*_from_compvis``) takes a state dict (torch tensors or numpy arrays) and the target params tree (arrays or
``jax.ShapeDtypeStruct`` from ``jax.eval_shape``); keys outside ``prefix`` are ignored, so a whole LDM
checkpoint's ``state_dict`` can be passed. Inside the prefix every key must map onto a target param and every
target param must be filled, else ``ConversionError`` names the missing and unexpected keys and wrong shapes.
Export (``*_to_compvis``) writes the torch layout back (Linear weights [out, in]), so
``from_compvis(to_compvis(params))`` and ``to_compvis(from_compvis(sd))`` are exact.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from lidiff.convert.common import ConversionError, Params, convert_state_dict, flatten, to_numpy_state_dict

TRANSFORMER_PREFIX = "cond_stage_model.transformer."
CLASS_EMBEDDER_PREFIX = "cond_stage_model."
# Keys (relative to TRANSFORMER_PREFIX) present in CompVis checkpoints that the embedder never uses.
IGNORED_TRANSFORMER_KEYS = (r"^to_logits\.(weight|bias)$",)


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    source = to_numpy_state_dict(state_dict)
    inside = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    if not inside:
        sample = ", ".join(sorted(source)[:5]) or "none"
        raise ConversionError(f"no keys start with {prefix!r} (first keys: {sample})")
    return inside


def _path_to_key(path: tuple[str, ...]) -> str:
    """``('attn_layers', 'layers_3_1', 'net_0_0', 'kernel')`` -> ``'attn_layers.layers.3.1.net.0.0.weight'``."""
    parts = [re.sub(r"_(\d+)(?=_|$)", r".\1", p) for p in path[:-1]]
    return ".".join(parts + ["bias" if path[-1] == "bias" else "weight"])


def _to_torch_layout(path: tuple[str, ...], value: Any) -> np.ndarray:
    w = np.asarray(value)
    leaf = path[-1]
    if leaf == "kernel" and w.ndim == 2:
        return np.ascontiguousarray(w.T)  # Dense [in, out] -> Linear [out, in]
    if leaf in ("scale", "bias", "embedding"):
        return w
    raise ConversionError(f"cannot export {'/'.join(path)} {w.shape}: only Dense, LayerNorm and Embed params")


def params_to_compvis(params: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
    """lidiff params (Dense/LayerNorm/Embed leaves) -> ``{prefix + CompVis key: numpy array}`` in torch layout."""
    return {prefix + _path_to_key(path): _to_torch_layout(path, v) for path, v in flatten(params).items()}


# ---------------------------------------------------------------------------------------------- text encoder


def text_transformer_params_from_compvis(
    state_dict: Mapping[str, Any], target: Mapping[str, Any], *, prefix: str = TRANSFORMER_PREFIX
) -> Params:
    """CompVis ``cond_stage_model.transformer.*`` -> ``TransformerEmbedder`` params, strictly.

    Args:
      state_dict: ``{key: tensor or array}``; only keys starting with ``prefix`` are read.
      target: the ``TransformerEmbedder`` params tree (arrays or ``jax.ShapeDtypeStruct``), e.g.
        ``jax.eval_shape(model.init, rng, tokens)["params"]``; it fixes n_layer, widths and vocab size.
      prefix: stripped from the keys (``""`` for a bare ``TransformerWrapper`` state dict).

    Returns:
      params as nested float32 numpy arrays with exactly ``target``'s paths and shapes. ``to_logits.*`` is
      dropped (``IGNORED_TRANSFORMER_KEYS``).

    Raises:
      ConversionError: no key under ``prefix``, or naming every missing, unexpected and wrongly shaped tensor.
    """
    source = _strip_prefix(state_dict, prefix)
    try:
        return convert_state_dict(source, target, ignore=IGNORED_TRANSFORMER_KEYS)
    except ConversionError as e:
        raise ConversionError(f"{e}\n  (keys relative to prefix {prefix!r})") from None


def text_transformer_to_compvis(
    params: Mapping[str, Any], *, prefix: str = TRANSFORMER_PREFIX
) -> dict[str, np.ndarray]:
    """``TransformerEmbedder`` params -> ``{prefix + CompVis key: array}`` (no ``to_logits``: load non-strictly
    into a CompVis ``BERTEmbedder``, or add its head yourself)."""
    return params_to_compvis(params, prefix)


# ---------------------------------------------------------------------------------------------- class embedder


def class_embedder_params_from_compvis(
    state_dict: Mapping[str, Any], target: Mapping[str, Any], *, prefix: str = CLASS_EMBEDDER_PREFIX
) -> Params:
    """CompVis ``cond_stage_model.embedding.weight`` [n_classes, D] -> ``ClassEmbedder`` params, strictly.

    ``target`` is ``{"embedding": {"embedding": [n_classes, D]}}`` (arrays or shape structs). Any other key under
    ``prefix`` (e.g. a text encoder's ``cond_stage_model.transformer.*``) is reported as unexpected.
    """
    source = _strip_prefix(state_dict, prefix)
    try:
        return convert_state_dict(source, target)
    except ConversionError as e:
        raise ConversionError(f"{e}\n  (keys relative to prefix {prefix!r})") from None


def class_embedder_to_compvis(
    params: Mapping[str, Any], *, prefix: str = CLASS_EMBEDDER_PREFIX
) -> dict[str, np.ndarray]:
    """``ClassEmbedder`` params -> ``{prefix + 'embedding.weight': [n_classes, D]}``."""
    return params_to_compvis(params, prefix)
