"""Conditioning encoders tau_theta: raw conditioning inputs -> the ``cond`` pytree the UNet consumes.

Raw inputs are a dict of arrays with the batch as leading axis (what the data loader and ``sample.py`` produce)::

    class labels   {"label": [B] int32}                     (num_classes = the null class)
    text           {"tokens": [B, L] int32}                 (the empty prompt's tokens = the null input)
                   {"text_embedding": [B, L, D]}            (a frozen encoder's cached output, instead of tokens)
    layouts        {"boxes": [B, K, 4] float32, "box_labels": [B, K] int32}   (all labels -1 = no boxes)

An encoder turns them into ``cond``, a dict whose keys say how the UNet takes them (CompVis's
``conditioning_key``): ``{"context": [B, L, D]}`` for cross-attention (``crossattn``), ``{"y": [B] int32}`` for the
class embedding added to the time embedding (``adm``), ``{"concat": [B, h, w, c]}`` stacked on x_t (``concat``), or
several at once (``hybrid``). Every encoder defines its null input, which ``p_uncond`` substitutes at training
time (``drop_to_null``) and classifier-free guidance encodes for the unconditional branch.

Encoders are small frozen dataclasses holding flax modules: ``init(rng) -> params`` ({} when nothing is
trained; ``FrozenTextConditioning``'s pretrained weights are given to ``encode`` instead),
``encode(params, inputs, *, latent_hw, first_stage_params) -> cond``, ``null_inputs(n) -> inputs``.
``latent_hw`` is the (h, w) of the latents being denoised, which a ``concat`` map must match;
``first_stage_params`` are the frozen autoencoder's, for encoders that encode an image with it. Both are passed
by ``LatentDiffusion`` and ignored by encoders that do not need them. ``concat_channels`` is how many channels
``cond["concat"]`` adds to the UNet's input. ``input_specs`` gives each raw input's per-row shape and dtype, which
``check_inputs`` uses to refuse what does not fit, by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lidiff.models.layout import layout_map, layout_tokens

Inputs = Mapping[str, Any]
Specs = dict  # name -> (per-row shape, numpy dtype)


class ClassEmbedder(nn.Module):
    """Class labels -> a length-1 context sequence (the cin256 encoder).

    Its one parameter ``embedding/embedding`` [n_classes, embed_dim] is the CompVis key
    ``cond_stage_model.embedding.weight``.

    Attributes:
      embed_dim: context width D (the UNet's ``context_dim``).
      n_classes: table size; cin256-v2 uses 1001 with class 1000 as the null label for guidance.
      dtype: dtype of the returned context (the table is float32).
    """

    embed_dim: int
    n_classes: int = 1000
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        """labels: [B] int in [0, n_classes) -> context [B, 1, embed_dim] in ``dtype``."""
        table = nn.Embed(
            self.n_classes,
            self.embed_dim,
            embedding_init=nn.initializers.normal(1.0),  # torch nn.Embedding default N(0, 1)
            name="embedding",
        )
        return table(labels)[:, None, :].astype(self.dtype)


class SpatialRescaler(nn.Module):
    """A spatial conditioning map brought to the latent size (CompVis ``SpatialRescaler``): ``n_stages`` halvings,
    then an optional 1x1 convolution without bias to ``out_channels`` (``channel_mapper``).

    A halving is PyTorch's ``interpolate(scale_factor=0.5)`` with ``align_corners=False``: ``bilinear`` averages
    each 2x2 block (the sample points fall between pixels, with no antialiasing), ``nearest`` keeps the block's
    top-left pixel. The CompVis semantic-synthesis model uses ``n_stages=2``, 182 -> 3 channels. Only the
    multiplier 0.5 of the released configs is supported.

    Attributes:
      n_stages: halvings; the output is ``2**n_stages`` times smaller per side.
      method: ``bilinear`` | ``nearest``.
      out_channels: channels after the 1x1 map, or None for no map.
      dtype: compute dtype of the map; the kernel is float32 ([1, 1, C_in, C_out], torch [C_out, C_in, 1, 1]).
    """

    n_stages: int = 1
    method: str = "bilinear"
    out_channels: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] with H, W divisible by 2**n_stages -> [B, H / 2**n, W / 2**n, out_channels or C]."""
        if self.method not in ("bilinear", "nearest"):
            raise ValueError(f"SpatialRescaler: method {self.method!r} is not 'bilinear' or 'nearest'")
        factor = 2 ** self.n_stages
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"SpatialRescaler: a {x.shape[1]}x{x.shape[2]} map does not halve {self.n_stages} times; "
                             f"give a size divisible by {factor}")
        for _ in range(self.n_stages):
            b, h, w, c = x.shape
            if self.method == "nearest":
                x = x[:, ::2, ::2]
            else:
                x = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        if self.out_channels is not None:
            x = nn.Conv(self.out_channels, (1, 1), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                        name="channel_mapper")(x)
        return x


