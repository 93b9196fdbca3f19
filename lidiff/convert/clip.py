"""Hugging Face ``CLIPTextModel`` weights -> ``lidiff.models.clip.CLIPTextTransformer`` params, strictly.

Three key layouts are read (the key map is in ``lidiff.models.clip``'s docstring):

- ``text_model.embeddings.token_embedding.weight``, ... : a Hugging Face ``text_encoder/model.safetensors`` as
  the Stable Diffusion repositories ship it (transformers < 5);
- ``embeddings.token_embedding.weight``, ... : the same without the prefix (``CLIPTextModel.state_dict()`` and
  ``save_pretrained`` in transformers 5);
- ``cond_stage_model.transformer.text_model.embeddings...``: the text encoder inside a CompVis SD v1 checkpoint.
  Keys outside that prefix (UNet, autoencoder) are ignored, so a whole checkpoint's ``state_dict`` can be passed.

``text_model.embeddings.position_ids`` (a non-trainable buffer older checkpoints store) is ignored. Everything
else must map one to one onto the lidiff tree with the right shapes, else ``ConversionError`` (a ``ValueError``)
lists every missing lidiff param, every unexpected source key and every shape mismatch. Linear weights
[out, in] become Dense kernels [in, out]; LayerNorm weights become ``scale``; embedding tables are copied.

SD v2's checkpoints in Stability's layout (``cond_stage_model.model.*``, OpenCLIP names with a fused
``in_proj_weight``) are not read here; use diffusers' ``text_encoder`` folder of the same model, which is a
23-layer ``CLIPTextModel`` (see ``lidiff.models.clip`` on ``output``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lidiff.convert.common import ConversionError, Params, convert_state_dict, to_numpy_state_dict
from lidiff.errors import ConfigError, MissingInputError
from lidiff.models.clip import ACTIVATIONS, CLIPTextTransformer

COMPVIS_PREFIX = "cond_stage_model.transformer.text_model."
HF_PREFIX = "text_model."
# Keys (after the prefix is removed) that hold no parameter of the text tower.
IGNORED_KEYS = (r"^embeddings\.position_ids$",)


def clip_config_from_hf(config: Any) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` (or its ``config.json`` as a dict) -> ``CLIPTextTransformer`` kwargs.

    A full ``CLIPConfig`` dict (with a ``text_config`` entry) is accepted too. Raises ``ConfigError`` for a
    missing field or an activation other than ``quick_gelu`` / ``gelu``.
    """
    if not isinstance(config, Mapping):
        config = config.to_dict()
    if "text_config" in config and "vocab_size" not in config:
        config = config["text_config"]
    needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings")
    missing = [k for k in needed if k not in config]
    if missing:
        raise ConfigError(f"CLIP text config lacks {', '.join(missing)}")
    act = config.get("hidden_act", "quick_gelu")  # transformers' CLIPTextConfig default
    if act not in ACTIVATIONS:
        raise ConfigError(f"CLIP text config hidden_act={act!r} is not supported; lidiff has {ACTIVATIONS}")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ConfigError(f"hidden_size {config['hidden_size']} is not a multiple of num_attention_heads "
                          f"{config['num_attention_heads']}")
    return dict(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        max_position_embeddings=int(config["max_position_embeddings"]),
        activation=act,
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
    )


def abstract_params(model: CLIPTextTransformer) -> Params:
    """The model's param tree as ``jax.ShapeDtypeStruct`` leaves (no compute, no memory)."""
    ids = jnp.zeros((1, model.max_position_embeddings), jnp.int32)
    return jax.eval_shape(lambda key: model.init(key, ids), jax.random.key(0))["params"]


def _strip_prefix(source: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Removes the layout's prefix: -> (``{key without prefix: value}``, prefix)."""
    if any(k.startswith(COMPVIS_PREFIX) for k in source):
        return {k[len(COMPVIS_PREFIX):]: v for k, v in source.items() if k.startswith(COMPVIS_PREFIX)}, COMPVIS_PREFIX
    if any(k.startswith(HF_PREFIX) for k in source):
        # keys without the prefix stay as they are and are reported as unexpected
        return {(k[len(HF_PREFIX):] if k.startswith(HF_PREFIX) else k): v for k, v in source.items()}, HF_PREFIX
    return dict(source), ""


def clip_params_from_state_dict(
    state_dict: Mapping[str, Any], config: Mapping[str, Any] | CLIPTextTransformer
) -> Params:
    """A ``CLIPTextModel`` state dict -> ``CLIPTextTransformer`` params (nested float32 numpy), strictly.

    Args:
      state_dict: ``{key: numpy array or torch tensor}`` in one of the layouts of this module's docstring
        (float16 weights are widened to float32).
      config: ``CLIPTextTransformer`` kwargs (e.g. from ``clip_config_from_hf``) or the module itself; it fixes
        layer count, widths, vocabulary and position table sizes.

    Raises:
      ConversionError: no CLIP keys at all, or naming every missing param, unexpected key and wrong shape.
    """
    model = config if isinstance(config, CLIPTextTransformer) else CLIPTextTransformer(**config)
    source, prefix = _strip_prefix(to_numpy_state_dict(state_dict))
    if not source:
        raise ConversionError("empty state dict: no CLIP text encoder weights")
    try:
        return convert_state_dict(source, abstract_params(model), ignore=IGNORED_KEYS)
    except ConversionError as e:
        where = f"keys relative to prefix {prefix!r}" if prefix else "keys without prefix"
        raise ConversionError(f"CLIP text encoder: {e}\n  ({where}; missing names are lidiff param paths)") from None


def _read_safetensors(folder: str) -> dict[str, Any]:
    from safetensors.numpy import load_file

    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = single + ".index.json"
    if not os.path.isfile(index):
        raise MissingInputError(
            f"no CLIP text encoder weights in {folder}: expected {single} (or a sharded {index}); a .bin-only folder "
            f"can be re-saved with transformers: CLIPTextModel.from_pretrained(folder).save_pretrained(folder)"
        )
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors: dict[str, Any] = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise MissingInputError(f"{index} names {shard}, but {path} does not exist")
        tensors.update(load_file(path))
    return tensors


def load_clip_text_encoder(
    path: str, *, dtype: Any = jnp.float32, attention_kernel: str = "auto"
) -> tuple[CLIPTextTransformer, Params]:
    """Reads a Hugging Face ``CLIPTextModel`` folder (``config.json`` + ``model.safetensors``, or sharded with
    ``model.safetensors.index.json``) with safetensors alone (no torch) -> ``(module, params)``.

    ``path`` is e.g. a Stable Diffusion repository's ``text_encoder/`` folder. ``dtype`` and ``attention_kernel``
    set the module's compute dtype and attention kernel; params stay float32 numpy.

    Raises:
      MissingInputError: the folder, ``config.json`` or the weights file is missing (the message names it).
      ConfigError: the config is not a supported CLIP text config.
      ConversionError: the weights do not match the config.
    """
    if not os.path.isdir(path):
        raise MissingInputError(f"CLIP text encoder folder {path} does not exist")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise MissingInputError(f"no {config_path}: a Hugging Face CLIPTextModel folder holds config.json")
    with open(config_path) as f:
        kwargs = clip_config_from_hf(json.load(f))
    model = CLIPTextTransformer(**kwargs, dtype=dtype, attention_kernel=attention_kernel)
    params = clip_params_from_state_dict(_read_safetensors(path), model)
    return model, params
