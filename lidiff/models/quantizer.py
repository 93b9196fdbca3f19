"""Vector quantisation (VQ-GAN codebook) and the LDM ``VQModel``.

All tensors are NHWC. The codebook is ``params['quantize']['embedding']['embedding']`` [n_embed, embed_dim]
(CompVis ``quantize.embedding.weight``), initialised U(-1/n_embed, 1/n_embed).

Dead codes. Two fixes are offered, both off by default:

- ``use_l2_normalized_codes=True``: look codes up by cosine similarity, i.e. L2-normalise the latent and the
  codebook before the nearest-neighbour search and use the normalised code as ``z_q`` (ViT-VQGAN, Yu et al. 2022).
  This changes the model (``z_q`` lies on the unit sphere), so checkpoints trained without it do not match.
- ``restart_dead_codes``: a pure function the trainer calls every few hundred steps. Keep an exponential moving
  average of ``QuantizerOutput.counts`` (``update_code_counts``); codes whose average falls below a threshold
  are moved onto randomly chosen encoder outputs of the current batch::

      counts_ema = update_code_counts(counts_ema, qout.counts, decay=0.99)        # every step
      if step % restart_every == 0:                                                 # every N steps
          h = model.apply({'params': p}, x, method=model.encode)                    # [B, h, w, embed_dim]
          cb = p['quantize']['embedding']['embedding']
          p['quantize']['embedding']['embedding'] = restart_dead_codes(
              cb, counts_ema, h.reshape(-1, h.shape[-1]), rng, threshold=1.0)

  ``threshold`` is in uses per batch (1.0: used less than once per batch on average). Afterwards give the
  restarted codes a fresh count (``counts_ema = jnp.where(counts_ema < threshold, threshold, counts_ema)``) so
  they are not restarted again at once, and consider resetting their optimiser moments.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lidiff.models.autoencoder import AttnType, Decoder, Encoder, conv2d
from lidiff.nn.attention import AttentionKernel

_HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class QuantizerOutput:
    """What the quantizer returns. Shapes for a latent z of [B, h, w, D]."""

    z_q: jax.Array  # [B, h, w, D] float32: straight-through z + sg(e - z) (forward value = the chosen codes)
    loss: jax.Array  # [] float32: codebook + commitment loss (placement of beta set by ``legacy``)
    indices: jax.Array  # [B, h, w] int32 in [0, n_embed)
    perplexity: jax.Array  # [] float32: exp(entropy of code usage in the batch), in [1, n_embed]
    codebook_usage: jax.Array  # [] float32: fraction of codes used at least once in the batch
    counts: jax.Array  # [n_embed] float32: how often each code was chosen in the batch


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def nearest_code(z_flat: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest code in L2. z_flat: [N, D], codebook: [K, D] -> [N] int32.

    Uses ||z||^2 - 2 z.e + ||e||^2 (an [N, K] matrix, never [N, K, D]) at full float32 precision.
    """
    z_flat = z_flat.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    d = (
        jnp.sum(z_flat**2, axis=1, keepdims=True)
        - 2.0 * jnp.dot(z_flat, codebook.T, precision=_HIGHEST)
        + jnp.sum(codebook**2, axis=1)[None, :]
    )
    return jnp.argmin(jax.lax.stop_gradient(d), axis=1).astype(jnp.int32)


