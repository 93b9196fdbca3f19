"""The frozen CLIP text tower that conditions Stable Diffusion, as transformers' ``CLIPTextModel`` computes it.

::

    x = token_embedding(input_ids) + position_embedding[:L]     [B, L, D]
    for each of num_layers layers (pre-LayerNorm):
        x = x + out_proj(causal_attention(q_proj, k_proj, v_proj of layer_norm1(x)))
        x = x + fc2(act(fc1(layer_norm2(x))))
    last_hidden_state = final_layer_norm(x)                     [B, L, D]

Details that match ``transformers/models/clip/modeling_clip.py``:

- attention is causal (token i attends to tokens 0..i), heads of width D / num_heads, logits scaled by
  head_dim**-0.5, q/k/v/out projections all with biases; an optional ``attention_mask`` [B, L] (1 = token,
  0 = padding) additionally hides padded keys, as transformers does when given one. Stable Diffusion passes no
  mask: padding tokens after the end-of-text token are attended to causally like any other token.
- ``activation="quick_gelu"`` is ``x * sigmoid(1.702 x)`` (OpenAI CLIP ViT-L/14, SD v1); ``"gelu"`` is the exact
  erf GELU (OpenCLIP ViT-H/14 as diffusers stores SD v2's text encoder).
- every LayerNorm has ``layer_norm_eps`` (1e-5).

Which hidden state Stable Diffusion uses (``output``):

- SD v1 (CompVis ``FrozenCLIPEmbedder``): ``last_hidden_state``, i.e. ``output="last"``.
- SD v2 (Stability's ``FrozenOpenCLIPEmbedder(layer="penultimate")``): runs the first N-1 of the N resblocks, then
  applies ``ln_final``. That is ``output="penultimate"`` here: layers[:-1], then ``final_layer_norm``. It equals
  transformers' ``final_layer_norm(hidden_states[-2])``.
- diffusers' SD v2 ``text_encoder`` folder stores the same computation another way: its config has
  ``num_hidden_layers=23`` (the last OpenCLIP block dropped at conversion) and the pipeline reads
  ``last_hidden_state``. Load that folder with ``output="last"``; ``"penultimate"`` there would skip one block
  too many.

Parameter names follow the transformers keys (dots between levels, layer indices glued on by
``lidiff.convert.common.compvis_key_to_path``)::

    embeddings.token_embedding.weight         -> embeddings/token_embedding/embedding     [vocab_size, D]
    embeddings.position_embedding.weight      -> embeddings/position_embedding/embedding  [max_position_embeddings, D]
    encoder.layers.{i}.layer_norm1.{weight,bias}    -> encoder/layers_{i}/layer_norm1/{scale,bias}  [D]
    encoder.layers.{i}.self_attn.{q,k,v,out}_proj.weight -> encoder/layers_{i}/self_attn/{q,k,v,out}_proj/kernel
                                                             [D, D] (+ bias [D])
    encoder.layers.{i}.layer_norm2.{weight,bias}    -> encoder/layers_{i}/layer_norm2/{scale,bias}
    encoder.layers.{i}.mlp.fc1.weight         -> encoder/layers_{i}/mlp/fc1/kernel   [D, intermediate_size] (+ bias)
    encoder.layers.{i}.mlp.fc2.weight         -> encoder/layers_{i}/mlp/fc2/kernel   [intermediate_size, D] (+ bias)
    final_layer_norm.{weight,bias}            -> final_layer_norm/{scale,bias}

The converter is ``lidiff.convert.clip``. The pooled (end-of-text) output and the projection heads are not part
of this module: Stable Diffusion does not use them.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidiff.nn.attention import AttentionKernel
from lidiff.nn.transformer import torch_kernel_init

Activation = Literal["quick_gelu", "gelu"]
Output = Literal["last", "penultimate"]
ACTIVATIONS = ("quick_gelu", "gelu")
OUTPUTS = ("last", "penultimate")

# transformers initialises both embedding tables N(0, 0.02); the weights are meant to be converted anyway.
_embedding_init = nn.initializers.normal(0.02)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation, ``x * sigmoid(1.702 x)`` (not the tanh approximation of GELU)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return quick_gelu(x)
    if name == "gelu":
        return nn.gelu(x, approximate=False)
    raise ValueError(f"unknown CLIP activation {name!r}; choose one of {ACTIVATIONS}")


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=torch_kernel_init, name=name)


def _layer_norm(name: str, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None, *, kernel: AttentionKernel = "auto"
) -> jax.Array:
    """Causal multi-head attention, logits scaled by head_dim**-0.5.

    q, k, v: [B, L, N, H]; key_mask: None or [B, L] bool (False = padding key, hidden from every query)
    -> [B, L, N, H] in q's dtype. ``kernel`` as in ``lidiff.nn.attention``: ``"reference"`` is an explicit einsum
    with the softmax in float32; the others call ``jax.nn.dot_product_attention(is_causal=True)`` (cuDNN under
    ``"auto"`` only on GPU with half-precision inputs and no key mask).
    """
    if kernel == "reference":
        length = q.shape[1]
        logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) * q.shape[-1] ** -0.5
        allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :]
        logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bnts,bsnh->btnh", weights, v.astype(jnp.float32)).astype(q.dtype)
    if kernel not in ("auto", "xla", "cudnn"):
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of ('auto', 'xla', 'cudnn', 'reference')")
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if kernel == "auto":
        head_dim = q.shape[-1]
        cudnn = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
                 and head_dim % 8 == 0 and head_dim <= 128 and mask is None)
        kernel = "cudnn" if cudnn else "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=kernel)


class CLIPAttention(nn.Module):
    """``out_proj(causal_attention(q_proj(x), k_proj(x), v_proj(x)))``; every projection [D, D] with bias [D]."""

    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D], key_mask: None or [B, L] bool -> [B, L, D] in ``dtype``."""
        b, length, _ = x.shape
        shape = (b, length, self.num_heads, self.hidden_size // self.num_heads)
        q = _dense(self.hidden_size, "q_proj", self.dtype)(x).reshape(shape)
        k = _dense(self.hidden_size, "k_proj", self.dtype)(x).reshape(shape)
        v = _dense(self.hidden_size, "v_proj", self.dtype)(x).reshape(shape)
        a = causal_attention(q, k, v, key_mask, kernel=self.attention_kernel)
        return _dense(self.hidden_size, "out_proj", self.dtype)(a.reshape(b, length, self.hidden_size))


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))``: D -> intermediate_size -> D, both with bias."""

    hidden_size: int
    intermediate_size: int
    activation: Activation = "quick_gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> [B, L, D] in ``dtype``."""
        h = _activation(self.activation, _dense(self.intermediate_size, "fc1", self.dtype)(x))
        return _dense(self.hidden_size, "fc2", self.dtype)(h)