@dataclasses.dataclass(frozen=True)
class Unconditional:
    """No conditioning: no inputs, no params, an empty ``cond``."""

    kind = "none"
    mode = "none"
    concat_channels = 0

    @property
    def input_specs(self) -> Specs:
        return {}

    def init(self, rng: jax.Array) -> dict:
        return {}

    def encode(self, params: Any, inputs: Inputs, *, latent_hw: tuple[int, int] | None = None,
               first_stage_params: Any = None) -> dict:
        return {}

    def null_inputs(self, n: int, latent_hw: tuple[int, int] | None = None) -> dict:
        return {}


@dataclasses.dataclass(frozen=True)
class ClassConditioning:
    """Class labels, as cross-attention context (``crossattn``, cin256) or as the UNet's ``label_emb`` (``adm``).

    Label ``num_classes`` is the null class. In ``crossattn`` mode the table ``ClassEmbedder(embed_dim,
    num_classes + 1)`` is trained here; in ``adm`` mode the labels pass through as ``y`` and the UNet's
    ``label_emb`` (built with ``num_classes + 1`` rows) embeds them.
    """

    num_classes: int
    embed_dim: int
    mode: str = "crossattn"  # crossattn | adm
    dtype: Any = jnp.float32
    kind = "class"
    concat_channels = 0

    def __post_init__(self):
        if self.mode not in ("crossattn", "adm"):
            raise ValueError(f"class conditioning supports mode 'crossattn' or 'adm', not {self.mode!r}")
        if self.num_classes <= 0:
            raise ValueError(f"class conditioning needs num_classes > 0, got {self.num_classes}")

    @property
    def module(self) -> ClassEmbedder:
        return ClassEmbedder(self.embed_dim, self.num_classes + 1, self.dtype)

    @property
    def input_specs(self) -> Specs:
        return {"label": ((), np.int32)}

    def init(self, rng: jax.Array) -> dict:
        if self.mode == "adm":
            return {}
        return self.module.init(rng, jnp.zeros((1,), jnp.int32))["params"]

    def encode(self, params: Any, inputs: Inputs, *, latent_hw: tuple[int, int] | None = None,
               first_stage_params: Any = None) -> dict:
        labels = jnp.asarray(inputs["label"], jnp.int32)
        if self.mode == "adm":
            return {"y": labels}
        return {"context": self.module.apply({"params": params}, labels)}

    def null_inputs(self, n: int, latent_hw: tuple[int, int] | None = None) -> dict:
        return {"label": jnp.full((n,), self.num_classes, jnp.int32)}


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """Token ids -> a transformer trained jointly (txt2img's BERTEmbedder) -> cross-attention context.

    transformer: ``lidiff.models.text_transformer.TransformerEmbedder``. null_tokens: the empty prompt's ids
    ``[CLS] [SEP] [PAD]...`` (length L, from ``lidiff.data.text.null_tokens``), as a tuple.
    """

    transformer: nn.Module
    null_tokens: tuple[int, ...]
    kind = "text"
    mode = "crossattn"
    concat_channels = 0

    @property
    def input_specs(self) -> Specs:
        return {"tokens": ((len(self.null_tokens),), np.int32)}

    def init(self, rng: jax.Array) -> dict:
        return self.transformer.init(rng, jnp.zeros((1, len(self.null_tokens)), jnp.int32))["params"]

    def encode(self, params: Any, inputs: Inputs, *, latent_hw: tuple[int, int] | None = None,
               first_stage_params: Any = None) -> dict:
        tokens = jnp.asarray(inputs["tokens"], jnp.int32)
        return {"context": self.transformer.apply({"params": params}, tokens)}

    def null_inputs(self, n: int, latent_hw: tuple[int, int] | None = None) -> dict:
        return {"tokens": jnp.tile(jnp.asarray(self.null_tokens, jnp.int32)[None], (n, 1))}


