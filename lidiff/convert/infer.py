"""Architecture of a released checkpoint, read from its tensor shapes (no weights are used, only names and shapes).

Every function takes ``shapes``: ``{CompVis key without the component prefix: shape tuple}`` and returns the
lidiff config fields it can determine (``configs/base.py`` names). What the shapes cannot tell is left out: the
attention head layout (a packed ``qkv`` [3C, C, 1] or a ``to_q`` [C, C] is the same tensor for any number of heads)
and the parameterization (eps / x0 / v). What a UNet's extra input channels are when the file holds no cond-stage
tensors (super-resolution, inpainting) is read from the channel counts by ``lidiff.convert.import_spatial``.

UNet (``openaimodel.UNetModel``), N = num_res_blocks, L = len(channel_mult)::

    input_blocks.0.0.weight [ch, in, 3, 3]           -> model_channels, in_channels
    out.2.weight [out, ch, 3, 3]                     -> out_channels
    output_blocks.N.{1|2}.conv / .in_layers          -> N: the first output entry holding an upsampler
    input_blocks.{1 + l(N+1)}.0.out_layers.3 [C_l]   -> channel_mult[l] = C_l / ch
    input_blocks.{1 + l(N+1) + j}.1.*                -> attention at ds = 2**l
    *.transformer_blocks.k.*                         -> use_spatial_transformer, transformer_depth
    attn2.to_k.weight [inner, context_dim]           -> context_dim
    proj_in.weight 2-D (Linear) / 4-D (Conv 1x1)     -> use_linear_in_transformer
    emb_layers.1.weight [2C or C, 4ch]               -> use_scale_shift_norm
    input_blocks.{(l+1)(N+1)}.0.in_layers (not .op)  -> resblock_updown
    label_emb.weight [num_classes, 4ch]              -> adm class conditioning

Autoencoder (``ldm/modules/diffusionmodules/model.py``)::

    encoder.conv_in.weight [ch, 3, 3, 3]             -> ch
    encoder.down.i.block.0.conv2.weight [C_i, ...]   -> ch_mult[i] = C_i / ch; count of block.j -> num_res_blocks
    encoder.down.i.attn.*                            -> attn_resolutions (resolution // 2**i)
    encoder.mid.attn_1.* absent                      -> attn_type "none"
    decoder.conv_in.weight [.., z, 3, 3]             -> z_channels
    post_quant_conv.weight [z, embed_dim, 1, 1]      -> embed_dim
    quantize.embedding.weight [n_embed, embed_dim]   -> kind "vq" (else "kl")
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from lidiff.convert.common import ConversionError
from lidiff.diffusion.schedule import make_beta_schedule

Shapes = Mapping[str, tuple[int, ...]]

# Config fields the tensor shapes never determine, with the flag that sets each.
HEAD_FLAGS = ("--config.diffusion.model.num_head_channels=<width per head>",
              "--config.diffusion.model.num_heads=<heads>")


def shapes_of(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{key: array or tensor}`` -> ``{key: shape tuple}``."""
    return {k: tuple(int(d) for d in v.shape) for k, v in state_dict.items()}


def _need(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConversionError(f"cannot infer the {what}: no tensor {key!r} (give --config with the architecture)")
    return shapes[key]


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


# ------------------------------------------------------------------------------------------------------ UNet


def _num_res_blocks(shapes: Shapes) -> int:
    """N: output entry N is the first to hold an upsampler (``.conv`` or an up-ResBlock after slot 0)."""
    rx = re.compile(r"^output_blocks\.(\d+)\.([12])\.(conv|in_layers)\.")
    ups = sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})
    if not ups:  # one level: no upsampler at all; N + 1 output entries
        entries = _indices(shapes, r"^output_blocks\.(\d+)\.")
        if not entries:
            raise ConversionError("cannot infer num_res_blocks: no output_blocks.* tensors")
        return len(entries) - 1
    return ups[0]


