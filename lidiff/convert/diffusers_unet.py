"""diffusers and CompVis UNet state dicts -> lidiff ``UNetModel`` params, strictly.

Three entry points, all checked key by key against the model's parameter tree:

- ``unet_params_from_diffusers(state_dict, model)``: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel``
  state dict (PyTorch, NCHW) -> lidiff params.
- ``diffusers_unet_to_compvis(state_dict, model)``: the same state dict renamed to CompVis
  ``openaimodel.UNetModel`` keys (numpy arrays), plain attention re-packed into the legacy per-head ``qkv`` Conv1d.
- ``unet_params_from_compvis(state_dict, model)``: a CompVis state dict (bare UNet keys, or a whole LDM
  checkpoint's ``model.diffusion_model.*`` / ``model_ema.diffusion_model*`` entries) -> lidiff params.

Key mapping (N = ``num_res_blocks``, l = block index, j = entry within the block; ``up_blocks`` and
``output_blocks`` both run from the deepest level up)::

    time_embedding.linear_1 / linear_2         time_embed.0 / time_embed.2
    class_embedding                            label_emb
    conv_in                                    input_blocks.0.0
    down_blocks.l.resnets.j                    input_blocks.{1 + l(N+1) + j}.0
    down_blocks.l.attentions.j                 input_blocks.{1 + l(N+1) + j}.1
    down_blocks.l.downsamplers.0(.conv)        input_blocks.{(l+1)(N+1)}.0(.op)
    mid_block.resnets.0 / attentions.0 / resnets.1   middle_block.0 / .1 / .2
    up_blocks.l.resnets.j / attentions.j       output_blocks.{l(N+1) + j}.0 / .1
    up_blocks.l.upsamplers.0                   output_blocks.{l(N+1) + N}.{2 if the level has attention else 1}
    conv_norm_out / conv_out                   out.0 / out.2
    resnet: norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut
         -> in_layers.0 in_layers.2 emb_layers.1 out_layers.0 out_layers.3 skip_connection
    plain attention: group_norm to_q to_k to_v to_out.0 (old: query key value proj_attn)
         -> norm, qkv (CompVis, packed per head) or q k v (lidiff), proj_out
    Transformer2DModel (norm, proj_in, transformer_blocks.k.*, proj_out): same names in both.

CompVis ``UNetModel`` config -> diffusers config that builds the same network (verified by the parity tests):

==================================  ===========================================================================
CompVis                             diffusers
==================================  ===========================================================================
model_channels * channel_mult       ``block_out_channels``
num_res_blocks                      ``layers_per_block``
attention_resolutions (ds = 2**l)   level l: ``AttnDownBlock2D``/``AttnUpBlock2D`` (``UNet2DModel``) or
                                    ``CrossAttnDownBlock2D``/``CrossAttnUpBlock2D`` (``UNet2DConditionModel``),
                                    else ``DownBlock2D``/``UpBlock2D``; up blocks list levels in reverse
middle block (always attention)     ``UNetMidBlock2D`` / ``UNetMidBlock2DCrossAttn`` (mid_block_scale_factor 1)
num_head_channels (plain attn)      ``UNet2DModel(attention_head_dim=num_head_channels)`` (a head width);
                                    with num_heads instead, ``attention_head_dim = ch // num_heads`` (one int:
                                    only when that width is the same at every attention level)
num_heads / num_head_channels       ``UNet2DConditionModel(attention_head_dim=heads)``: despite its name this is
(spatial transformer)               the NUMBER of heads (an int, or a per-level tuple ``ch_l // num_head_channels``);
                                    head width is ``ch // heads`` (CompVis legacy=True; legacy=False agrees when
                                    num_head_channels divides every attention width)
transformer_depth                   ``transformer_layers_per_block``
context_dim                         ``cross_attention_dim``
use_linear_in_transformer           ``use_linear_projection``
use_scale_shift_norm                ``resnet_time_scale_shift="scale_shift"`` (``UNet2DModel`` then also needs
                                    ``attn_norm_num_groups=32``, else its mid attention has no GroupNorm)
resblock_updown                     ``ResnetDownsampleBlock2D``/``ResnetUpsampleBlock2D`` and
                                    ``downsample_type="resnet"``/``upsample_type="resnet"`` for attention levels
num_classes (adm ``label_emb``)     ``num_class_embeds`` with ``class_embed_type=None``
fixed                               ``flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu",
                                    norm_num_groups=32, norm_eps=1e-5, center_input_sample=False,
                                    time_embedding_type="positional", only_cross_attention=False,
                                    upcast_attention=False (fp32 anyway), dual_cross_attention=False``
==================================  ===========================================================================
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from lidiff.convert.common import (
    ConversionError,
    Params,
    compvis_key_to_path,
    convert_state_dict,
    flatten,
    to_numpy_state_dict,
)
from lidiff.models.unet import UNetModel, unet_param_shapes

COMPVIS_PREFIX = "model.diffusion_model."
COMPVIS_EMA_PREFIX = "model_ema.diffusion_model"

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_PLAIN_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_TRANSFORMER = ("norm.", "proj_in.", "transformer_blocks.", "proj_out.")
_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "class_embedding.": "label_emb.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------------------------------------------
# Target tree and CompVis key list of a model


def _path_to_compvis_key(path: tuple[str, ...]) -> str:
    parts = [re.sub(r"_(\d+)(?=_|$)", r".\1", p) for p in path[:-1]]
    leaf = "bias" if path[-1] == "bias" else "weight"
    return ".".join(parts + [leaf])


def _is_plain_attention(flat: Mapping[tuple[str, ...], Any], parent: tuple[str, ...]) -> bool:
    return all(parent + (n, "kernel") in flat for n in ("q", "k", "v", "proj_out"))


def compvis_unet_keys(model: UNetModel) -> list[str]:
    """The CompVis ``openaimodel.UNetModel`` state-dict keys (without prefix) of ``model``, sorted.

    Plain attention blocks list one packed ``qkv.weight``/``qkv.bias`` instead of lidiff's q, k, v.
    """
    flat = flatten(unet_param_shapes(model))
    keys = set()
    for path in flat:
        if path[-2] in ("q", "k", "v") and _is_plain_attention(flat, path[:-2]):
            path = path[:-2] + ("qkv", path[-1])
        keys.add(_path_to_compvis_key(path))
    return sorted(keys)


# ----------------------------------------------------------------------------------------------------------------
# Legacy qkv packing


def _heads_fn(num_heads: int | Callable[[int], int]) -> Callable[[int], int]:
    return num_heads if callable(num_heads) else (lambda _c: num_heads)


def pack_legacy_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int) -> np.ndarray:
    """q, k, v weights [C, C(, 1)] or biases [C] -> the CompVis per-head packed ``qkv`` [3C, C(, 1)] / [3C].

    Output row ``h*3d + i*d + j`` holds row ``h*d + j`` of (q, k, v)[i] (``QKVAttentionLegacy`` order).
    """
    c = q.shape[0]
    d = c // num_heads
    stacked = np.stack([w.reshape((num_heads, d) + w.shape[1:]) for w in (q, k, v)], axis=1)
    return stacked.reshape((3 * c,) + q.shape[1:])


def split_legacy_qkv(qkv: np.ndarray, num_heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of ``pack_legacy_qkv``: [3C, ...] -> three [C, ...] (q, k, v), heads contiguous in each."""
    c = qkv.shape[0] // 3
    if 3 * c != qkv.shape[0] or c % num_heads:
        raise ConversionError(f"qkv of {qkv.shape[0]} rows cannot be split into 3 x {num_heads} heads")
    d = c // num_heads
    w = qkv.reshape((num_heads, 3, d) + qkv.shape[1:])
    return tuple(w[:, i].reshape((c,) + qkv.shape[1:]) for i in range(3))  # type: ignore[return-value]