@dataclasses.dataclass(frozen=True)
class FrozenTextConditioning:
    """Token ids -> a pretrained text encoder used frozen (Stable Diffusion's CLIP text tower) -> context.

    Nothing here is trained (``trainable = False``): ``init`` returns {}, and ``encode`` takes the encoder's
    pretrained weights as ``params``. The trainer keeps those weights out of the train state and the optimizer and
    passes them beside it (``LatentDiffusion.with_frozen_encoder``). ``encode`` also accepts the encoder's output
    itself as ``{"text_embedding": [B, L, D]}`` (read from a text-embedding cache), which it passes through.

    encoder: ``lidiff.models.clip.CLIPTextTransformer``; output: ``"last"`` | ``"penultimate"`` (its docstring);
    null_tokens: the empty prompt's ids ``<|startoftext|> <|endoftext|> <pad>...`` (length L), as a tuple.
    """

    encoder: nn.Module
    null_tokens: tuple[int, ...]
    output: str = "last"
    kind = "text"
    mode = "crossattn"
    concat_channels = 0
    trainable = False

    @property
    def input_specs(self) -> Specs:
        return {"tokens": ((len(self.null_tokens),), np.int32)}

    @property
    def context_shape(self) -> tuple[int, int]:
        """(L, D) of one row's context."""
        return len(self.null_tokens), self.encoder.hidden_size

    def init(self, rng: jax.Array) -> dict:
        return {}

    def encode(self, params: Any, inputs: Inputs, *, latent_hw: tuple[int, int] | None = None,
               first_stage_params: Any = None) -> dict:
        """params: the encoder's pretrained weights -> {"context": [B, L, D]} (no gradient flows into them)."""
        if "text_embedding" in inputs:
            return {"context": jnp.asarray(inputs["text_embedding"]).astype(self.encoder.dtype)}
        tokens = jnp.asarray(inputs["tokens"], jnp.int32)
        params = jax.lax.stop_gradient(params)
        return {"context": self.encoder.apply({"params": params}, tokens, output=self.output)}

    def null_inputs(self, n: int, latent_hw: tuple[int, int] | None = None) -> dict:
        return {"tokens": jnp.tile(jnp.asarray(self.null_tokens, jnp.int32)[None], (n, 1))}


