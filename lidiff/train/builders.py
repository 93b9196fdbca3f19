"""Config -> modules. The one place that turns ``config.*.model`` fields into flax modules."""

from __future__ import annotations

import jax.numpy as jnp
from ml_collections import ConfigDict

from lidiff.errors import ConfigError


def build_autoencoder(model: ConfigDict, dtype: jnp.dtype = jnp.float32):
    """``config.autoencoder.model`` -> ``AutoencoderKL`` or ``VQModel``."""
    common = dict(
        ch=model.ch,
        ch_mult=tuple(model.ch_mult),
        num_res_blocks=model.num_res_blocks,
        attn_resolutions=tuple(model.attn_resolutions),
        resolution=model.resolution,
        z_channels=model.z_channels,
        embed_dim=model.embed_dim,
        dropout=model.dropout,
        attn_type=model.attn_type,
        attention_kernel=model.attention_kernel,
        dtype=dtype,
    )
    if model.kind == "kl":
        from lidiff.models.autoencoder import AutoencoderKL

        if not model.double_z:
            raise ConfigError("config.autoencoder.model.double_z must be True for kind='kl' (mean and logvar)")
        return AutoencoderKL(**common)
    if model.kind == "vq":
        from lidiff.models.quantizer import VQModel

        if model.n_embed <= 0:
            raise ConfigError("config.autoencoder.model.n_embed must be > 0 for kind='vq' (codebook size)")
        return VQModel(
            n_embed=model.n_embed,
            beta=model.beta,
            legacy=model.legacy,
            use_l2_normalized_codes=model.l2_normalized_codes,
            **common,
        )
    raise ConfigError(f"unknown config.autoencoder.model.kind {model.kind!r}; choose 'kl' or 'vq'")


def build_discriminator(loss: ConfigDict, dtype: jnp.dtype = jnp.float32):
    """``config.autoencoder.loss`` -> ``NLayerDiscriminator``."""
    from lidiff.models.discriminator import NLayerDiscriminator

    return NLayerDiscriminator(ndf=loss.disc_ndf, n_layers=loss.disc_num_layers, norm=loss.disc_norm, dtype=dtype)


def build_lpips(dtype: jnp.dtype = jnp.float32):
    from lidiff.models.lpips import LPIPS

    return LPIPS(dtype=dtype)


def build_unet(model: ConfigDict, num_classes: int | None = None, dtype: jnp.dtype = jnp.float32):
    """``config.diffusion.model`` -> ``UNetModel``; ``num_classes``: rows of ``label_emb`` (``adm`` mode), or None.
    The conditioning settings are checked against the UNet by ``lidiff.train.conditioning.check_conditioning``."""
    from lidiff.models.unet import UNetModel

    return UNetModel(
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        model_channels=model.model_channels,
        channel_mult=tuple(model.channel_mult),
        num_res_blocks=model.num_res_blocks,
        attention_resolutions=tuple(model.attention_resolutions),
        dropout=model.dropout,
        num_heads=model.num_heads,
        num_head_channels=model.num_head_channels,
        legacy=model.legacy,
        use_scale_shift_norm=model.use_scale_shift_norm,
        resblock_updown=model.resblock_updown,
        use_spatial_transformer=model.use_spatial_transformer,
        transformer_depth=model.transformer_depth,
        context_dim=model.context_dim or None,
        use_linear_in_transformer=model.use_linear_in_transformer,
        num_classes=num_classes,
        dtype=dtype,
        attention_kernel=model.attention_kernel,
        remat=model.remat,
    )
