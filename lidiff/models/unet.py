"""The LDM denoising UNet (CompVis ``openaimodel.UNetModel``) in Flax, NHWC.

Module names reproduce the CompVis module tree, so a CompVis key maps onto a param path by
``lidiff.convert.common.compvis_key_to_path`` (``input_blocks.4.1.norm.weight`` ->
``input_blocks_4_1/norm/scale``). Layout for ``channel_mult`` of length L and ``num_res_blocks`` N:

- ``time_embed_0`` (Dense ch -> 4ch), SiLU, ``time_embed_2`` (Dense 4ch -> 4ch); optional ``label_emb``
  (Embed num_classes x 4ch) added to the time embedding (the ``adm`` conditioning).
- ``input_blocks_0_0``: conv 3x3 in -> ch. Then per level: N x ``[ResBlock (+ attention at _1)]``, and except
  at the last level one ``Downsample`` (conv ``op``) or ``ResBlock(down=True)``.
- ``middle_block_0`` ResBlock, ``middle_block_1`` attention (always), ``middle_block_2`` ResBlock.
- ``output_blocks``: levels in reverse, N+1 entries each: ResBlock on ``concat([h, skip])`` at ``_0``,
  attention at ``_1``, and at a level's last entry (except level 0) ``Upsample`` or ``ResBlock(up=True)``.
- ``out_0`` GroupNorm, SiLU, ``out_2`` conv 3x3 -> out (zero-initialised).

``attention_resolutions`` are downsampling factors (ds = 2**level), as in the CompVis configs.
Dtype policy: params float32; activations in ``dtype``; the time/class embedding MLP, GroupNorm/LayerNorm
statistics and the softmax in float32; the output is float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidiff.nn.attention import AttentionKernel
from lidiff.nn.embeddings import timestep_embedding
from lidiff.nn.layers import Downsample, Upsample, group_norm, swish, upsample_nearest
from lidiff.nn.transformer import AttentionBlock, SpatialTransformer, torch_kernel_init, zeros_init

UNET_GN_EPS = 1e-5


def _conv3x3(features: int, name: str, dtype: Any, *, zero: bool = False) -> nn.Conv:
    return nn.Conv(
        features,
        (3, 3),
        padding=((1, 1), (1, 1)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=zeros_init if zero else torch_kernel_init,
        name=name,
    )


def attention_heads(
    channels: int, num_heads: int, num_head_channels: int, legacy: bool, use_spatial_transformer: bool
) -> tuple[int, int]:
    """``(heads, head_dim)`` of the attention block at width ``channels``, by the CompVis rules.

    - ``num_head_channels != -1``: heads = channels // num_head_channels; the head width is num_head_channels,
      except for a legacy spatial transformer, where it is channels // heads. (A spatial transformer's inner
      width heads * head_dim may differ from ``channels``; ``proj_in``/``proj_out`` map between them.)
    - otherwise: heads = num_heads; a spatial transformer uses head width channels // num_heads; a plain
      attention block splits the channels into num_heads (legacy) or into channels // (channels // num_heads)
      heads (non-legacy; the same whenever num_heads divides channels).
    """
    if num_head_channels != -1:
        if channels % num_head_channels and not use_spatial_transformer:
            raise ValueError(f"{channels} channels are not a multiple of num_head_channels={num_head_channels}")
        heads = channels // num_head_channels
        head_dim = channels // heads if (legacy and use_spatial_transformer) else num_head_channels
        return heads, head_dim
    if num_heads <= 0:
        raise ValueError("set num_heads or num_head_channels")
    if use_spatial_transformer:
        return num_heads, channels // num_heads
    if not legacy:
        per_head = channels // num_heads
        if channels % per_head:
            raise ValueError(f"{channels} channels are not divisible by head width {per_head}")
        num_heads = channels // per_head
    if channels % num_heads:
        raise ValueError(f"{channels} channels are not divisible into {num_heads} heads")
    return num_heads, channels // num_heads


class ResBlock(nn.Module):
    """Residual block with a timestep-embedding input, optionally resampling (CompVis ``ResBlock``).

    ``skip(x') + out_layers(in_layers(x) (+) emb)``; with ``use_scale_shift_norm`` the embedding gives
    ``[scale | shift]`` and ``h = GN(h) * (1 + scale) + shift``, else it is added before the second GroupNorm.
    ``up``/``down`` resample both paths (nearest x2 / 2x2 average pool) after the first GN+SiLU, before the conv.

    Children: ``in_layers_0`` (GN), ``in_layers_2`` (conv 3x3), ``emb_layers_1`` (Dense E -> out or 2*out),
    ``out_layers_0`` (GN), ``out_layers_3`` (conv 3x3, zero-init), ``skip_connection`` (conv 1x1, only when
    the channel count changes). GroupNorm eps 1e-5.
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, deterministic: bool = True) -> jax.Array:
        """x: [B, H, W, Cin], emb: [B, E] -> [B, H', W', out_channels] in ``dtype`` (H' = 2H, H/2 or H)."""
        c_in = x.shape[-1]
        x = x.astype(self.dtype)
        h = swish(group_norm(UNET_GN_EPS, "in_layers_0")(x)).astype(self.dtype)
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h = nn.avg_pool(h, (2, 2), strides=(2, 2))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        h = _conv3x3(self.out_channels, "in_layers_2", self.dtype)(h)
        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        e = nn.Dense(emb_width, dtype=self.dtype, kernel_init=torch_kernel_init, name="emb_layers_1")(
            swish(emb.astype(self.dtype))
        )[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = group_norm(UNET_GN_EPS, "out_layers_0")(h).astype(self.dtype) * (1 + scale) + shift
            h = swish(h)
        else:
            h = swish(group_norm(UNET_GN_EPS, "out_layers_0")(h + e)).astype(self.dtype)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _conv3x3(self.out_channels, "out_layers_3", self.dtype, zero=True)(h)
        if c_in != self.out_channels:
            x = nn.Conv(
                self.out_channels, (1, 1), dtype=self.dtype, kernel_init=torch_kernel_init, name="skip_connection"
            )(x)
        return x + h


class UNetModel(nn.Module):
    """The LDM UNet: eps (or x0/v) prediction from a noisy latent, a timestep and optional conditioning.

    Attributes (CompVis names and meanings):
      in_channels, out_channels: latent channels in/out (concat conditioning = more input channels).
      model_channels: base width ch; level widths are ``ch * channel_mult[l]``; time embedding width 4ch.
      channel_mult: width multiplier per level.
      num_res_blocks: ResBlocks per level in the encoder (the decoder has one more).
      attention_resolutions: downsampling factors (1, 2, 4, ...) at which attention follows each ResBlock.
      dropout: dropout rate inside ResBlocks (needs a ``dropout`` rng when ``deterministic=False``).
      conv_resample: conv (``op``/``conv``) in Downsample/Upsample, else pooling / plain nearest.
      num_heads, num_head_channels, legacy: head layout, see ``attention_heads``.
      use_scale_shift_norm: FiLM-style time conditioning in ResBlocks.
      resblock_updown: ResBlock(down/up=True) instead of Downsample/Upsample.
      use_spatial_transformer, transformer_depth, context_dim, use_linear_in_transformer: cross-attention
        blocks instead of plain self-attention (context [B, L, context_dim]).
      num_classes: if set, class labels ``y`` are embedded (``label_emb``) and added to the time embedding.
      dtype: compute dtype (float32 or bfloat16); params stay float32.
      attention_kernel: see ``lidiff.nn.attention``.
      remat: wrap every ResBlock and attention block in ``nn.remat`` (recompute activations in the backward pass).
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: Sequence[int] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = ()
    dropout: float = 0.0
    conv_resample: bool = True
    num_heads: int = -1
    num_head_channels: int = -1
    legacy: bool = True
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    use_linear_in_transformer: bool = False
    num_classes: int | None = None
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"
    remat: bool = False

    def heads_at(self, channels: int) -> tuple[int, int]:
        """``(heads, head_dim)`` of the attention blocks at width ``channels``."""
        return attention_heads(
            channels, self.num_heads, self.num_head_channels, self.legacy, self.use_spatial_transformer
        )

    def _resblock(self, out_channels: int, name: str, *, up: bool = False, down: bool = False) -> nn.Module:
        cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        return cls(
            out_channels,
            dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
            dtype=self.dtype,
            name=name,
        )

    def _attention(self, channels: int, name: str) -> nn.Module:
        heads, head_dim = self.heads_at(channels)
        if self.use_spatial_transformer:
            cls = nn.remat(SpatialTransformer) if self.remat else SpatialTransformer
            return cls(
                heads,
                head_dim,
                depth=self.transformer_depth,
                context_dim=self.context_dim,
                use_linear=self.use_linear_in_transformer,
                dtype=self.dtype,
                attention_kernel=self.attention_kernel,
                name=name,
            )
        cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock
        return cls(heads, dtype=self.dtype, attention_kernel=self.attention_kernel, name=name)

    def _apply_attention(self, block: nn.Module, h: jax.Array, context: jax.Array | None) -> jax.Array:
        return block(h, context) if self.use_spatial_transformer else block(h)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        timesteps: jax.Array,
        context: jax.Array | None = None,
        y: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Predicts the model output for a noisy latent.

        Args:
          x: [B, H, W, in_channels] noisy latent (H, W divisible by 2**(len(channel_mult) - 1)).
          timesteps: [B] int or float timesteps.
          context: [B, L, context_dim] cross-attention conditioning, or None.
          y: [B] int32 class labels; required exactly when ``num_classes`` is set.
          deterministic: disables dropout when True.

        Returns:
          [B, H, W, out_channels] float32.
        """
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass class labels y exactly when the UNet is built with num_classes")
        if context is not None and not self.use_spatial_transformer:
            raise ValueError("context given, but the UNet has no cross-attention (use_spatial_transformer=False)")
        ch0 = self.model_channels
        emb_dim = 4 * ch0
        levels = len(self.channel_mult)
        if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
            raise ValueError(f"x spatial size {x.shape[1:3]} must be divisible by {2 ** (levels - 1)}")

        # The time/class embedding is tiny ([B, 4ch]); it stays float32 and is cast once for the blocks.
        t_emb = timestep_embedding(jnp.broadcast_to(timesteps, (x.shape[0],)), ch0)
        emb = nn.Dense(emb_dim, dtype=jnp.float32, kernel_init=torch_kernel_init, name="time_embed_0")(t_emb)
        emb = nn.Dense(emb_dim, dtype=jnp.float32, kernel_init=torch_kernel_init, name="time_embed_2")(swish(emb))
        if self.num_classes is not None:
            label = nn.Embed(
                self.num_classes, emb_dim, embedding_init=nn.initializers.normal(1.0), name="label_emb"
            )(y)
            emb = emb + label
        emb = emb.astype(self.dtype)
        if context is not None:
            context = context.astype(self.dtype)

        h = _conv3x3(ch0, "input_blocks_0_0", self.dtype)(x.astype(self.dtype))
        skips = [h]
        idx, ch, ds = 1, ch0, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                ch = mult * ch0
                h = self._resblock(ch, f"input_blocks_{idx}_0")(h, emb, deterministic)
                if ds in self.attention_resolutions:
                    h = self._apply_attention(self._attention(ch, f"input_blocks_{idx}_1"), h, context)
                skips.append(h)
                idx += 1
            if level != levels - 1:
                name = f"input_blocks_{idx}_0"
                if self.resblock_updown:
                    h = self._resblock(ch, name, down=True)(h, emb, deterministic)
                else:
                    h = Downsample(
                        ch, self.conv_resample, padding="symmetric", conv_name="op", dtype=self.dtype, name=name
                    )(h)
                skips.append(h)
                idx += 1
                ds *= 2

        h = self._resblock(ch, "middle_block_0")(h, emb, deterministic)
        h = self._apply_attention(self._attention(ch, "middle_block_1"), h, context)
        h = self._resblock(ch, "middle_block_2")(h, emb, deterministic)

        idx = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
                ch = mult * ch0
                h = self._resblock(ch, f"output_blocks_{idx}_0")(h, emb, deterministic)
                j = 1
                if ds in self.attention_resolutions:
                    h = self._apply_attention(self._attention(ch, f"output_blocks_{idx}_{j}"), h, context)
                    j += 1
                if level and i == self.num_res_blocks:
                    name = f"output_blocks_{idx}_{j}"
                    if self.resblock_updown:
                        h = self._resblock(ch, name, up=True)(h, emb, deterministic)
                    else:
                        h = Upsample(ch, self.conv_resample, dtype=self.dtype, name=name)(h)
                    ds //= 2
                idx += 1

        h = swish(group_norm(UNET_GN_EPS, "out_0")(h)).astype(self.dtype)
        h = _conv3x3(self.out_channels, "out_2", self.dtype, zero=True)(h)
        return h.astype(jnp.float32)


def unet_param_shapes(model: UNetModel) -> dict[str, Any]:
    """The model's ``params`` tree as ``jax.ShapeDtypeStruct`` leaves (float32), without memory or compute."""
    size = 2 ** (len(model.channel_mult) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = None
    if model.use_spatial_transformer and model.context_dim is not None:
        ctx = jax.ShapeDtypeStruct((1, 1, model.context_dim), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if model.num_classes is not None else None
    variables = jax.eval_shape(lambda x, t, c, y: model.init(jax.random.key(0), x, t, c, y), x, t, ctx, y)
    return variables["params"]
