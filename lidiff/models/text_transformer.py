"""The jointly trained text encoder of the text-to-image LDM (CompVis ``BERTEmbedder.transformer``).

CompVis builds it from its vendored x-transformers (``ldm/modules/x_transformer.py``) as
``TransformerWrapper(num_tokens=vocab_size, max_seq_len, attn_layers=Encoder(dim=n_embed, depth=n_layer))`` and
reads ``transformer(tokens, return_embeddings=True)``::

    x = token_emb(tokens) + pos_emb[:L]                         [B, L, D]
    for i in range(n_layer):
        x = x + Attention(LayerNorm(x))                         layers.{2i}:   (LayerNorm, Attention, Residual)
        x = x + Linear(GELU(Linear(LayerNorm(x))))              layers.{2i+1}: (LayerNorm, FeedForward, Residual)
    z = LayerNorm(x)                                            [B, L, D]

Attention: 8 heads x 64 by default (inner width 512 whatever D is), ``to_q``/``to_k``/``to_v`` without bias,
``to_out`` with bias, logits scaled by ``dim_head**-0.5``, and no mask: padding tokens are attended to, as in
CompVis. GELU is the exact erf form (torch ``nn.GELU``); every LayerNorm has eps 1e-5.

Parameter names map one to one onto the CompVis keys under ``cond_stage_model.transformer.`` through
``lidiff.convert.common.compvis_key_to_path``::

    token_emb.weight                             -> token_emb/embedding               [vocab_size, D]
    pos_emb.emb.weight                           -> pos_emb/emb/embedding             [max_seq_len, D]
    attn_layers.layers.{2i}.0.{weight,bias}      -> attn_layers/layers_{2i}_0/{scale,bias}
    attn_layers.layers.{2i}.1.to_q.weight        -> attn_layers/layers_{2i}_1/to_q/kernel    [D, 512]
    attn_layers.layers.{2i}.1.to_out.weight      -> attn_layers/layers_{2i}_1/to_out/kernel  [512, D] (+ bias)
    attn_layers.layers.{2i+1}.0.{weight,bias}    -> attn_layers/layers_{2i+1}_0/{scale,bias}
    attn_layers.layers.{2i+1}.1.net.0.0.weight   -> attn_layers/layers_{2i+1}_1/net_0_0/kernel [D, 4D] (+ bias)
    attn_layers.layers.{2i+1}.1.net.2.weight     -> attn_layers/layers_{2i+1}_1/net_2/kernel   [4D, D] (+ bias)
    norm.{weight,bias}                           -> norm/{scale,bias}

The checkpoint's ``to_logits`` (a [D, vocab_size] language-model head) is never used by the embedder and has no
counterpart here; ``lidiff.convert.compvis_cond`` drops it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidiff.nn.attention import AttentionKernel, dot_product_attention
from lidiff.nn.transformer import torch_kernel_init

# x-transformers initialises both embedding tables N(0, 0.02).
_embedding_init = nn.initializers.normal(0.02)


def _dense(features: int, name: str, dtype: Any, *, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=torch_kernel_init, name=name
    )


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class SelfAttention(nn.Module):
    """Unmasked multi-head self-attention: ``to_out(attn(to_q(x), to_k(x), to_v(x)))``.

    Params: ``to_q``/``to_k``/``to_v`` kernel [D, heads * dim_head] (no bias), ``to_out`` kernel
    [heads * dim_head, D] and bias [D]. Heads are contiguous blocks of the inner width.
    """

    dim: int
    heads: int = 8
    dim_head: int = 64
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, dim] -> [B, L, dim] in ``dtype``."""
        b, length, _ = x.shape
        inner = self.heads * self.dim_head
        shape = (b, length, self.heads, self.dim_head)
        q = _dense(inner, "to_q", self.dtype, use_bias=False)(x).reshape(shape)
        k = _dense(inner, "to_k", self.dtype, use_bias=False)(x).reshape(shape)
        v = _dense(inner, "to_v", self.dtype, use_bias=False)(x).reshape(shape)
        a = dot_product_attention(q, k, v, kernel=self.attention_kernel, scale=self.dim_head**-0.5)
        return _dense(self.dim, "to_out", self.dtype)(a.reshape(b, length, inner))


