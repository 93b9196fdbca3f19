"""lidiff models and schedules -> diffusers ``config.json`` / ``scheduler_config.json`` dicts.

The inverse of ``lidiff.convert.infer.unet_fields_from_diffusers`` / ``process_from_diffusers_scheduler``, by the
table in ``lidiff.convert.diffusers_unet``'s docstring. Where a lidiff setting has no diffusers equivalent, the
functions raise ``lidiff.errors.ConfigError`` naming the config field; nothing is approximated.

- ``unet_config(model, sample_size)``: ``UNet2DConditionModel`` (spatial transformer) or ``UNet2DModel`` (plain
  attention) config, with ``num_class_embeds`` for a UNet with a ``label_emb`` (adm class conditioning).
- ``autoencoder_config(model, scale_factor)``: ``AutoencoderKL`` or ``VQModel`` config, ``scaling_factor`` the
  run's latent scale.
- ``scheduler_config(process)``: a ``DDIMScheduler`` config with the run's betas and prediction type, and the
  settings under which diffusers' DDIM steps are CompVis's (``steps_offset=1``, ``set_alpha_to_one=False``,
  ``timestep_spacing="leading"``, ``clip_sample=False``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from lidiff.diffusion.schedule import make_beta_schedule
from lidiff.errors import ConfigError
from lidiff.models.autoencoder import AutoencoderKL
from lidiff.models.quantizer import VQModel
from lidiff.models.unet import UNetModel

# The diffusers release whose config format these dicts follow (its loaders read them from 0.9 on).
DIFFUSERS_VERSION = "0.30.0"
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# Settings of lidiff's (CompVis's) UNet that diffusers must be told explicitly.
_UNET_FIXED = dict(flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu", norm_num_groups=32,
                   norm_eps=1e-5, center_input_sample=False, time_embedding_type="positional",
                   class_embed_type=None, mid_block_scale_factor=1)
_FIELD = "config.diffusion.model"


def _header(class_name: str) -> dict[str, Any]:
    return {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION}


def _attention_levels(model: UNetModel) -> list[int]:
    """Levels l (ds = 2**l) whose blocks carry attention."""
    return [level for level in range(len(model.channel_mult)) if 2 ** level in model.attention_resolutions]


def _block_types(model: UNetModel, attention: str) -> tuple[list[str], list[str]]:
    """(down_block_types, up_block_types): ``<attention>DownBlock2D`` at attention levels, else ``DownBlock2D`` /
    ``ResnetDownsampleBlock2D`` (``resblock_updown``); up blocks list the levels in reverse."""
    attn = set(_attention_levels(model))
    plain_down, plain_up = (("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if model.resblock_updown
                            else ("DownBlock2D", "UpBlock2D"))
    levels = range(len(model.channel_mult))
    down = [f"{attention}DownBlock2D" if level in attn else plain_down for level in levels]
    up = [f"{attention}UpBlock2D" if level in attn else plain_up for level in reversed(levels)]
    return down, up


def _plain_head_width(model: UNetModel, widths: list[int]) -> int:
    """``UNet2DModel.attention_head_dim``: one head width for every attention block (levels and middle)."""
    attention_widths = sorted({widths[level] for level in _attention_levels(model)} | {widths[-1]})
    head_dims = {width: model.heads_at(width)[1] for width in attention_widths}
    if len(set(head_dims.values())) != 1:
        raise ConfigError(f"{_FIELD}.num_heads={model.num_heads} gives head widths {head_dims} (channels: width) at "
                          "the attention levels; diffusers' UNet2DModel has one head width (attention_head_dim) for "
                          f"all of them. Only a model trained with {_FIELD}.num_head_channels can be exported.")
    return head_dims[attention_widths[0]]


def _transformer_heads(model: UNetModel, widths: list[int]) -> int | list[int]:
    """``UNet2DConditionModel.attention_head_dim`` (a head COUNT there): one int, or one per level."""
    checked = sorted(set(_attention_levels(model)) | {len(widths) - 1})
    for level in checked:
        heads, head_dim = model.heads_at(widths[level])
        if heads * head_dim != widths[level]:
            raise ConfigError(f"{_FIELD}: the spatial transformer at width {widths[level]} has {heads} heads of "
                              f"{head_dim} channels (inner width {heads * head_dim}); diffusers' transformers are "
                              "exactly as wide as their block (set num_head_channels to a divisor of every width)")
    heads = [model.heads_at(width)[0] for width in widths]
    return heads[0] if len(set(heads)) == 1 else heads


def unet_config(model: UNetModel, sample_size: int) -> dict[str, Any]:
    """The diffusers config of the UNet that computes what ``model`` computes.

    sample_size: the latent side length at the training resolution (the pipelines' default size).
    Returns a ``config.json`` dict whose ``_class_name`` is ``UNet2DConditionModel`` (spatial transformer) or
    ``UNet2DModel``. Raises ``ConfigError`` for a UNet diffusers cannot express (named field).
    """
    widths = [model.model_channels * m for m in model.channel_mult]
    config = dict(
        sample_size=int(sample_size), in_channels=model.in_channels, out_channels=model.out_channels,
        block_out_channels=widths, layers_per_block=model.num_res_blocks, dropout=float(model.dropout),
        resnet_time_scale_shift="scale_shift" if model.use_scale_shift_norm else "default",
        num_class_embeds=model.num_classes, **_UNET_FIXED,
    )
    if not model.conv_resample:
        raise ConfigError(f"{_FIELD}.conv_resample=False (pooling / plain nearest resampling): diffusers' UNet "
                          "blocks resample with convolutions")
    if not model.use_spatial_transformer:
        down, up = _block_types(model, "Attn")
        return {**_header("UNet2DModel"), **config, "down_block_types": down, "up_block_types": up,
                "mid_block_type": "UNetMidBlock2D", "add_attention": True, "attn_norm_num_groups": 32,
                "attention_head_dim": _plain_head_width(model, widths),
                "downsample_type": "resnet" if model.resblock_updown else "conv",
                "upsample_type": "resnet" if model.resblock_updown else "conv"}
    if not model.context_dim:
        raise ConfigError(f"{_FIELD}.use_spatial_transformer=True with context_dim=0 (self-attention only): "
                          "diffusers' cross-attention UNet needs a context width (cross_attention_dim)")
    last = len(widths) - 1
    resampling = [level for level in _attention_levels(model) if level < last or level > 0]
    if model.resblock_updown and resampling:
        raise ConfigError(f"{_FIELD}.resblock_updown=True at cross-attention levels {resampling}: diffusers' "
                          "CrossAttnDownBlock2D / CrossAttnUpBlock2D resample with convolutions only")
    down, up = _block_types(model, "CrossAttn")
    return {**_header("UNet2DConditionModel"), **config, "down_block_types": down, "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": int(model.context_dim),
            "attention_head_dim": _transformer_heads(model, widths),
            "transformer_layers_per_block": model.transformer_depth,
            "use_linear_projection": bool(model.use_linear_in_transformer), "only_cross_attention": False,
            "upcast_attention": False, "dual_cross_attention": False}


def autoencoder_config(model: AutoencoderKL | VQModel, scale_factor: float) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` / ``VQModel`` config of a lidiff first stage; ``scaling_factor`` is
    ``scale_factor`` (latents are multiplied by it before diffusion). Raises ``ConfigError`` when diffusers has
    no equivalent (a KL model whose ``z_channels`` differ from ``embed_dim``, cosine-similarity VQ codes)."""
    field = "config.autoencoder.model"
    n = len(model.ch_mult)
    attention = ["Attn" if model.attn_type == "vanilla" and model.resolution // 2 ** i in model.attn_resolutions
                 else "" for i in range(n)]
    config = dict(
        in_channels=model.in_channels, out_channels=model.out_ch,
        down_block_types=[f"{a}DownEncoderBlock2D" for a in attention],
        up_block_types=[f"{a}UpDecoderBlock2D" for a in reversed(attention)],
        block_out_channels=[model.ch * m for m in model.ch_mult], layers_per_block=model.num_res_blocks,
        act_fn="silu", norm_num_groups=32, sample_size=model.resolution, scaling_factor=float(scale_factor),
        mid_block_add_attention=model.attn_type == "vanilla",
    )
    if isinstance(model, VQModel):
        if model.use_l2_normalized_codes:
            raise ConfigError(f"{field}.l2_normalized_codes=True (cosine-similarity code lookup): diffusers' "
                              "VQModel looks codes up by Euclidean distance")
        return {**_header("VQModel"), **config, "latent_channels": model.z_channels,
                "vq_embed_dim": model.embed_dim, "num_vq_embeddings": model.n_embed, "norm_type": "group",
                "lookup_from_codebook": False, "force_upcast": False}
    if model.z_channels != model.embed_dim:
        raise ConfigError(f"{field}: z_channels={model.z_channels} differs from embed_dim={model.embed_dim}; "
                          "diffusers' AutoencoderKL has one latent width (latent_channels) for both")
    return {**_header("AutoencoderKL"), **config, "latent_channels": model.embed_dim, "force_upcast": True,
            "use_quant_conv": True, "use_post_quant_conv": True}


def diffusers_named_betas(name: str, num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """[T] float64 betas of a diffusers ``beta_schedule`` by its definition (diffusers rounds them to float32).

    ``linear``: linspace(start, end); ``scaled_linear``: linspace(sqrt(start), sqrt(end)) ** 2;
    ``squaredcos_cap_v2``: 1 - abar((i+1)/T) / abar(i/T), capped at 0.999, with abar(t) = cos((t + 0.008) / 1.008
    * pi/2) ** 2.
    """
    if name == "linear":
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
    if name == "squaredcos_cap_v2":
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), 0.999)
                         for i in range(num_timesteps)])
    raise ValueError(f"unknown diffusers beta_schedule {name!r}")