def infer_unet(shapes: Shapes) -> dict[str, Any]:
    """UNet config fields (``base.unet_model`` names) plus ``label_classes`` (rows of ``label_emb`` or None).

    shapes: the UNet's tensors with CompVis keys (``input_blocks.0.0.weight`` ...), plain attention either as a
    packed ``qkv`` or split into ``q``/``k``/``v``. Head layout fields are not set (see ``HEAD_FLAGS``).
    """
    ch, in_channels = _need(shapes, "input_blocks.0.0.weight", "UNet input convolution")[:2]
    out_channels = _need(shapes, "out.2.weight", "UNet output convolution")[0]
    n = _num_res_blocks(shapes)
    entries = _indices(shapes, r"^output_blocks\.(\d+)\.")
    if len(entries) % (n + 1):
        raise ConversionError(f"{len(entries)} output blocks do not split into levels of num_res_blocks+1={n + 1}")
    levels = len(entries) // (n + 1)
    mult, attention, updown = [], [], False
    for level in range(levels):
        first = 1 + level * (n + 1)
        width = _need(shapes, f"input_blocks.{first}.0.out_layers.3.weight", f"width of UNet level {level}")[0]
        if width % ch:
            raise ConversionError(f"UNet level {level} has {width} channels, not a multiple of model_channels={ch}")
        mult.append(width // ch)
        if any(k.startswith(f"input_blocks.{first}.1.") for k in shapes):
            attention.append(2 ** level)
        if level < levels - 1 and any(k.startswith(f"input_blocks.{(level + 1) * (n + 1)}.0.in_layers.")
                                      for k in shapes):
            updown = True
    transformer = [k for k in shapes if ".transformer_blocks." in k]
    fields = dict(
        in_channels=in_channels, out_channels=out_channels, model_channels=ch, channel_mult=tuple(mult),
        num_res_blocks=n, attention_resolutions=tuple(attention), resblock_updown=updown,
        use_scale_shift_norm=_need(shapes, "input_blocks.1.0.emb_layers.1.weight", "time-embedding projection")[0]
        == 2 * _need(shapes, "input_blocks.1.0.out_layers.3.weight", "first ResBlock")[0],
        use_spatial_transformer=bool(transformer), transformer_depth=1, context_dim=0,
        use_linear_in_transformer=False,
    )
    if transformer:
        depth = _indices(shapes, r"^middle_block\.1\.transformer_blocks\.(\d+)\.")
        fields["transformer_depth"] = len(depth)
        fields["context_dim"] = _need(shapes, "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                                      "context width")[1]
        fields["use_linear_in_transformer"] = len(_need(shapes, "middle_block.1.proj_in.weight", "proj_in")) == 2
    fields["label_classes"] = shapes["label_emb.weight"][0] if "label_emb.weight" in shapes else None
    return fields


def describe_unet(fields: Mapping[str, Any]) -> str:
    """One line per architectural fact, for the command's report."""
    attn = "spatial transformer (depth {transformer_depth}, context {context_dim}, {proj} proj_in)".format(
        proj="linear" if fields["use_linear_in_transformer"] else "conv 1x1", **fields) \
        if fields["use_spatial_transformer"] else "plain self-attention"
    classes = f", label_emb {fields['label_classes']} rows" if fields.get("label_classes") else ""
    return (f"UNet: in {fields['in_channels']} -> out {fields['out_channels']}, model_channels "
            f"{fields['model_channels']}, channel_mult {tuple(fields['channel_mult'])}, num_res_blocks "
            f"{fields['num_res_blocks']}, attention at ds {tuple(fields['attention_resolutions'])} + middle: {attn}; "
            f"scale_shift_norm {fields['use_scale_shift_norm']}, resblock_updown {fields['resblock_updown']}"
            f"{classes}")


# ----------------------------------------------------------------------------------------------- autoencoder


def infer_autoencoder(shapes: Shapes, resolution: int) -> dict[str, Any]:
    """Autoencoder config fields (``base.autoencoder_model`` names) from a CompVis first stage's shapes.

    resolution: the training image size R; attention levels i become ``attn_resolutions`` R // 2**i.
    """
    ch = _need(shapes, "encoder.conv_in.weight", "encoder input convolution")[0]
    levels = _indices(shapes, r"^encoder\.down\.(\d+)\.")
    if not levels:
        raise ConversionError("cannot infer the autoencoder: no encoder.down.* tensors")
    mult, attn = [], []
    for i in levels:
        width = _need(shapes, f"encoder.down.{i}.block.0.conv2.weight", f"width of encoder level {i}")[0]
        if width % ch:
            raise ConversionError(f"encoder level {i} has {width} channels, not a multiple of ch={ch}")
        mult.append(width // ch)
        if any(k.startswith(f"encoder.down.{i}.attn.") for k in shapes):
            attn.append(resolution // 2 ** i)
    z = _need(shapes, "decoder.conv_in.weight", "decoder input convolution")[1]
    embed_dim = _need(shapes, "post_quant_conv.weight", "post_quant_conv")[1]
    vq = "quantize.embedding.weight" in shapes
    return dict(
        kind="vq" if vq else "kl", ch=ch, ch_mult=tuple(mult),
        num_res_blocks=len(_indices(shapes, r"^encoder\.down\.0\.block\.(\d+)\.")),
        attn_resolutions=tuple(attn), attn_type="vanilla" if any(k.startswith("encoder.mid.attn_1.") for k in shapes)
        else "none", resolution=resolution, z_channels=z, embed_dim=embed_dim,
        n_embed=shapes["quantize.embedding.weight"][0] if vq else 0,
    )


def describe_autoencoder(fields: Mapping[str, Any]) -> str:
    codebook = f", codebook {fields['n_embed']} x {fields['embed_dim']}" if fields["kind"] == "vq" else ""
    return (f"autoencoder: {fields['kind'].upper()}, ch {fields['ch']}, ch_mult {tuple(fields['ch_mult'])} "
            f"(f={2 ** (len(fields['ch_mult']) - 1)}), num_res_blocks {fields['num_res_blocks']}, z_channels "
            f"{fields['z_channels']}, embed_dim {fields['embed_dim']}{codebook}, attention at "
            f"{tuple(fields['attn_resolutions'])} px (for resolution {fields['resolution']}), attn_type "
            f"{fields['attn_type']}")


# ---------------------------------------------------------------------------------------------- conditioning


def infer_class_embedder(shapes: Shapes) -> dict[str, Any]:
    """``embedding.weight`` [n_classes + 1 (null), D] -> ``conditioning`` fields of a crossattn class model."""
    rows, dim = _need(shapes, "embedding.weight", "class embedder")
    return dict(kind="class", mode="crossattn", num_classes=rows - 1, embed_dim=dim)


def infer_spatial_rescaler(shapes: Shapes) -> dict[str, Any]:
    """``channel_mapper.weight`` [map_channels, num_classes, 1, 1] (the bias-free 1x1 map of a ``SpatialRescaler``,
    CompVis semantic synthesis: [3, 182, 1, 1]) -> ``conditioning`` fields of a semantic (concat) model."""
    shape = _need(shapes, "channel_mapper.weight", "spatial rescaler's channel map")
    if len(shape) != 4 or tuple(shape[2:]) != (1, 1):
        raise ConversionError(f"cond_stage_model.channel_mapper.weight is {list(shape)}; a SpatialRescaler's 1x1 "
                              "map is [out, in, 1, 1]")
    return dict(kind="semantic", mode="concat", num_classes=shape[1], map_channels=shape[0])


def infer_text_transformer(shapes: Shapes) -> dict[str, Any]:
    """BERT-style ``transformer.*`` shapes -> ``conditioning`` fields (heads / dim_head are not determined)."""
    vocab, dim = _need(shapes, "transformer.token_emb.weight", "text encoder vocabulary")
    return dict(kind="text", mode="crossattn", embed_dim=dim, vocab_size=vocab,
                max_length=_need(shapes, "transformer.pos_emb.emb.weight", "text encoder positions")[0],
                n_layer=len(_indices(shapes, r"^transformer\.attn_layers\.layers\.(\d+)\.")) // 2)


# Width of one attention head in every CLIP text encoder Stable Diffusion uses (ViT-L/14: 768 = 12 x 64, OpenCLIP
# ViT-H/14: 1024 = 16 x 64); the tensor shapes do not say the head count.
CLIP_HEAD_WIDTH = 64


def infer_clip_text(shapes: Shapes) -> dict[str, Any]:
    """A transformers ``CLIPTextModel``'s shapes (keys without ``text_model.``) -> its ``config.json`` fields
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, max_position_embeddings (heads and activation
    are not determined)::

        embeddings.token_embedding.weight [vocab, D], embeddings.position_embedding.weight [positions, D],
        encoder.layers.{i}.*, encoder.layers.0.mlp.fc1.weight [intermediate, D]
    """
    vocab, hidden = _need(shapes, "embeddings.token_embedding.weight", "CLIP token table")
    layers = _indices(shapes, r"^encoder\.layers\.(\d+)\.")
    if not layers:
        raise ConversionError("cannot infer the CLIP text encoder: no encoder.layers.* tensors")
    return dict(vocab_size=vocab, hidden_size=hidden,
                intermediate_size=_need(shapes, "encoder.layers.0.mlp.fc1.weight", "CLIP MLP width")[0],
                num_hidden_layers=len(layers),
                max_position_embeddings=_need(shapes, "embeddings.position_embedding.weight", "CLIP positions")[0])


# -------------------------------------------------------------------------------------------------- schedule


def _decimals(start: float, end: float):
    """Candidate end points, shortest decimals first (0.0015 rather than 0.001500000013...), then as stored."""
    for digits in range(2, 9):
        yield float(f"{start:.{digits}g}"), float(f"{end:.{digits}g}")
    yield float(start), float(end)


def infer_schedule(betas: np.ndarray, alphas_cumprod: np.ndarray | None = None) -> dict[str, Any]:
    """Stored betas [T] -> ``diffusion.process`` fields (schedule, num_timesteps, linear_start, linear_end).

    Tries lidiff's named schedules with the end points the betas imply (CompVis "linear" = ``scaled_linear``);
    the recomputed betas must agree to 1e-5 relative (float32 storage; 2e-3 for buffers stored in float16), and
    ``alphas_cumprod`` when given to 10x that.
    """
    stored32 = np.asarray(betas, np.float32)
    # float16 checkpoints (pruned SD-layout files) store the buffers at half precision: compare at that precision
    rtol = 2e-3 if np.array_equal(stored32, stored32.astype(np.float16).astype(np.float32)) else 1e-5
    betas = np.asarray(betas, np.float64)
    t = int(betas.shape[0])
    candidates = {
        "scaled_linear": (betas[0], betas[-1]),
        "linear": (betas[0], betas[-1]),
        "sqrt": (betas[0] ** 2, betas[-1] ** 2),
        "cosine": (1e-4, 2e-2),  # end points unused by the cosine schedule; base defaults kept
    }
    for name, stored in candidates.items():
        matches = ((start, end) for start, end in _decimals(*stored)
                   if np.allclose(make_beta_schedule(name, t, start, end), betas, rtol=rtol, atol=1e-9))
        start, end = next(matches, (None, None))
        if start is None:
            continue
        want = make_beta_schedule(name, t, start, end)
        if alphas_cumprod is not None and not np.allclose(np.cumprod(1.0 - want), np.asarray(alphas_cumprod),
                                                          rtol=10 * rtol, atol=1e-7):
            raise ConversionError(f"the stored alphas_cumprod do not follow the stored betas ({name} schedule)")
        return dict(schedule=name, num_timesteps=t, linear_start=start, linear_end=end)
    raise ConversionError(f"the stored betas ({t} steps, {betas[0]:.6g} .. {betas[-1]:.6g}) follow none of lidiff's "
                          "schedules (scaled_linear, linear, sqrt, cosine); this schedule cannot be imported")


# ------------------------------------------------------------------------------------------ diffusers configs

# diffusers UNet settings lidiff's UNet (the CompVis one) reproduces only at these values.
_DIFFUSERS_FIXED = {"flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_num_groups": 32,
                    "downsample_padding": 1, "center_input_sample": False, "time_embedding_type": "positional",
                    "class_embed_type": None, "addition_embed_type": None, "only_cross_attention": False,
                    "dual_cross_attention": False, "encoder_hid_dim": None, "time_cond_proj_dim": None,
                    "add_attention": True, "conv_in_kernel": 3, "conv_out_kernel": 3}


def _same_per_level(value: Any, levels: list[int], what: str) -> Any:
    """An int, or a per-level list whose attention levels all agree -> that one value."""
    if not isinstance(value, (list, tuple)):
        return value
    values = {value[level] for level in levels} or {value[-1]}
    if len(values) != 1:
        raise ConversionError(f"diffusers {what}={list(value)} differs between attention levels; lidiff's UNet uses "
                              "one value for all of them")
    return values.pop()


def unet_fields_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` ``config.json`` -> the lidiff UNet fields of
    ``infer_unet`` plus the head layout (``num_heads`` / ``num_head_channels``), by the table in
    ``lidiff.convert.diffusers_unet``'s docstring."""
    wrong = [f"{k}={config[k]!r} (lidiff needs {v!r})" for k, v in _DIFFUSERS_FIXED.items()
             if k in config and config[k] != v]
    if wrong:
        raise ConversionError("this diffusers UNet has settings lidiff's UNet does not reproduce: " + ", ".join(wrong))
    widths = [int(c) for c in config["block_out_channels"]]
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ConversionError(f"block_out_channels={widths} are not multiples of the first ({ch})")
    down = list(config["down_block_types"])
    attn_levels = [i for i, name in enumerate(down) if "Attn" in name]
    conditional = config.get("cross_attention_dim") is not None and "CrossAttn" in "".join(down + [
        str(config.get("mid_block_type") or "UNetMidBlock2DCrossAttn")])
    fields = dict(
        in_channels=int(config["in_channels"]), out_channels=int(config["out_channels"]), model_channels=ch,
        channel_mult=tuple(w // ch for w in widths), num_res_blocks=int(config["layers_per_block"]),
        attention_resolutions=tuple(2 ** i for i in attn_levels),
        resblock_updown=config.get("downsample_type", "conv") == "resnet" or any("Resnet" in n for n in down),
        use_scale_shift_norm=config.get("resnet_time_scale_shift", "default") == "scale_shift",
        use_spatial_transformer=conditional, transformer_depth=1, context_dim=0, use_linear_in_transformer=False,
        label_classes=config.get("num_class_embeds"), legacy=True, num_heads=-1, num_head_channels=-1,
    )
    if conditional:
        fields["transformer_depth"] = int(_same_per_level(config.get("transformer_layers_per_block", 1), attn_levels,
                                                          "transformer_layers_per_block"))
        fields["context_dim"] = int(config["cross_attention_dim"])
        fields["use_linear_in_transformer"] = bool(config.get("use_linear_projection", False))
        heads = config.get("num_attention_heads") or config.get("attention_head_dim")  # a head COUNT here
        if isinstance(heads, (list, tuple)):
            widths_per_head = {widths[i] // heads[i] for i in attn_levels} | {widths[-1] // heads[-1]}
            if len(widths_per_head) != 1:
                raise ConversionError(f"diffusers heads {list(heads)} give different head widths per level")
            fields["num_head_channels"] = widths_per_head.pop()
        else:
            fields["num_heads"] = int(heads)
    else:
        head_dim = config.get("attention_head_dim")  # a head WIDTH in UNet2DModel; None: one head
        if head_dim is None:
            fields["num_heads"] = 1
        else:
            fields["num_head_channels"] = int(head_dim)
    return fields


_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_DIFFUSERS_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}


def process_from_diffusers_scheduler(config: Mapping[str, Any]) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` -> ``diffusion.process`` fields (schedule, end points, T,
    parameterization)."""
    name = config.get("beta_schedule", "linear")
    if name not in _DIFFUSERS_SCHEDULES or config.get("trained_betas") is not None:
        raise ConversionError(f"scheduler beta_schedule={name!r} (or trained_betas) has no lidiff equivalent; "
                              f"lidiff reads {sorted(_DIFFUSERS_SCHEDULES)}")
    if config.get("rescale_betas_zero_snr"):
        raise ConversionError("scheduler rescale_betas_zero_snr=True has no lidiff equivalent")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise ConversionError(f"scheduler prediction_type={prediction!r}: lidiff knows {sorted(_PREDICTION)}")
    return dict(schedule=_DIFFUSERS_SCHEDULES[name], num_timesteps=int(config.get("num_train_timesteps", 1000)),
                linear_start=float(config.get("beta_start", 1e-4)), linear_end=float(config.get("beta_end", 2e-2)),
                parameterization=_PREDICTION[prediction])


def sampling_differences(config: Mapping[str, Any]) -> list[str]:
    """Where a diffusers ``scheduler_config.json`` steps differently from lidiff's DDIM / PLMS (CompVis's timesteps
    ``arange(0, T, T // S) + 1`` ending at ᾱ_0, x0 never clipped = diffusers' ``timestep_spacing="leading"``,
    ``steps_offset=1``, ``set_alpha_to_one=False``, ``clip_sample=False``) -> one phrase per difference; [] when
    they agree. Fields the config does not hold are taken at diffusers' defaults (``steps_offset`` 0)."""
    out = []
    spacing = config.get("timestep_spacing", "leading")
    if spacing != "leading":
        out.append(f"timestep_spacing {spacing!r} (lidiff: 'leading')")
    if int(config.get("steps_offset", 0)) != 1:
        out.append(f"steps_offset {config.get('steps_offset', 0)} (lidiff: 1)")
    if config.get("set_alpha_to_one", False):
        out.append("set_alpha_to_one True (lidiff's last step goes to alphas_cumprod[0])")
    if config.get("clip_sample", False):
        out.append("clip_sample True (lidiff never clips x0)")
    return out