def split_compvis_qkv(
    state_dict: Mapping[str, np.ndarray], num_heads: int | Callable[[int], int]
) -> dict[str, np.ndarray]:
    """Replaces every ``<prefix>.qkv.{weight,bias}`` by ``<prefix>.{q,k,v}.{weight,bias}``.

    ``num_heads``: the head count, or a function of the block's channel count C returning it.
    """
    heads_for = _heads_fn(num_heads)
    out: dict[str, np.ndarray] = {}
    for key, w in state_dict.items():
        block, name, leaf = ([""] + key.rsplit(".", 2))[-3:]
        if name == "qkv":
            base = f"{block}." if block else ""
            for part_name, part in zip("qkv", split_legacy_qkv(w, heads_for(w.shape[0] // 3))):
                out[f"{base}{part_name}.{leaf}"] = part
        else:
            out[key] = w
    return out


# ----------------------------------------------------------------------------------------------------------------
# diffusers -> CompVis names


def _map_resnet(rest: str) -> str | None:
    name, _, leaf = rest.partition(".")
    return f"{_RESNET[name]}.{leaf}" if name in _RESNET else None


def _map_attention(rest: str) -> str | None:
    if rest.startswith(_TRANSFORMER):
        return rest
    for old, new in _PLAIN_ATTENTION.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return None


def _map_block_member(kind: str, rest: str) -> tuple[int, str | None]:
    """(slot within the CompVis entry, mapped tail) of a resnet or attention inside a diffusers block."""
    return (0, _map_resnet(rest)) if kind == "resnets" else (1, _map_attention(rest))


def _map_key(key: str, n: int, up_attn_levels: set[int]) -> str | None:
    """One diffusers key -> its CompVis key (plain attention as q/k/v), or None when it is not a UNet key."""
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    m = _MID.match(key)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if (kind == "resnets" and j in (0, 1)) or (kind == "attentions" and j == 0):
            _, mapped = _map_block_member(kind, rest)
            entry = 2 * j if kind == "resnets" else 1
            return None if mapped is None else f"middle_block.{entry}.{mapped}"
        return None
    m = _BLOCK.match(key)
    if not m:
        return None
    side, level, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down_blocks":
        if kind in ("resnets", "attentions") and j < n:
            slot, mapped = _map_block_member(kind, rest)
            return None if mapped is None else f"input_blocks.{1 + level * (n + 1) + j}.{slot}.{mapped}"
        if kind == "downsamplers" and j == 0:
            mapped = "op" + rest[len("conv") :] if rest.startswith("conv.") else _map_resnet(rest)
            return None if mapped is None else f"input_blocks.{(level + 1) * (n + 1)}.0.{mapped}"
        return None
    if kind in ("resnets", "attentions") and j <= n:
        slot, mapped = _map_block_member(kind, rest)
        return None if mapped is None else f"output_blocks.{level * (n + 1) + j}.{slot}.{mapped}"
    if kind == "upsamplers" and j == 0:
        mapped = rest if rest.startswith("conv.") else _map_resnet(rest)
        slot = 2 if level in up_attn_levels else 1
        return None if mapped is None else f"output_blocks.{level * (n + 1) + n}.{slot}.{mapped}"
    return None


def _diffusers_to_split_compvis(state_dict: Mapping[str, Any], model: UNetModel) -> dict[str, np.ndarray]:
    """diffusers keys -> CompVis keys, with plain attention still split into q, k, v (Linear layouts)."""
    source = to_numpy_state_dict(state_dict)
    n = model.num_res_blocks
    resnet_counts: dict[tuple[str, int], int] = {}
    for key in source:
        m = _BLOCK.match(key)
        if m and m.group(3) == "resnets":
            side_level = (m.group(1), int(m.group(2)))
            resnet_counts[side_level] = max(resnet_counts.get(side_level, 0), int(m.group(4)) + 1)
    wrong = {f"{s}.{lvl}: {c}" for (s, lvl), c in resnet_counts.items() if c != (n if s == "down_blocks" else n + 1)}
    if wrong:
        raise ConversionError(
            f"the model has num_res_blocks={n}, so down blocks need {n} resnets and up blocks {n + 1}; "
            f"the state dict has {sorted(wrong)}"
        )
    matches = [m for m in map(_BLOCK.match, source) if m]
    up_attn_levels = {int(m.group(2)) for m in matches if m.group(1) == "up_blocks" and m.group(3) == "attentions"}
    out, unknown = {}, []
    for key, w in source.items():
        mapped = _map_key(key, n, up_attn_levels)
        if mapped is None:
            unknown.append(key)
        else:
            out[mapped] = w
    if unknown:
        raise ConversionError(f"unknown diffusers UNet keys ({len(unknown)}): " + ", ".join(sorted(unknown)[:50]))
    return out


def unet_params_from_diffusers(state_dict: Mapping[str, Any], model: UNetModel) -> Params:
    """diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` state dict -> lidiff params of ``model``.

    Args:
      state_dict: ``{diffusers key: torch tensor or array}`` (NCHW layouts).
      model: the lidiff ``UNetModel`` with the equivalent config (see the module docstring).

    Returns:
      nested dict of float32 numpy arrays with exactly the model's param paths and shapes.

    Raises:
      ConversionError: unknown diffusers keys, a resnet count that contradicts ``num_res_blocks``, or any
      missing / unexpected / mis-shaped parameter.
    """
    return convert_state_dict(_diffusers_to_split_compvis(state_dict, model), unet_param_shapes(model))


def diffusers_unet_to_compvis(state_dict: Mapping[str, Any], model: UNetModel) -> dict[str, np.ndarray]:
    """Renames a diffusers UNet state dict to CompVis ``openaimodel.UNetModel`` keys (no prefix).

    Plain attention blocks get the CompVis layouts: ``qkv`` Conv1d [3C, C, 1] packed per head with the head
    count of ``model`` (``model.heads_at(C)``) and ``proj_out`` Conv1d [C, C, 1]. Everything else keeps its
    shape. Prefix the keys with ``model.diffusion_model.`` to make the UNet part of an LDM checkpoint.
    """
    split = _diffusers_to_split_compvis(state_dict, model)
    plain_blocks = {key[: -len(".q.weight")] for key in split if key.endswith(".q.weight")}
    out: dict[str, np.ndarray] = {}
    for key, w in split.items():
        block, name, leaf = ([""] + key.rsplit(".", 2))[-3:]
        if block in plain_blocks and name in ("q", "k", "v"):
            if name == "q":
                ws = [split[f"{block}.{n}.{leaf}"] for n in ("q", "k", "v")]
                if leaf == "weight":  # Linear [C, C] -> Conv1d [C, C, 1]
                    ws = [x.reshape(x.shape[0], x.shape[1], 1) for x in ws]
                out[f"{block}.qkv.{leaf}"] = pack_legacy_qkv(*ws, model.heads_at(ws[0].shape[0])[0])
        elif block in plain_blocks and name == "proj_out" and leaf == "weight" and w.ndim == 2:
            out[key] = w.reshape(w.shape[0], w.shape[1], 1)
        else:
            out[key] = w
    return out


def unet_params_from_compvis(
    state_dict: Mapping[str, Any], model: UNetModel, *, prefix: str = COMPVIS_PREFIX, ema: bool = False
) -> Params:
    """CompVis ``openaimodel.UNetModel`` weights -> lidiff params of ``model``.

    Args:
      state_dict: a whole LDM checkpoint's ``state_dict`` (the UNet entries are those under ``prefix``; the
        first stage, cond stage, schedule buffers and EMA entries are other components and are left alone),
        or a bare UNet state dict (used when no key starts with ``prefix``).
      model: the lidiff ``UNetModel`` built with the checkpoint's config.
      prefix: prefix of the UNet keys.
      ema: read the EMA weights instead, stored as ``model_ema.diffusion_model<key without dots>``.

    Returns:
      nested dict of float32 numpy arrays with exactly the model's param paths and shapes.

    Raises:
      ConversionError: any missing / unexpected / mis-shaped parameter, or a qkv that does not split into the
      model's heads.
    """
    if ema:
        expected = compvis_unet_keys(model)
        by_dotless = {COMPVIS_EMA_PREFIX + k.replace(".", ""): k for k in expected}
        if len(by_dotless) != len(expected):
            raise ConversionError("the model's CompVis keys collide once their dots are removed")
        missing = [k for k in by_dotless if k not in state_dict]
        unexpected = [k for k in state_dict if k.startswith(COMPVIS_EMA_PREFIX) and k not in by_dotless]
        if missing or unexpected:
            raise ConversionError(
                f"EMA entries do not match the model: missing ({len(missing)}): {', '.join(sorted(missing)[:50])}; "
                f"unexpected ({len(unexpected)}): {', '.join(sorted(unexpected)[:50])}"
            )
        selected = {by_dotless[k]: v for k, v in state_dict.items() if k in by_dotless}
    elif any(k.startswith(prefix) for k in state_dict):
        selected = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    else:
        selected = dict(state_dict)
    split = split_compvis_qkv(to_numpy_state_dict(selected), lambda c: model.heads_at(c)[0])
    return convert_state_dict(split, unet_param_shapes(model), key_to_path=compvis_key_to_path)
