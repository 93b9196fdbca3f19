"""First-stage autoencoder weights (diffusers or CompVis PyTorch state dicts) -> lidiff params.

Two sources:

- CompVis first-stage ``model.ckpt`` (``state_dict`` inside the Lightning checkpoint): keys already in CompVis naming;
  ``loss.*`` (LPIPS, discriminator, logvar) is dropped. ``prefix='first_stage_model.'`` takes the autoencoder out
  of a full LDM checkpoint (every key without the prefix is then ignored).
- diffusers ``AutoencoderKL`` / ``VQModel`` (``norm_type="group"``, ``DownEncoderBlock2D`` /
  ``AttnDownEncoderBlock2D`` and ``UpDecoderBlock2D`` / ``AttnUpDecoderBlock2D`` blocks): renamed into CompVis
  keys by ``diffusers_vae_to_compvis`` first.

Both are strict (``lidiff.convert.common.convert_state_dict``): a missing, unused or mis-shaped tensor raises
``ConversionError`` naming it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lidiff.convert.common import ConversionError, Params, convert_state_dict
from lidiff.models.autoencoder import AutoencoderKL
from lidiff.models.quantizer import VQModel

# diffusers attention leaf names (current and pre-0.14 ones) -> CompVis AttnBlock names.
_ATTN_LEAF = {
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
_RESNET_LEAF = {"conv_shortcut": "nin_shortcut"}

_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$")
_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$")
_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_ATTN_REST = re.compile(r"^(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.(weight|bias)$")


def _rename_leaf(kind: str, rest: str) -> str:
    """Inside a resnet or attention block: diffusers ``rest`` (e.g. ``to_out.0.weight``) -> CompVis."""
    if kind == "attentions":
        m = _ATTN_REST.match(rest)
        if m is None:
            return rest
        return f"{_ATTN_LEAF[m.group(1)]}.{m.group(2)}"
    head, _, tail = rest.partition(".")
    return f"{_RESNET_LEAF.get(head, head)}.{tail}"


def _as_conv1x1(value: Any) -> Any:
    """Linear weight [O, I] -> Conv2d 1x1 weight [O, I, 1, 1] (works for torch tensors and numpy arrays)."""
    return value.reshape(tuple(value.shape) + (1, 1))


def diffusers_vae_to_compvis(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Renames a diffusers ``AutoencoderKL``/``VQModel`` state dict into CompVis keys.

    - ``encoder.down_blocks.i.resnets.j`` -> ``encoder.down.i.block.j`` (``conv_shortcut`` -> ``nin_shortcut``),
      ``.attentions.j`` -> ``.attn.j``, ``.downsamplers.0.conv`` -> ``.downsample.conv``.
    - ``decoder.up_blocks.k`` -> ``decoder.up.{L-1-k}`` (diffusers lists decoder levels in execution order,
      CompVis by resolution), ``.upsamplers.0.conv`` -> ``.upsample.conv``.
    - ``mid_block.resnets.0/1`` -> ``mid.block_1/2``; ``mid_block.attentions.0`` -> ``mid.attn_1``;
      attention ``group_norm/to_q/to_k/to_v/to_out.0`` -> ``norm/q/k/v/proj_out`` with the Linear weights
      reshaped to Conv2d 1x1 [O, I, 1, 1], as CompVis stores them.
    - ``conv_norm_out`` -> ``norm_out``. ``conv_in``, ``conv_out``, ``quant_conv``, ``post_quant_conv`` and
      ``quantize.embedding.weight`` keep their names.

    Values are passed through (torch tensors stay tensors). Keys that match none of these rules are kept as they
    are, so the strict conversion afterwards names them as unexpected.
    """
    up_levels = {int(m.group(1)) for k in state_dict if (m := _UP.match(k))}
    num_up = max(up_levels) + 1 if up_levels else 0
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = key
        if m := _DOWN.match(key):
            i, kind, j, rest = m.groups()
            if kind == "downsamplers":
                new = f"encoder.down.{i}.downsample.{rest}"
            else:
                sub = "block" if kind == "resnets" else "attn"
                new = f"encoder.down.{i}.{sub}.{j}.{_rename_leaf(kind, rest)}"
        elif m := _UP.match(key):
            k, kind, j, rest = m.groups()
            level = num_up - 1 - int(k)
            if kind == "upsamplers":
                new = f"decoder.up.{level}.upsample.{rest}"
            else:
                sub = "block" if kind == "resnets" else "attn"
                new = f"decoder.up.{level}.{sub}.{j}.{_rename_leaf(kind, rest)}"
        elif m := _MID.match(key):
            part, kind, j, rest = m.groups()
            sub = f"block_{int(j) + 1}" if kind == "resnets" else f"attn_{int(j) + 1}"
            new = f"{part}.mid.{sub}.{_rename_leaf(kind, rest)}"
        elif key.startswith(("encoder.conv_norm_out.", "decoder.conv_norm_out.")):
            new = key.replace(".conv_norm_out.", ".norm_out.", 1)
        if new != key and re.search(r"\.(q|k|v|proj_out)\.weight$", new) and len(value.shape) == 2:
            value = _as_conv1x1(value)
        if new in out:
            raise ConversionError(f"two diffusers keys map onto {new!r} (second: {key!r})")
        out[new] = value
    return out


def abstract_params(model: AutoencoderKL | VQModel) -> Params:
    """The model's param tree as ``jax.ShapeDtypeStruct`` leaves (no compute, no memory)."""
    x = jnp.zeros((1, model.resolution, model.resolution, model.in_channels), jnp.float32)
    if isinstance(model, AutoencoderKL):
        init = lambda key: model.init(key, x, sample_posterior=False)  # noqa: E731
    elif isinstance(model, VQModel):
        init = lambda key: model.init(key, x)  # noqa: E731
    else:
        raise TypeError(f"expected AutoencoderKL or VQModel, got {type(model).__name__}")
    return jax.eval_shape(init, jax.random.key(0))["params"]


def autoencoder_params_from_compvis(
    state_dict: Mapping[str, Any], model: AutoencoderKL | VQModel, *, prefix: str = ""
) -> Params:
    """CompVis first-stage state dict (torch tensors or arrays) -> lidiff params (numpy float32), strictly.

    Args:
      state_dict: e.g. ``torch.load('model.ckpt')['state_dict']``; ``loss.*`` keys are dropped.
      model: the lidiff model the params are for (its config must match the checkpoint).
      prefix: when non-empty, only keys starting with it are used, with it removed
        (``'first_stage_model.'`` for a full LDM checkpoint).

    Raises:
      ConversionError: naming every missing, unexpected or mis-shaped tensor.
    """
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ConversionError(f"no key starts with prefix {prefix!r}")
    return convert_state_dict(state_dict, abstract_params(model), ignore=(r"^loss\.",))


def autoencoder_params_from_diffusers(state_dict: Mapping[str, Any], model: AutoencoderKL | VQModel) -> Params:
    """diffusers ``AutoencoderKL``/``VQModel`` ``state_dict()`` -> lidiff params (numpy float32), strictly.

    The diffusers model must have the CompVis layout: ``norm_type="group"`` and ``mid_block_add_attention`` equal
    to ``model.attn_type == "vanilla"``. Its ``scaling_factor``/``force_upcast`` are pipeline settings and not
    part of the weights: keep ``scale_factor`` in the LDM config.
    """
    return autoencoder_params_from_compvis(diffusers_vae_to_compvis(state_dict), model)
