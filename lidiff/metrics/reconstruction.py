"""Autoencoder reconstruction metrics: PSNR, SSIM, and codebook usage / perplexity of VQ models.

The paper's Tab. 8 columns. Images are compared in [0, 255] (uint8 or float); PSNR and SSIM are per image, then
averaged by the caller. SSIM follows Wang et al. (2004) as scikit-image's ``structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``: an 11x11 Gaussian window
(sigma 1.5, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, mean over valid (unpadded) positions and channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x: jax.Array, y: jax.Array, data_range: float = 255.0) -> jax.Array:
    """Peak signal-to-noise ratio per image: x, y [B, H, W, C] in [0, data_range] -> [B] float32 dB (inf if equal)."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    mse = jnp.mean((x - y) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)  # [11] for sigma 1.5


def _filter_valid(x: jax.Array, g: np.ndarray) -> jax.Array:
    """Separable 'valid' Gaussian filtering of x [B, H, W, C] (per channel) -> [B, H-k+1, W-k+1, C]."""
    k = len(g)
    c = x.shape[-1]
    kernel_h = jnp.asarray(np.tile(g.reshape(k, 1, 1, 1), (1, 1, 1, c)))
    kernel_w = jnp.asarray(np.tile(g.reshape(1, k, 1, 1), (1, 1, 1, c)))
    dn = ("NHWC", "HWIO", "NHWC")
    prec = jax.lax.Precision.HIGHEST
    x = jax.lax.conv_general_dilated(x, kernel_h, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                     precision=prec)
    return jax.lax.conv_general_dilated(x, kernel_w, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                        precision=prec)


def ssim(x: jax.Array, y: jax.Array, data_range: float = 255.0) -> jax.Array:
    """Structural similarity per image: x, y [B, H, W, C] in [0, data_range], H, W >= 11 -> [B] float32."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    g = _gaussian_window()
    if min(x.shape[1:3]) < len(g):
        raise ValueError(f"SSIM needs images of at least {len(g)}x{len(g)}, got {x.shape[1:3]}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _filter_valid(x, g), _filter_valid(y, g)
    vx = _filter_valid(x * x, g) - mx * mx
    vy = _filter_valid(y * y, g) - my * my
    cxy = _filter_valid(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def code_counts(indices: np.ndarray, num_codes: int) -> np.ndarray:
    """How often each code occurs: indices (any shape, ints in [0, num_codes)) -> int64 [num_codes]."""
    counts = np.bincount(np.asarray(indices).reshape(-1).astype(np.int64), minlength=num_codes)
    if len(counts) > num_codes:
        raise ValueError(f"codebook indices exceed num_codes={num_codes} (max index {len(counts) - 1})")
    return counts


def codebook_usage(counts: np.ndarray) -> dict[str, float]:
    """Codebook statistics of code counts accumulated over a whole split (``code_counts`` summed over batches).

    ``lidiff.models.quantizer.code_statistics`` gives the same quantities for one batch inside a jitted step;
    this is the dataset-level version the paper's Tab. 8 reports. Returns ``{"perplexity": exp(H(p)),
    "usage": fraction of codes used at least once, "num_used": count}`` with p the empirical code distribution.
    """
    counts = np.asarray(counts, np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    return {
        "perplexity": float(np.exp(-np.sum(nz * np.log(nz)))),
        "usage": float(np.count_nonzero(counts) / len(counts)),
        "num_used": int(np.count_nonzero(counts)),
    }


def super_resolution_quality(outputs: np.ndarray, inputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of super-resolved ``outputs`` and of PIL bicubic upsampling of the low-res
    ``inputs``, both against ``targets``. outputs, targets: uint8 [N, H, W, 3]; inputs: uint8 [N, h, w, 3]."""
    from PIL import Image

    size = (targets.shape[2], targets.shape[1])
    bicubic = np.stack([np.asarray(Image.fromarray(x).resize(size, Image.Resampling.BICUBIC)) for x in inputs])
    return {"psnr": float(jnp.mean(psnr(outputs, targets))), "ssim": float(jnp.mean(ssim(outputs, targets))),
            "bicubic_psnr": float(jnp.mean(psnr(bicubic, targets))),
            "bicubic_ssim": float(jnp.mean(ssim(bicubic, targets)))}