class FeedForward(nn.Module):
    """``net_2(GELU(net_0_0(x)))``: D -> mult * D -> D, exact (erf) GELU.

    Params: ``net_0_0`` kernel [D, mult * D] + bias, ``net_2`` kernel [mult * D, D] + bias.
    """

    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, dim] -> [B, L, dim] in ``dtype``."""
        h = _dense(self.mult * self.dim, "net_0_0", self.dtype)(x)
        h = nn.gelu(h, approximate=False)
        return _dense(self.dim, "net_2", self.dtype)(h)


class Encoder(nn.Module):
    """``depth`` pre-LayerNorm blocks of (self-attention, residual) then (feed-forward, residual).

    Children ``layers_{2i}_0`` (LayerNorm), ``layers_{2i}_1`` (SelfAttention), ``layers_{2i+1}_0`` (LayerNorm),
    ``layers_{2i+1}_1`` (FeedForward), matching x-transformers' ``AttentionLayers.layers`` ModuleList.
    """

    dim: int
    depth: int
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, dim] -> [B, L, dim] in ``dtype`` (no final norm: that is ``TransformerEmbedder.norm``)."""
        x = x.astype(self.dtype)
        for i in range(self.depth):
            a, f = 2 * i, 2 * i + 1
            h = _layer_norm(f"layers_{a}_0")(x).astype(self.dtype)
            x = x + SelfAttention(
                self.dim, self.heads, self.dim_head, self.dtype, self.attention_kernel, name=f"layers_{a}_1"
            )(h)
            h = _layer_norm(f"layers_{f}_0")(x).astype(self.dtype)
            x = x + FeedForward(self.dim, self.ff_mult, self.dtype, name=f"layers_{f}_1")(h)
        return x


class AbsolutePositionalEmbedding(nn.Module):
    """A learned table ``emb`` [max_seq_len, D]; returns its first L rows as [1, L, D] float32."""

    dim: int
    max_seq_len: int

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        table = nn.Embed(self.max_seq_len, self.dim, embedding_init=_embedding_init, name="emb")
        return table(jnp.arange(length))[None]


class TransformerEmbedder(nn.Module):
    """Token ids -> cross-attention context, the LDM-KL-8-G text encoder trained jointly with the UNet.

    Attributes:
      n_embed: model and context width D (1280 for txt2img-1p4B; the UNet's ``context_dim``).
      n_layer: number of (attention, feed-forward) blocks (32 for txt2img-1p4B).
      vocab_size: token table size (30522 for bert-base-uncased; the tokenizer's vocabulary size).
      max_seq_len: longest token sequence (77).
      heads / dim_head: attention heads and their width (8 x 64, x-transformers' defaults).
      ff_mult: feed-forward expansion (4).
      dtype: compute dtype of the returned context; params are float32, LayerNorm and softmax run in float32.
      attention_kernel: see ``lidiff.nn.attention``.
    """

    n_embed: int
    n_layer: int
    vocab_size: int = 30522
    max_seq_len: int = 77
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: [B, L] int in [0, vocab_size), L <= max_seq_len -> context [B, L, n_embed] in ``dtype``."""
        if tokens.ndim != 2:
            raise ValueError(f"TransformerEmbedder expects tokens [B, L], got shape {tokens.shape}")
        length = tokens.shape[1]
        if length > self.max_seq_len:
            raise ValueError(f"TransformerEmbedder: {length} tokens exceed max_seq_len={self.max_seq_len}")
        token_emb = nn.Embed(self.vocab_size, self.n_embed, embedding_init=_embedding_init, name="token_emb")
        x = token_emb(tokens) + AbsolutePositionalEmbedding(self.n_embed, self.max_seq_len, name="pos_emb")(length)
        x = Encoder(
            self.n_embed,
            self.n_layer,
            self.heads,
            self.dim_head,
            self.ff_mult,
            self.dtype,
            self.attention_kernel,
            name="attn_layers",
        )(x)
        return _layer_norm("norm")(x).astype(self.dtype)
