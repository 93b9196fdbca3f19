"""Attention blocks of the LDM UNet: plain self-attention and the spatial transformer (cross-attention).

All image tensors are NHWC; token tensors are [B, L, D]. Parameters are float32; ``dtype`` is the compute dtype.
Normalisation statistics and the attention softmax run in float32 whatever ``dtype`` is. Module and parameter
names follow the CompVis modules (``lidiff.convert.common.compvis_key_to_path``), e.g.
``transformer_blocks.0.attn1.to_q.weight`` -> ``transformer_blocks_0/attn1/to_q/kernel``.

The attention itself is ``lidiff.nn.attention.dot_product_attention`` with the ``attention_kernel`` switch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidiff.nn.attention import AttentionKernel, dot_product_attention
from lidiff.nn.layers import group_norm

# PyTorch's default Conv/Linear weight init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros_init = nn.initializers.zeros


def _dense(features: int, name: str, dtype: Any, *, use_bias: bool = True, zero: bool = False) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=zeros_init if zero else torch_kernel_init,
        name=name,
    )


def _conv1x1(features: int, name: str, dtype: Any, *, zero: bool = False) -> nn.Conv:
    return nn.Conv(
        features,
        (1, 1),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=zeros_init if zero else torch_kernel_init,
        name=name,
    )


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class AttentionBlock(nn.Module):
    """Plain multi-head self-attention over all pixels with a residual (the UNet ``AttentionBlock``).

    ``x + proj_out(attn(q, k, v))`` with ``q, k, v`` Dense projections of ``GroupNorm32(x)`` (eps 1e-5), logits
    scaled by ``head_dim**-0.5``. Params: ``norm`` (scale, bias [C]), ``q``/``k``/``v``/``proj_out`` (kernel
    [C, C], bias [C]); ``proj_out`` is zero-initialised. CompVis stores q, k, v packed per head in one Conv1d
    ``qkv``; ``lidiff.convert.diffusers_unet`` splits it.

    Attributes:
      num_heads: number of heads H; C must be divisible by H.
      epsilon: GroupNorm epsilon.
    """

    num_heads: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C] in ``dtype``."""
        b, hgt, wid, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"AttentionBlock: {c} channels are not divisible into {self.num_heads} heads")
        d = c // self.num_heads
        h = group_norm(self.epsilon, "norm")(x).astype(self.dtype).reshape(b, hgt * wid, c)
        q = _dense(c, "q", self.dtype)(h).reshape(b, hgt * wid, self.num_heads, d)
        k = _dense(c, "k", self.dtype)(h).reshape(b, hgt * wid, self.num_heads, d)
        v = _dense(c, "v", self.dtype)(h).reshape(b, hgt * wid, self.num_heads, d)
        a = dot_product_attention(q, k, v, kernel=self.attention_kernel).reshape(b, hgt * wid, c)
        out = _dense(c, "proj_out", self.dtype, zero=True)(a)
        return x.astype(self.dtype) + out.reshape(b, hgt, wid, c)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` onto ``context`` (self-attention when ``context`` is None).

    Params: ``to_q`` [query_dim, inner], ``to_k``/``to_v`` [context_dim, inner] (no bias), ``to_out_0``
    [inner, query_dim] + bias, with ``inner = heads * dim_head``. Heads are contiguous blocks of ``inner``.

    Attributes:
      query_dim: width D of ``x``.
      heads: number of heads.
      dim_head: width of one head.
      context_dim: width of ``context``; None means ``query_dim`` (the block is then self-attention).
    """

    query_dim: int
    heads: int
    dim_head: int
    context_dim: int | None = None
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: [B, T, query_dim], context: [B, S, context_dim] or None -> [B, T, query_dim] in ``dtype``."""
        context_dim = self.query_dim if self.context_dim is None else self.context_dim
        if context is None:
            if context_dim != self.query_dim:
                raise ValueError(
                    f"CrossAttention expects a context of width {context_dim}; got none (self-attention needs "
                    f"context_dim == query_dim == {self.query_dim})"
                )
            context = x
        elif context.shape[-1] != context_dim:
            raise ValueError(f"CrossAttention expects context [B, S, {context_dim}], got {context.shape}")
        b, t, _ = x.shape
        s = context.shape[1]
        inner = self.heads * self.dim_head
        q = _dense(inner, "to_q", self.dtype, use_bias=False)(x).reshape(b, t, self.heads, self.dim_head)
        k = _dense(inner, "to_k", self.dtype, use_bias=False)(context).reshape(b, s, self.heads, self.dim_head)
        v = _dense(inner, "to_v", self.dtype, use_bias=False)(context).reshape(b, s, self.heads, self.dim_head)
        a = dot_product_attention(q, k, v, kernel=self.attention_kernel).reshape(b, t, inner)
        return _dense(self.query_dim, "to_out_0", self.dtype)(a)


class GEGLU(nn.Module):
    """``a * GELU(gate)`` (exact erf GELU) with ``[a | gate] = proj(x)``: value first, gate second.

    Params: ``proj`` kernel [D, 2 * dim_out], bias [2 * dim_out].
    """

    dim_out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., dim_out]."""
        a, gate = jnp.split(_dense(2 * self.dim_out, "proj", self.dtype)(x), 2, axis=-1)
        return a * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward ``net_2(net_0(x))``: D -> 2 * mult * D (gated to mult * D) -> D."""

    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, dim] -> [B, T, dim]."""
        h = GEGLU(self.mult * self.dim, dtype=self.dtype, name="net_0")(x)
        return _dense(self.dim, "net_2", self.dtype)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm (eps 1e-5) self-attention, cross-attention and GEGLU feed-forward, each with a residual.

    Children: ``norm1``, ``attn1`` (self), ``norm2``, ``attn2`` (onto ``context``; self-attention when it is
    None), ``norm3``, ``ff``.
    """

    dim: int
    n_heads: int
    d_head: int
    context_dim: int | None = None
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: [B, T, dim], context: [B, S, context_dim] or None -> [B, T, dim] in ``dtype``."""
        kw = dict(dtype=self.dtype, attention_kernel=self.attention_kernel)
        x = x.astype(self.dtype)
        h = _layer_norm("norm1")(x).astype(self.dtype)
        x = x + CrossAttention(self.dim, self.n_heads, self.d_head, name="attn1", **kw)(h)
        h = _layer_norm("norm2")(x).astype(self.dtype)
        x = x + CrossAttention(self.dim, self.n_heads, self.d_head, self.context_dim, name="attn2", **kw)(h, context)
        h = _layer_norm("norm3")(x).astype(self.dtype)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(h)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on ``context`` by cross-attention.

    ``x + proj_out(blocks(proj_in(GroupNorm32(x))))`` with GroupNorm eps 1e-6. ``proj_in``/``proj_out`` are 1x1
    convs (kernel [1, 1, C, inner] / [1, 1, inner, C]) or, with ``use_linear``, Dense layers (kernel [C, inner] /
    [inner, C]); both compute the same function, the flag only mirrors the checkpoint layout. ``proj_out`` is
    zero-initialised. Pixels are flattened row-major (``b h w c -> b (h w) c``).

    Attributes:
      n_heads: number of heads; ``inner = n_heads * d_head``.
      d_head: width of one head.
      depth: number of ``transformer_blocks_{k}``.
      context_dim: width of ``context``; None makes ``attn2`` a second self-attention.
      use_linear: Dense instead of 1x1 conv for ``proj_in``/``proj_out`` (SD2 ``use_linear_in_transformer``).
    """

    n_heads: int
    d_head: int
    depth: int = 1
    context_dim: int | None = None
    use_linear: bool = False
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: [B, H, W, C], context: [B, L, context_dim] or None -> [B, H, W, C] in ``dtype``."""
        b, hgt, wid, c = x.shape
        inner = self.n_heads * self.d_head
        h = group_norm(1e-6, "norm")(x).astype(self.dtype)
        if self.use_linear:
            h = _dense(inner, "proj_in", self.dtype)(h.reshape(b, hgt * wid, c))
        else:
            h = _conv1x1(inner, "proj_in", self.dtype)(h).reshape(b, hgt * wid, inner)
        for k in range(self.depth):
            h = BasicTransformerBlock(
                inner,
                self.n_heads,
                self.d_head,
                self.context_dim,
                dtype=self.dtype,
                attention_kernel=self.attention_kernel,
                name=f"transformer_blocks_{k}",
            )(h, context)
        if self.use_linear:
            h = _dense(c, "proj_out", self.dtype, zero=True)(h).reshape(b, hgt, wid, c)
        else:
            h = _conv1x1(c, "proj_out", self.dtype, zero=True)(h.reshape(b, hgt, wid, inner))
        return x.astype(self.dtype) + h
