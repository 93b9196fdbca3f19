"""lidiff params -> diffusers (PyTorch) state dicts, strictly: the inverse of ``diffusers_unet`` / ``diffusers_vae``.

Two entry points:

- ``unet_state_dict_to_diffusers(params, model)``: lidiff ``UNetModel`` params -> a ``UNet2DModel`` /
  ``UNet2DConditionModel`` state dict.
- ``autoencoder_state_dict_to_diffusers(params, model)``: lidiff ``AutoencoderKL`` / ``VQModel`` params -> an
  ``AutoencoderKL`` / ``VQModel`` state dict.

The UNet goes lidiff path -> CompVis key (``lidiff.convert.common``'s naming rule, backwards) -> diffusers key, by
the table in ``lidiff.convert.diffusers_unet``'s docstring read right to left. The autoencoder goes straight from
the lidiff path (its CompVis names ``mid.block_1`` and ``down.1.block.1`` give the same lidiff path shape, so the
path, not a CompVis key, is the unambiguous source). Layouts (lidiff NHWC -> PyTorch NCHW):

==============================  ==========================  ===========================
lidiff leaf                     torch weight                conversion
==============================  ==========================  ===========================
``kernel`` [kH, kW, I, O]       Conv2d [O, I, kH, kW]       ``transpose(3, 2, 0, 1)``
``kernel`` [1, 1, I, O]         Linear [O, I] (VAE attn)    ``k[0, 0].T``
``kernel`` [I, O]               Linear [O, I]               ``k.T``
``scale`` / ``embedding``       ``weight`` (copied)
``bias``                        ``bias`` (copied)
==============================  ==========================  ===========================

Each result is checked by renaming it back with the importer's diffusers -> CompVis renaming and converting it
strictly onto the params it came from, tensor by tensor: a key this module gets wrong is an error here, not a
silently different model.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from lidiff.convert.common import ConversionError, Params, convert_state_dict, flatten
from lidiff.models.autoencoder import AutoencoderKL
from lidiff.models.quantizer import VQModel
from lidiff.models.unet import UNetModel

StateDict = dict[str, np.ndarray]

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_TOP = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
        "label_emb.": "class_embedding.", "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.",
        "out.2.": "conv_out."}
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_PLAIN_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_MIDDLE = re.compile(r"^middle_block\.(\d)\.(.+)$")


def torch_weight(value: np.ndarray, leaf: str, *, linear: bool = False) -> np.ndarray:
    """One lidiff leaf -> the PyTorch tensor layout (float32, C-contiguous).

    value: ``kernel`` [kH, kW, I, O] (conv) or [I, O] (Dense); ``scale`` / ``bias`` [C]; ``embedding`` [N, D].
    linear: the torch module is a Linear although lidiff holds a 1x1 conv kernel [1, 1, I, O] -> [O, I].
    """
    value = np.asarray(value, np.float32)
    if leaf == "kernel":
        if value.ndim == 4 and linear:
            if value.shape[:2] != (1, 1):
                raise ConversionError(f"a {value.shape} conv kernel is not a 1x1 one and has no Linear layout")
            value = value[0, 0].T
        elif value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
    return np.ascontiguousarray(value)


# ---------------------------------------------------------------------------------------------------- UNet


def _resnet_rest(rest: str) -> str:
    """``in_layers.2.weight`` -> ``conv1.weight`` (CompVis ResBlock -> diffusers ResnetBlock2D)."""
    for old, new in _RESNET.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise ConversionError(f"{rest!r} is no part of a ResBlock")


def _attention_rest(rest: str, transformer: bool) -> str:
    """Inside an attention block: a spatial transformer keeps its names; plain attention renames its layers."""
    if transformer:
        return rest
    name, _, leaf = rest.partition(".")
    if name not in _PLAIN_ATTENTION:
        raise ConversionError(f"{rest!r} is no part of a plain attention block")
    return f"{_PLAIN_ATTENTION[name]}.{leaf}"


def _resampler_rest(rest: str, conv_name: str) -> str:
    """A Downsample (``op``) / Upsample (``conv``) conv, or a resampling ResBlock (``resblock_updown``)."""
    if rest.startswith(conv_name + "."):
        return "conv" + rest[len(conv_name):]
    return _resnet_rest(rest)


def compvis_to_diffusers_unet_key(key: str, model: UNetModel) -> str:
    """One CompVis UNet key (plain attention split into ``q``/``k``/``v``) -> its diffusers key.

    N = ``num_res_blocks``; ``input_blocks.{1 + l(N+1) + j}`` is down level l, entry j (j = N: the downsampler);
    ``output_blocks.{u(N+1) + j}`` is up block u (level L-1-u), entry j, whose slot after the resnet is attention
    when the level has it, and the upsampler (last entry of every up block but the last) comes after.
    """
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    transformer = model.use_spatial_transformer
    n, levels = model.num_res_blocks, len(model.channel_mult)
    if m := _MIDDLE.match(key):
        entry, rest = int(m.group(1)), m.group(2)
        if entry == 1:
            return f"mid_block.attentions.0.{_attention_rest(rest, transformer)}"
        return f"mid_block.resnets.{entry // 2}.{_resnet_rest(rest)}"
    m = _BLOCK.match(key)
    if m is None:
        raise ConversionError(f"{key!r} is not a key of the UNet")
    side, index, slot, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if side == "input_blocks":
        level, j = divmod(index - 1, n + 1)
        if j == n:
            return f"down_blocks.{level}.downsamplers.0.{_resampler_rest(rest, 'op')}"
        if slot == 0:
            return f"down_blocks.{level}.resnets.{j}.{_resnet_rest(rest)}"
        return f"down_blocks.{level}.attentions.{j}.{_attention_rest(rest, transformer)}"
    up, j = divmod(index, n + 1)
    has_attention = 2 ** (levels - 1 - up) in model.attention_resolutions
    if slot == 0:
        return f"up_blocks.{up}.resnets.{j}.{_resnet_rest(rest)}"
    if slot == 1 and has_attention:
        return f"up_blocks.{up}.attentions.{j}.{_attention_rest(rest, transformer)}"
    return f"up_blocks.{up}.upsamplers.0.{_resampler_rest(rest, 'conv')}"


def _check_inverse(compvis: Mapping[str, Any], params: Params, what: str) -> None:
    """The importer's strict conversion of ``compvis`` (the exported state dict renamed back to CompVis keys by
    the importer's own renaming) must give ``params`` again, tensor for tensor. ``params`` is its own target, so
    no model is traced."""
    back = convert_state_dict(compvis, params)
    want, got = flatten(params), flatten(back)
    wrong = sorted("/".join(p) for p in want if not np.array_equal(np.asarray(want[p]), got[p]))
    if wrong:
        raise ConversionError(f"the {what} state dict does not convert back onto the params it came from: "
                              + ", ".join(wrong[:20]))


def unet_state_dict_to_diffusers(params: Params, model: UNetModel) -> StateDict:
    """lidiff ``UNetModel`` params -> a diffusers UNet state dict (numpy float32, NCHW layouts).

    Args:
      params: the UNet's params (``params["unet"]`` of a stage-2 checkpoint), nested dict of arrays.
      model: the ``UNetModel`` they belong to (its ``num_res_blocks``, levels and attention placement decide
        the diffusers block indices).

    Returns:
      ``{diffusers key: array}``, e.g. ``down_blocks.1.attentions.0.to_q.weight`` [C, C].

    Raises:
      ConversionError: a param the mapping does not know, or a result that does not convert back onto
      ``params`` exactly.
    """
    # the importer's lidiff path -> CompVis key rule (UNet module names carry no digits after an underscore)
    from lidiff.convert.diffusers_unet import _path_to_compvis_key, diffusers_unet_to_compvis, split_compvis_qkv

    state: StateDict = {}
    for path, value in flatten(params).items():
        key = compvis_to_diffusers_unet_key(_path_to_compvis_key(path), model)
        if key in state:
            raise ConversionError(f"two UNet params map onto {key!r}")
        state[key] = torch_weight(value, path[-1])
    compvis = split_compvis_qkv(diffusers_unet_to_compvis(state, model), lambda c: model.heads_at(c)[0])
    _check_inverse(compvis, params, "UNet")
    return state


# ------------------------------------------------------------------------------------------------- autoencoder


def _numbered(name: str, prefix: str) -> int | None:
    m = re.fullmatch(prefix + r"_(\d+)", name)
    return int(m.group(1)) if m else None


def _vae_member(module: str, rest: tuple[str, ...]) -> tuple[str, bool]:
    """``block_j`` / ``attn_j`` / ``downsample`` / ``upsample`` of a level -> (diffusers tail, is a Linear)."""
    if (j := _numbered(module, "block")) is not None:
        names = [("conv_shortcut" if p == "nin_shortcut" else p) for p in rest]
        return f"resnets.{j}." + ".".join(names), False
    if (j := _numbered(module, "attn")) is not None:
        layer = rest[0]
        if layer not in _PLAIN_ATTENTION:
            raise ConversionError(f"attention layer {layer!r} is unknown")
        return f"attentions.{j}.{_PLAIN_ATTENTION[layer]}", layer != "norm"
    if module in ("downsample", "upsample"):
        return f"{module}rs.0." + ".".join(rest), False
    raise ConversionError(f"autoencoder module {module!r} is unknown")


def lidiff_to_diffusers_vae_key(path: tuple[str, ...], num_levels: int) -> tuple[str, bool]:
    """A lidiff autoencoder param path -> (diffusers key, whether the torch module is a Linear).

    ``encoder/down_i/block_j`` -> ``encoder.down_blocks.i.resnets.j`` (``nin_shortcut`` -> ``conv_shortcut``),
    ``attn_j`` -> ``attentions.j`` (norm/q/k/v/proj_out -> group_norm/to_q/to_k/to_v/to_out.0, Linear),
    ``downsample/conv`` -> ``downsamplers.0.conv``; ``decoder/up_i`` -> ``decoder.up_blocks.{L-1-i}`` (diffusers
    lists decoder levels in execution order); ``mid/block_1|attn_1|block_2`` -> ``mid_block.resnets.0|attentions.0|
    resnets.1``; ``norm_out`` -> ``conv_norm_out``; ``quantize/embedding`` -> ``quantize.embedding``; the rest
    keeps its name.
    """
    *modules, leaf = path
    leaf = _LEAF[leaf]
    if modules[0] in ("encoder", "decoder") and len(modules) > 2:
        part, group, module, rest = modules[0], modules[1], modules[2], tuple(modules[3:])
        if group == "mid":
            if module == "attn_1":
                tail, linear = _vae_member("attn_0", rest)
            else:
                tail, linear = _vae_member(f"block_{_numbered(module, 'block') - 1}", rest)
            return f"{part}.mid_block.{tail}.{leaf}", linear
        if (i := _numbered(group, "down")) is not None:
            tail, linear = _vae_member(module, rest)
            return f"{part}.down_blocks.{i}.{tail}.{leaf}", linear
        if (i := _numbered(group, "up")) is not None:
            tail, linear = _vae_member(module, rest)
            return f"{part}.up_blocks.{num_levels - 1 - i}.{tail}.{leaf}", linear
        raise ConversionError(f"autoencoder param {'/'.join(path)} is unknown")
    names = ["conv_norm_out" if p == "norm_out" else p for p in modules]
    return ".".join(names + [leaf]), False


def autoencoder_state_dict_to_diffusers(params: Params, model: AutoencoderKL | VQModel) -> StateDict:
    """lidiff ``AutoencoderKL`` / ``VQModel`` params -> a diffusers ``AutoencoderKL`` / ``VQModel`` state dict.

    Args:
      params: the first stage's params (``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``, and for
        VQ ``quantize/embedding/embedding`` [n_embed, embed_dim]).
      model: the lidiff autoencoder they belong to.

    Returns:
      ``{diffusers key: float32 array}``; attention q/k/v/proj_out as Linear weights [C, C].

    Raises:
      ConversionError: an unknown param, or a result that does not convert back onto ``params`` exactly.
    """
    from lidiff.convert.diffusers_vae import diffusers_vae_to_compvis

    state: StateDict = {}
    for path, value in flatten(params).items():
        key, linear = lidiff_to_diffusers_vae_key(path, len(model.ch_mult))
        if key in state:
            raise ConversionError(f"two autoencoder params map onto {key!r}")
        state[key] = torch_weight(value, path[-1], linear=linear)
    _check_inverse(diffusers_vae_to_compvis(state), params, "autoencoder")
    return state
