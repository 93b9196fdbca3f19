"""First-stage convolutional autoencoder of Latent Diffusion: Encoder, Decoder and the KL-regularised model.

All tensors are NHWC. Parameters are float32; ``dtype`` is the compute dtype of convolutions and attention
(GroupNorm statistics are always float32). Module and parameter names follow the CompVis checkpoints, so
``encoder.down.0.block.1.norm1.weight`` is ``params['encoder']['down_0']['block_1']['norm1']['scale']``
(rule in ``lidiff.convert.common``).

Layout (L = len(ch_mult), level i has ``ch * ch_mult[i]`` channels and resolution ``resolution // 2**i``):

- Encoder: ``conv_in``; levels ``down_{i}`` (``block_{j}`` ResnetBlocks, ``attn_{j}`` where the level's
  resolution is in ``attn_resolutions``, ``downsample`` for i < L-1); ``mid`` (``block_1``, ``attn_1``,
  ``block_2``); ``norm_out``; swish; ``conv_out`` to 2*z_channels (``double_z``) or z_channels.
- Decoder: ``conv_in``; ``mid``; levels ``up_{i}`` run for i = L-1 ... 0 (``up_0`` is the full resolution and runs
  last), each with num_res_blocks+1 blocks, optional attention and ``upsample`` for i > 0; ``norm_out``; swish;
  ``conv_out`` to out_ch.

Getting at the decoder's last layer (for the adaptive GAN weight of the stage-1 loss):
``decode_features(z)`` (or ``__call__(..., return_features=True)``) returns ``h``, the activation fed into the
decoder's ``conv_out``, and ``conv_out_apply(params['decoder']['conv_out'], h)`` recomputes the reconstruction
exactly as the decoder does. The kernel is then an explicit input, e.g.::

    h, posterior = model.apply({'params': p}, x, rng, return_features=True)
    conv_out = p['decoder']['conv_out']
    def rec_of(kernel):
        return conv_out_apply({'kernel': kernel, 'bias': conv_out['bias']}, h)
    g_nll = jax.grad(lambda k: nll_loss(rec_of(k)))(conv_out['kernel'])
    g_gan = jax.grad(lambda k: gan_loss(rec_of(k)))(conv_out['kernel'])
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lidiff.nn.attention import AttentionKernel, dot_product_attention
from lidiff.nn.layers import Downsample, Upsample, group_norm, swish

AttnType = Literal["vanilla", "none"]

NORM_EPS = 1e-6  # every GroupNorm of the LDM autoencoder
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def conv2d(features: int, kernel: int, dtype: jnp.dtype, name: str) -> nn.Conv:
    """A kxk stride-1 ``nn.Conv`` named ``name`` with symmetric padding (k-1)//2 (k odd), as the reference."""
    p = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), padding=((p, p), (p, p)), dtype=dtype, name=name)