class CLIPEncoderLayer(nn.Module):
    """One pre-LayerNorm block: ``x + attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))``."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    activation: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D] -> [B, L, D] in ``dtype``."""
        h = _layer_norm("layer_norm1", self.layer_norm_eps)(x).astype(self.dtype)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, self.dtype, self.attention_kernel,
                              name="self_attn")(h, key_mask)
        h = _layer_norm("layer_norm2", self.layer_norm_eps)(x).astype(self.dtype)
        return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.activation, self.dtype, name="mlp")(h)


class CLIPTextEmbeddings(nn.Module):
    """``token_embedding(ids) + position_embedding(0..L-1)``; tables [vocab_size, D] and [max_positions, D]."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, L] int -> [B, L, D] float32."""
        token = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=_embedding_init, name="token_embedding")
        position = nn.Embed(self.max_position_embeddings, self.hidden_size, embedding_init=_embedding_init,
                            name="position_embedding")
        return token(input_ids) + position(jnp.arange(input_ids.shape[1]))[None]


class CLIPEncoder(nn.Module):
    """``num_layers`` ``CLIPEncoderLayer`` children ``layers_{i}``, of which the first ``run`` are applied."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    activation: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, run: int, key_mask: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D] -> the output of layer ``run - 1`` [B, L, D] in ``dtype`` (no final LayerNorm).

        At ``init`` every layer is called, so the params always hold all ``num_layers`` layers whatever ``run``.
        """
        for i in range(self.num_layers):
            if i >= run and not self.is_initializing():
                break
            layer = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_heads, self.activation,
                                     self.layer_norm_eps, self.dtype, self.attention_kernel, name=f"layers_{i}")
            y = layer(x, key_mask)
            if i < run:
                x = y
        return x


class CLIPTextTransformer(nn.Module):
    """Token ids -> CLIP text hidden states, the frozen conditioning encoder of Stable Diffusion.

    Attributes:
      vocab_size: token table size (49408 for the CLIP BPE tokenizer).
      max_position_embeddings: longest sequence (77).
      hidden_size: width D (768 for ViT-L/14 / SD v1, 1024 for OpenCLIP ViT-H/14 / SD v2; the UNet's
        ``context_dim``).
      intermediate_size: MLP width (4 D: 3072 / 4096).
      num_layers: encoder layers (12 for ViT-L/14; 24 for ViT-H/14, 23 in diffusers' SD v2 folder).
      num_heads: attention heads (12 / 16).
      activation: ``"quick_gelu"`` (SD v1) or ``"gelu"`` (exact erf GELU; SD v2).
      layer_norm_eps: LayerNorm epsilon (1e-5).
      dtype: compute dtype of the activations; params are float32, LayerNorm and the reference softmax run in
        float32.
      attention_kernel: see ``causal_attention``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 77
    activation: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    attention_kernel: AttentionKernel = "auto"

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, output: Output = "last", attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Encodes token ids.

        Args:
          input_ids: [B, L] int in [0, vocab_size), L <= max_position_embeddings (SD: L = 77, padded).
          output: ``"last"`` -> ``last_hidden_state`` (all layers, then ``final_layer_norm``; SD v1 and diffusers'
            23-layer SD v2 folder); ``"penultimate"`` -> layers[:-1], then ``final_layer_norm`` (Stability's SD v2
            with the full 24-layer OpenCLIP tower). Both return the final LayerNorm's output.
          attention_mask: None (as SD) or [B, L] with 1 for tokens and 0 for padding keys to hide.

        Returns:
          hidden states [B, L, hidden_size] in ``dtype``.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPTextTransformer expects input_ids [B, L], got shape {input_ids.shape}")
        length = input_ids.shape[1]
        if length > self.max_position_embeddings:
            raise ValueError(
                f"CLIPTextTransformer: {length} tokens exceed max_position_embeddings={self.max_position_embeddings}"
            )
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; choose one of {OUTPUTS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown CLIP activation {self.activation!r}; choose one of {ACTIVATIONS}")
        if output == "penultimate" and self.num_layers < 2:
            raise ValueError(f"output='penultimate' needs at least 2 layers, the model has {self.num_layers}")
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {attention_mask.shape} must have input_ids' shape {input_ids.shape}")
            key_mask = attention_mask.astype(bool)

        x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                               name="embeddings")(input_ids).astype(self.dtype)
        x = CLIPEncoder(
            self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads, self.activation,
            self.layer_norm_eps, self.dtype, self.attention_kernel, name="encoder",
        )(x, self.num_layers - 1 if output == "penultimate" else self.num_layers, key_mask)
        return _layer_norm("final_layer_norm", self.layer_norm_eps)(x).astype(self.dtype)