def code_statistics(indices: jax.Array, n_embed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """indices: any shape of int codes -> (counts [n_embed] float32, perplexity [], codebook_usage [])."""
    flat = indices.reshape(-1)
    counts = jnp.zeros((n_embed,), jnp.float32).at[flat].add(1.0)
    probs = counts / flat.shape[0]
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
    usage = jnp.mean((counts > 0).astype(jnp.float32))
    return counts, perplexity, usage


def update_code_counts(counts_ema: jax.Array, counts: jax.Array, decay: float = 0.99) -> jax.Array:
    """EMA of per-code usage: decay * counts_ema + (1 - decay) * counts. Both [n_embed] float32."""
    return decay * counts_ema + (1.0 - decay) * counts


def restart_dead_codes(
    codebook: jax.Array, counts_ema: jax.Array, z_flat: jax.Array, rng: jax.Array, threshold: float
) -> jax.Array:
    """Moves every code with ``counts_ema < threshold`` onto a random encoder output (pure, jit-able).

    Args:
      codebook: [K, D] float32, ``params['quantize']['embedding']['embedding']``.
      counts_ema: [K] float32, moving average of ``QuantizerOutput.counts``.
      z_flat: [N, D] float32 encoder outputs (pre-quantisation latents, ``VQModel.encode`` flattened).
      rng: key choosing which outputs (uniformly, with replacement).
      threshold: codes used less than this (in counts per batch) are dead.

    Returns:
      [K, D]: live codes unchanged, each dead code replaced by one row of ``z_flat``.
    """
    pick = jax.random.randint(rng, (codebook.shape[0],), 0, z_flat.shape[0])
    dead = counts_ema < threshold
    return jnp.where(dead[:, None], z_flat[pick].astype(codebook.dtype), codebook)


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with a straight-through gradient. z: [B, h, w, embed_dim] -> QuantizerOutput.

    Loss (sg = stop_gradient, means over all elements):
      legacy=True  (reference default): mean((sg(e) - z)^2) + beta * mean((e - sg(z))^2)
      legacy=False (VQ-VAE paper):      beta * mean((sg(e) - z)^2) + mean((e - sg(z))^2)
    """

    n_embed: int
    embed_dim: int
    beta: float = 0.25
    legacy: bool = True
    use_l2_normalized_codes: bool = False

    def setup(self):
        lim = 1.0 / self.n_embed
        self.embedding = nn.Embed(
            self.n_embed,
            self.embed_dim,
            embedding_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -lim, lim),
            param_dtype=jnp.float32,
            dtype=jnp.float32,
        )

    def codebook(self) -> jax.Array:
        """[n_embed, embed_dim] float32, as used for lookup (L2-normalised when ``use_l2_normalized_codes``)."""
        cb = self.embedding.embedding
        return _l2_normalize(cb) if self.use_l2_normalized_codes else cb

    def __call__(self, z: jax.Array) -> QuantizerOutput:
        """z: [B, h, w, embed_dim] (any float dtype; quantised in float32)."""
        z = z.astype(jnp.float32)
        if self.use_l2_normalized_codes:
            z = _l2_normalize(z)
        codebook = self.codebook()
        indices = nearest_code(z.reshape(-1, self.embed_dim), codebook).reshape(z.shape[:-1])
        e = jnp.take(codebook, indices, axis=0)
        sg = jax.lax.stop_gradient
        commit = jnp.mean((sg(e) - z) ** 2)  # moves the encoder
        codebook_term = jnp.mean((e - sg(z)) ** 2)  # moves the codes
        if self.legacy:
            loss = commit + self.beta * codebook_term
        else:
            loss = self.beta * commit + codebook_term
        z_q = z + sg(e - z)
        counts, perplexity, usage = code_statistics(indices, self.n_embed)
        return QuantizerOutput(z_q=z_q, loss=loss, indices=indices, perplexity=perplexity,
                               codebook_usage=usage, counts=counts)

    def decode_code(self, indices: jax.Array) -> jax.Array:
        """indices: [B, h, w] int -> codes [B, h, w, embed_dim] float32."""
        return jnp.take(self.codebook(), indices, axis=0)


class VQModel(nn.Module):
    """Vector-quantised autoencoder (LDM ``VQModel`` / ``VQModelInterface``).

    Images [B, R, R, in_channels] float32 in [-1, 1] <-> latents [B, R/f, R/f, embed_dim], f = ``downsample_factor``.
    Submodules: ``encoder`` (single z), ``quant_conv`` (1x1 z_channels -> embed_dim), ``quantize``,
    ``post_quant_conv`` (1x1 embed_dim -> z_channels), ``decoder``.

    As in LDM, the diffusion latent is the PRE-quantisation ``encode(x)``; ``decode(h)`` quantises it first.
    """

    n_embed: int = 8192
    embed_dim: int = 3
    beta: float = 0.25
    legacy: bool = True
    use_l2_normalized_codes: bool = False
    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    in_channels: int = 3
    resolution: int = 256
    z_channels: int = 3
    dropout: float = 0.0
    attn_type: AttnType = "vanilla"
    attention_kernel: AttentionKernel = "auto"
    dtype: jnp.dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def setup(self):
        common = dict(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                      attn_resolutions=self.attn_resolutions, resolution=self.resolution,
                      z_channels=self.z_channels, dropout=self.dropout, attn_type=self.attn_type,
                      attention_kernel=self.attention_kernel, dtype=self.dtype)
        self.encoder = Encoder(in_channels=self.in_channels, double_z=False, **common)
        self.quant_conv = conv2d(self.embed_dim, 1, self.dtype, "quant_conv")
        self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.legacy,
                                        self.use_l2_normalized_codes)
        self.post_quant_conv = conv2d(self.z_channels, 1, self.dtype, "post_quant_conv")
        self.decoder = Decoder(out_ch=self.out_ch, **common)

    def encode(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """x: [B, R, R, in_channels] in [-1, 1] -> h [B, R/f, R/f, embed_dim] float32 (pre-quantisation)."""
        return self.quant_conv(self.encoder(x, deterministic)).astype(jnp.float32)

    def quantize_latent(self, h: jax.Array) -> tuple[jax.Array, QuantizerOutput]:
        """h: [B, r, r, embed_dim] -> (z_q [B, r, r, embed_dim] straight-through, QuantizerOutput)."""
        out = self.quantize(h)
        return out.z_q, out

    def decode_quantized(self, z_q: jax.Array, deterministic: bool = True) -> jax.Array:
        """Already-quantised z_q: [B, r, r, embed_dim] -> [B, r*f, r*f, out_ch] float32 (no lookup)."""
        return self.decoder(self.post_quant_conv(z_q), deterministic)

    def decode(self, h: jax.Array, deterministic: bool = True) -> jax.Array:
        """Pre-quantisation h: [B, r, r, embed_dim] -> quantise -> [B, r*f, r*f, out_ch] float32."""
        z_q, _ = self.quantize_latent(h)
        return self.decode_quantized(z_q, deterministic)

    def decode_features(self, z_q: jax.Array, deterministic: bool = True) -> jax.Array:
        """Already-quantised z_q (``QuantizerOutput.z_q``) -> the input of ``decoder/conv_out``,
        [B, r*f, r*f, ch*ch_mult[0]]; ``autoencoder.conv_out_apply`` finishes the decode."""
        return self.decoder(self.post_quant_conv(z_q), deterministic, return_features=True)

    def decode_code(self, indices: jax.Array, deterministic: bool = True) -> jax.Array:
        """indices: [B, r, r] int in [0, n_embed) -> [B, r*f, r*f, out_ch] float32."""
        return self.decode_quantized(self.quantize.decode_code(indices), deterministic)

    def __call__(
        self, x: jax.Array, deterministic: bool = True, return_features: bool = False
    ) -> tuple[jax.Array, QuantizerOutput]:
        """x: [B, R, R, in_channels] in [-1, 1] -> (x_rec [B, R, R, out_ch] float32, QuantizerOutput).

        ``return_features=True`` returns ``decode_features(z_q)`` in place of x_rec (for the adaptive GAN weight).
        ``deterministic=False`` enables dropout (needs the 'dropout' rng stream).
        """
        z_q, qout = self.quantize_latent(self.encode(x, deterministic))
        if return_features:
            return self.decode_features(z_q, deterministic), qout
        return self.decode_quantized(z_q, deterministic), qout
