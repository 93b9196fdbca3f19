"""The one attention kernel every lidiff network calls, behind a switch.

``kernel`` chooses the implementation:

- ``"auto"``: cuDNN fused attention on GPU when it applies (bfloat16/float16 inputs, head dim a multiple of 8
  and at most 128), otherwise XLA's ``jax.nn.dot_product_attention``.
- ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU only; fails loudly elsewhere).
- ``"reference"``: an explicit einsum with the softmax in float32, the exact reference numerics.

All give the same result up to floating-point rounding; the choice never changes the model.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

AttentionKernel = Literal["auto", "xla", "cudnn", "reference"]
KERNELS = ("auto", "xla", "cudnn", "reference")


def _cudnn_applies(q: jax.Array) -> bool:
    head_dim = q.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None) -> jax.Array:
    """softmax(q k^T * scale) v with the logits and softmax in float32.

    q: [B, T, N, D], k and v: [B, S, N, D] -> [B, T, N, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("btnd,bsnd->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnts,bsnd->btnd", weights, v.astype(jnp.float32)).astype(q.dtype)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, kernel: AttentionKernel = "auto", scale: float | None = None
) -> jax.Array:
    """Multi-head attention. q: [B, T, N, D], k and v: [B, S, N, D] -> [B, T, N, D].

    ``scale`` defaults to D**-0.5.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}")
    if kernel == "reference":
        return reference_attention(q, k, v, scale)
    if kernel == "auto":
        kernel = "cudnn" if _cudnn_applies(q) else "xla"
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=kernel)