@dataclasses.dataclass(frozen=True)
class LayoutConditioning:
    """Boxes with class ids -> layout tokens (``lidiff.models.layout``) -> a transformer -> context.

    transformer: a ``TransformerEmbedder`` over the layout vocabulary (``vocab_size``) with ``max_seq_len``
    ``3 * max_boxes``. The null input is "no boxes": zero boxes with every label -1.

    mode ``crossattn`` (the paper's layout-to-image): the context only; the UNet has to work out from its own
    features which pixels a box's coordinate tokens refer to. mode ``hybrid``: the context, plus each class's box
    coverage at the latent's size (``layout_map``, [B, h, w, num_classes]) concatenated to x_t, which tells every
    latent pixel which boxes it lies in.
    """

    transformer: nn.Module
    num_classes: int
    max_boxes: int
    vocab_size: int
    mode: str = "crossattn"  # crossattn | hybrid
    kind = "layout"

    def __post_init__(self):
        if self.mode not in ("crossattn", "hybrid"):
            raise ValueError(f"layout conditioning supports mode 'crossattn' or 'hybrid', not {self.mode!r}")

    @property
    def concat_channels(self) -> int:
        return self.num_classes if self.mode == "hybrid" else 0

    @property
    def input_specs(self) -> Specs:
        return {"boxes": ((self.max_boxes, 4), np.float32), "box_labels": ((self.max_boxes,), np.int32)}

    def tokens(self, inputs: Inputs) -> jax.Array:
        """[B, 3 * max_boxes] int32 layout tokens."""
        return layout_tokens(inputs["boxes"], inputs["box_labels"], num_classes=self.num_classes,
                             vocab_size=self.vocab_size)

    def init(self, rng: jax.Array) -> dict:
        return self.transformer.init(rng, self.tokens(self.null_inputs(1)))["params"]

    def encode(self, params: Any, inputs: Inputs, *, latent_hw: tuple[int, int] | None = None,
               first_stage_params: Any = None) -> dict:
        """-> {"context": [B, 3K, D]}, plus {"concat": [B, h, w, num_classes]} in ``hybrid`` mode, where
        ``latent_hw = (h, w)`` is required."""
        cond = {"context": self.transformer.apply({"params": params}, self.tokens(inputs))}
        if self.mode == "hybrid":
            if latent_hw is None:
                raise ValueError("hybrid layout conditioning draws its box map at the latent's size: pass latent_hw")
            cond["concat"] = layout_map(inputs["boxes"], inputs["box_labels"], num_classes=self.num_classes,
                                        size=tuple(latent_hw)).astype(cond["context"].dtype)
        return cond

    def null_inputs(self, n: int, latent_hw: tuple[int, int] | None = None) -> dict:
        return {"boxes": jnp.zeros((n, self.max_boxes, 4), jnp.float32),
                "box_labels": jnp.full((n, self.max_boxes), -1, jnp.int32)}


def drop_to_null(encoder: Any, inputs: Inputs, drop: jax.Array, latent_hw: tuple[int, int] | None = None) -> dict:
    """``inputs`` with the rows where ``drop`` [B] bool is set replaced by the encoder's null input (of the size
    that goes with latents of ``latent_hw``, for spatial inputs)."""
    if not encoder.input_specs:
        return {}
    null = encoder.null_inputs(drop.shape[0], latent_hw)

    def pick(key: str) -> jax.Array:
        value = jnp.asarray(inputs[key])
        mask = drop.reshape(drop.shape + (1,) * (value.ndim - 1))
        return jnp.where(mask, null[key].astype(value.dtype), value)

    return {key: pick(key) for key in encoder.input_specs}


def check_inputs(encoder: Any, inputs: Inputs, batch: int | None = None) -> None:
    """Raises ValueError naming each raw input that is missing, unexpected or of the wrong shape/dtype kind.

    inputs: host arrays [B, ...]; batch: the expected B (default: that of the first input).
    """
    specs = encoder.input_specs
    missing = [k for k in specs if k not in inputs]
    unexpected = [k for k in inputs if k not in specs]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if unexpected:
        what = f"the model takes {', '.join(specs)}" if specs else "the model is unconditional"
        problems.append(f"unexpected {', '.join(unexpected)} ({what})")
    for key, (shape, dtype) in specs.items():
        if key not in inputs:
            continue
        value = np.asarray(inputs[key])
        n = batch if batch is not None else value.shape[0] if value.ndim else None
        expected = (n,) + tuple(shape)
        if len(value.shape) != len(expected) or any(e is not None and v != e for v, e in zip(value.shape, expected)):
            want = ", ".join("any" if d is None else str(d) for d in expected)
            problems.append(f"{key} has shape {value.shape}, expected ({want}) ([batch] + {shape})".replace("None",
                                                                                                         "any"))
        elif np.issubdtype(np.dtype(dtype), np.integer) and not np.issubdtype(value.dtype, np.integer):
            problems.append(f"{key} has dtype {value.dtype}, expected integers")
    if problems:
        raise ValueError(f"{encoder.kind} conditioning inputs: " + "; ".join(problems))