def conv_out_apply(conv_out_params: Any, h: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Applies the decoder's last 3x3 conv given its params explicitly.

    Args:
      conv_out_params: ``{'kernel': [3, 3, C, out_ch], 'bias': [out_ch]}``, i.e. ``params['decoder']['conv_out']``.
      h: [B, H, W, C], from ``decode_features``.
      dtype: compute dtype (the model's ``dtype``).

    Returns:
      [B, H, W, out_ch] float32: identical to the decoder's output for the same ``h``.
    """
    out_ch = conv_out_params["kernel"].shape[-1]
    conv = conv2d(out_ch, 3, dtype, "conv_out")
    return conv.apply({"params": conv_out_params}, h).astype(jnp.float32)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice with a residual; no time embedding. [B,H,W,Cin] -> [B,H,W,out_channels].

    A 1x1 ``nin_shortcut`` maps the residual when Cin != out_channels.
    """

    out_channels: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        h = swish(group_norm(NORM_EPS, "norm1")(x).astype(self.dtype))
        h = conv2d(self.out_channels, 3, self.dtype, "conv1")(h)
        h = swish(group_norm(NORM_EPS, "norm2")(h).astype(self.dtype))
        h = nn.Dropout(self.dropout, name="dropout")(h, deterministic=deterministic)
        h = conv2d(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, 1, self.dtype, "nin_shortcut")(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual, scale C**-0.5. [B,H,W,C] -> [B,H,W,C].

    ``q``, ``k``, ``v`` and ``proj_out`` are 1x1 convs (CompVis Conv2d 1x1 weights convert onto them).
    """

    attention_kernel: AttentionKernel = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = group_norm(NORM_EPS, "norm")(x).astype(self.dtype)
        q = conv2d(c, 1, self.dtype, "q")(h).reshape(b, hgt * wid, 1, c)
        k = conv2d(c, 1, self.dtype, "k")(h).reshape(b, hgt * wid, 1, c)
        v = conv2d(c, 1, self.dtype, "v")(h).reshape(b, hgt * wid, 1, c)
        o = dot_product_attention(q, k, v, kernel=self.attention_kernel, scale=c**-0.5)
        o = conv2d(c, 1, self.dtype, "proj_out")(o.reshape(b, hgt, wid, c))
        return x.astype(self.dtype) + o


class _MidBlock(nn.Module):
    """``block_1``, ``attn_1`` (absent when attn_type == "none"), ``block_2``; channels unchanged."""

    dropout: float
    attn_type: AttnType
    attention_kernel: AttentionKernel
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, h: jax.Array, deterministic: bool) -> jax.Array:
        c = h.shape[-1]
        h = ResnetBlock(c, self.dropout, self.dtype, name="block_1")(h, deterministic)
        if self.attn_type == "vanilla":
            h = AttnBlock(self.attention_kernel, self.dtype, name="attn_1")(h)
        return ResnetBlock(c, self.dropout, self.dtype, name="block_2")(h, deterministic)


class _Level(nn.Module):
    """One resolution level: ``num_blocks`` x (``block_{j}`` [+ ``attn_{j}``]), then optional resampling."""

    out_channels: int
    num_blocks: int
    use_attn: bool
    resample: Literal["down", "up", "none"]
    dropout: float
    attention_kernel: AttentionKernel
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, h: jax.Array, deterministic: bool) -> jax.Array:
        for j in range(self.num_blocks):
            h = ResnetBlock(self.out_channels, self.dropout, self.dtype, name=f"block_{j}")(h, deterministic)
            if self.use_attn:
                h = AttnBlock(self.attention_kernel, self.dtype, name=f"attn_{j}")(h)
        if self.resample == "down":
            h = Downsample(self.out_channels, padding="asymmetric", conv_name="conv", dtype=self.dtype,
                           name="downsample")(h)
        elif self.resample == "up":
            h = Upsample(self.out_channels, dtype=self.dtype, name="upsample")(h)
        return h


def _check_attn_type(attn_type: str) -> None:
    if attn_type not in ("vanilla", "none"):
        raise ValueError(f"attn_type must be 'vanilla' or 'none', got {attn_type!r}")


class Encoder(nn.Module):
    """Image -> latent moments. x: [B, R, R, in_channels] float32 in [-1, 1] -> [B, R/f, R/f, (2*)z_channels].

    f = 2**(len(ch_mult)-1). ``resolution`` (R at training) only decides where attention goes: level i has
    attention when ``resolution // 2**i`` is in ``attn_resolutions``. Inputs of other sizes are accepted.
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    in_channels: int = 3
    resolution: int = 256
    z_channels: int = 4
    double_z: bool = True
    dropout: float = 0.0
    attn_type: AttnType = "vanilla"
    attention_kernel: AttentionKernel = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        _check_attn_type(self.attn_type)
        n = len(self.ch_mult)
        h = conv2d(self.ch, 3, self.dtype, "conv_in")(x)
        for i, mult in enumerate(self.ch_mult):
            h = _Level(
                out_channels=self.ch * mult,
                num_blocks=self.num_res_blocks,
                use_attn=self.attn_type == "vanilla" and (self.resolution // 2**i) in self.attn_resolutions,
                resample="down" if i < n - 1 else "none",
                dropout=self.dropout,
                attention_kernel=self.attention_kernel,
                dtype=self.dtype,
                name=f"down_{i}",
            )(h, deterministic)
        h = _MidBlock(self.dropout, self.attn_type, self.attention_kernel, self.dtype, name="mid")(h, deterministic)
        h = swish(group_norm(NORM_EPS, "norm_out")(h).astype(self.dtype))
        out = 2 * self.z_channels if self.double_z else self.z_channels
        return conv2d(out, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    """Latent -> image. z: [B, r, r, z_channels] -> [B, r*f, r*f, out_ch] (float32, ~[-1, 1]).

    With ``return_features=True`` returns instead the activation fed into ``conv_out``:
    [B, r*f, r*f, ch * ch_mult[0]] (compute dtype); ``conv_out_apply`` maps it onto the output.
    """

    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    z_channels: int = 4
    dropout: float = 0.0
    attn_type: AttnType = "vanilla"
    attention_kernel: AttentionKernel = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True, return_features: bool = False) -> jax.Array:
        _check_attn_type(self.attn_type)
        n = len(self.ch_mult)
        h = conv2d(self.ch * self.ch_mult[-1], 3, self.dtype, "conv_in")(z)
        h = _MidBlock(self.dropout, self.attn_type, self.attention_kernel, self.dtype, name="mid")(h, deterministic)
        for i in reversed(range(n)):
            h = _Level(
                out_channels=self.ch * self.ch_mult[i],
                num_blocks=self.num_res_blocks + 1,
                use_attn=self.attn_type == "vanilla" and (self.resolution // 2**i) in self.attn_resolutions,
                resample="up" if i > 0 else "none",
                dropout=self.dropout,
                attention_kernel=self.attention_kernel,
                dtype=self.dtype,
                name=f"up_{i}",
            )(h, deterministic)
        h = swish(group_norm(NORM_EPS, "norm_out")(h).astype(self.dtype))
        if return_features:
            return h
        return conv2d(self.out_ch, 3, self.dtype, "conv_out")(h).astype(jnp.float32)


@flax.struct.dataclass
class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x). mean, logvar: [B, h, w, C] float32.

    Build it with ``from_moments`` / ``from_mean_logvar``, which clamp logvar to [-30, 20] as the reference does;
    the plain constructor stores what it is given.
    """

    mean: jax.Array
    logvar: jax.Array | None

    @classmethod
    def from_mean_logvar(cls, mean: jax.Array, logvar: jax.Array) -> "DiagonalGaussian":
        mean = jnp.asarray(mean, jnp.float32)
        logvar = jnp.clip(jnp.asarray(logvar, jnp.float32), LOGVAR_MIN, LOGVAR_MAX)
        return cls(mean=mean, logvar=logvar)

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """moments: [B, h, w, 2C]; the FIRST C channels are the mean, the last C the log-variance."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls.from_mean_logvar(mean, logvar)

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    @classmethod
    def point(cls, mean: jax.Array) -> "DiagonalGaussian":
        """A degenerate posterior at ``mean`` (a VQ encoder's output): ``sample`` and ``mode`` return ``mean``.
        ``logvar`` is None; ``kl``, ``std`` and ``var`` are undefined for it."""
        return cls(mean=jnp.asarray(mean, jnp.float32), logvar=None)

    @property
    def is_point(self) -> bool:
        return self.logvar is None

    def sample(self, rng: jax.Array) -> jax.Array:
        """mean + std * eps, eps ~ N(0, I) drawn from ``rng`` (a point posterior: mean). -> [B, h, w, C] float32."""
        if self.is_point:
            return self.mean
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(self || other), other defaulting to N(0, I). Summed over H, W, C -> [B] float32."""
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            terms = self.mean**2 + self.var - 1.0 - self.logvar
        else:
            terms = (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return 0.5 * jnp.sum(terms, axis=axes)

    def nll(self, x: jax.Array) -> jax.Array:
        """-log N(x; mean, var), summed over H, W, C -> [B] float32."""
        axes = tuple(range(1, self.mean.ndim))
        terms = np.log(2.0 * np.pi) + self.logvar + (x - self.mean) ** 2 / self.var
        return 0.5 * jnp.sum(terms, axis=axes)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (LDM ``AutoencoderKL``).

    Images [B, R, R, in_channels] float32 in [-1, 1] <-> latents [B, R/f, R/f, embed_dim] with
    f = ``downsample_factor``. Submodules: ``encoder`` (double_z), ``quant_conv`` (1x1, 2*z_channels ->
    2*embed_dim), ``post_quant_conv`` (1x1, embed_dim -> z_channels), ``decoder``. Fields use the CompVis
    ddconfig names. Init with ``model.init(rng, x, sample_posterior=False)`` (or pass an rng).
    """

    embed_dim: int = 4
    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    in_channels: int = 3
    resolution: int = 256
    z_channels: int = 4
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
        self.encoder = Encoder(in_channels=self.in_channels, double_z=True, **common)
        self.quant_conv = conv2d(2 * self.embed_dim, 1, self.dtype, "quant_conv")
        self.post_quant_conv = conv2d(self.z_channels, 1, self.dtype, "post_quant_conv")
        self.decoder = Decoder(out_ch=self.out_ch, **common)

    def encode(self, x: jax.Array, deterministic: bool = True) -> DiagonalGaussian:
        """x: [B, R, R, in_channels] float32 in [-1, 1] -> posterior over [B, R/f, R/f, embed_dim]."""
        moments = self.quant_conv(self.encoder(x, deterministic))
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        """z: [B, r, r, embed_dim] (unscaled latent) -> [B, r*f, r*f, out_ch] float32."""
        return self.decoder(self.post_quant_conv(z), deterministic)

    def decode_features(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        """z: [B, r, r, embed_dim] -> h [B, r*f, r*f, ch*ch_mult[0]], the input of ``decoder/conv_out``."""
        return self.decoder(self.post_quant_conv(z), deterministic, return_features=True)

    def __call__(
        self,
        x: jax.Array,
        rng: jax.Array | None = None,
        sample_posterior: bool = True,
        deterministic: bool = True,
        return_features: bool = False,
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruct x. Returns (x_rec [B, R, R, out_ch] float32, posterior).

        Args:
          x: [B, R, R, in_channels] float32 in [-1, 1].
          rng: key for the posterior sample; required when ``sample_posterior``.
          sample_posterior: decode a sample (training, as LDM) or the mean.
          deterministic: False enables dropout (needs the 'dropout' rng stream).
          return_features: return ``decode_features`` output in place of x_rec (see module docstring).
        """
        posterior = self.encode(x, deterministic)
        if sample_posterior:
            if rng is None:
                raise ValueError(
                    "AutoencoderKL: sample_posterior=True needs an rng; pass rng or sample_posterior=False")
            z = posterior.sample(rng)
        else:
            z = posterior.mode()
        if return_features:
            return self.decode_features(z, deterministic), posterior
        return self.decode(z, deterministic), posterior