DIFFUSERS_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")


def scheduler_config(process: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``config.diffusion.process`` -> (a ``DDIMScheduler`` config, a line saying how the betas are written).

    The named ``beta_schedule`` whose definition gives lidiff's betas is used (float64, to 1e-9 relative: far below
    the float32 rounding diffusers applies); if none does (``sqrt``), the betas themselves (``trained_betas``, [T]
    floats). Raises ``ConfigError`` for a parameterization diffusers does not know.
    """
    t, start, end = int(process["num_timesteps"]), float(process["linear_start"]), float(process["linear_end"])
    betas = make_beta_schedule(process["schedule"], t, start, end)
    parameterization = process["parameterization"]
    if parameterization not in PREDICTION_TYPES:
        raise ConfigError(f"config.diffusion.process.parameterization={parameterization!r}: diffusers knows "
                          f"{sorted(PREDICTION_TYPES)}")
    config = {**_header("DDIMScheduler"), "num_train_timesteps": t, "beta_start": start, "beta_end": end,
              "beta_schedule": "linear", "trained_betas": None, "prediction_type": PREDICTION_TYPES[parameterization],
              "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
              "thresholding": False, "rescale_betas_zero_snr": False}
    for name in DIFFUSERS_SCHEDULES:
        if np.allclose(diffusers_named_betas(name, t, start, end), betas, rtol=1e-9, atol=0.0):
            config["beta_schedule"] = name
            return config, (f"beta_schedule={name!r} (its definition gives lidiff's {process['schedule']} betas; "
                            "diffusers rounds them to float32)")
    config["trained_betas"] = [float(b) for b in betas]
    return config, (f"trained_betas ({t} values): lidiff's {process['schedule']} schedule is none of diffusers' "
                    f"named ones {DIFFUSERS_SCHEDULES}")
