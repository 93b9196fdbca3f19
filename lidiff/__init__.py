"""lidiff: Latent Diffusion Models (Rombach et al., CVPR 2022) in JAX/Flax.

Subpackages, in layering order (each may import only those before it):

- ``lidiff.nn``: layers shared by every network (norms, resampling, attention).
- ``lidiff.models``: autoencoders, quantizer, UNet, discriminator, LPIPS, conditioning.
- ``lidiff.diffusion``: schedules, forward process, samplers (jax/numpy only).
- ``lidiff.losses``: autoencoder and diffusion losses.
- ``lidiff.data``: image sources and transforms; the only image I/O.
- ``lidiff.train``: train states, steps and loops; the only code that reads a config.
"""

__version__ = "0.1.0"
