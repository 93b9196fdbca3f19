"""Latent diffusion end to end for sampling: UNet + conditioning + schedule + frozen first stage.

``LatentDiffusion.generate`` draws latents with any sampler of ``lidiff.diffusion.samplers`` (with classifier-free
guidance when asked), divides by ``scale_factor`` and decodes them with the first stage, with each batch split over
the devices of a mesh. Each distinct (sampler, steps, shape, guidance, mesh) compiles once and is cached.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lidiff import parallel
from lidiff.diffusion import samplers
from lidiff.diffusion.schedule import DiffusionSchedule
from lidiff.train.first_stage import FirstStage


def to_uint8(x: Any) -> np.ndarray:
    """Images in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
    return np.asarray(np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255), np.uint8)


class LatentDiffusion:
    """The stage-2 model as a function: ``apply_model(params, x_t, t, cond) -> output``.

    params: {"unet": ..., "cond": ... or {}}; cond: None or {"label": [B] int32} (``null_label`` = unconditional).
    """

    def __init__(self, unet, cond_model, schedule: DiffusionSchedule, parameterization: str,
                 first_stage: FirstStage, null_label: int | None):
        self.unet = unet
        self.cond_model = cond_model
        self.schedule = schedule
        self.parameterization = parameterization
        self.first_stage = first_stage
        self.null_label = null_label
        self._compiled: dict[tuple, Callable] = {}

    def init_params(self, rng: jax.Array, latent_shape: tuple[int, int, int]) -> dict:
        k_unet, k_cond = jax.random.split(rng)
        x = jnp.zeros((1,) + tuple(latent_shape), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        cond_params, context = {}, None
        if self.cond_model is not None:
            labels = jnp.zeros((1,), jnp.int32)
            cond_params = self.cond_model.init(k_cond, labels)["params"]
            context = self.cond_model.apply({"params": cond_params}, labels)
        unet_params = self.unet.init(k_unet, x, t, context=context)["params"]
        return {"unet": unet_params, "cond": cond_params}

    def apply_model(self, params: dict, x: jax.Array, t: jax.Array, cond: dict | None, *,
                    deterministic: bool = True, dropout_rng: jax.Array | None = None) -> jax.Array:
        """x: [B, h, w, c] noisy scaled latents, t: [B] int32 -> model output [B, h, w, c] float32."""
        context = None
        if self.cond_model is not None:
            context = self.cond_model.apply({"params": params["cond"]}, cond["label"])
        rngs = {"dropout": dropout_rng} if not deterministic else {}
        return self.unet.apply({"params": params["unet"]}, x, t, context=context, deterministic=deterministic,
                               rngs=rngs)

    def _sampler(self, shape: tuple[int, ...], sampler: str, steps: int | None, eta: float,
                 guidance_scale: float, mesh: Mesh) -> Callable:
        key = (shape, sampler, steps, eta, guidance_scale, mesh)
        if key not in self._compiled:
            conditional = self.cond_model is not None
            guided = conditional and guidance_scale != 1.0

            def run(params, fs_params, scale_factor, rng, labels):
                cond = {"label": labels} if conditional else None
                uncond = {"label": jnp.full_like(labels, self.null_label)} if guided else None
                model_fn = lambda x, t, c: self.apply_model(params, x, t, c)  # noqa: E731
                z = samplers.sample(model_fn, self.schedule, shape, rng, sampler=sampler, num_steps=steps, eta=eta,
                                    guidance_scale=guidance_scale, cond=cond, uncond=uncond,
                                    parameterization=self.parameterization)
                return self.first_stage.decode(fs_params, z / scale_factor)

            rep, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)
            self._compiled[key] = jax.jit(run, in_shardings=(rep, rep, rep, rep, split), out_shardings=split)
        return self._compiled[key]

    def generate(self, params: dict, fs_params: Any, scale_factor: Any, rng: jax.Array, *, num: int,
                 latent_shape: tuple[int, int, int], labels: np.ndarray | None = None, sampler: str = "ddim",
                 steps: int | None = 50, eta: float = 0.0, guidance_scale: float = 1.0,
                 batch_size: int | None = None, progress: Callable[[int], None] | None = None,
                 mesh: Mesh | None = None) -> np.ndarray:
        """Draws ``num`` images [num, h*f, w*f, 3] float32 in about [-1, 1] (host array).

        labels: [num] int class labels for class-conditional models (required then). Batches of ``batch_size``
        (default: all at once) use keys ``fold_in(rng, batch_index)``; ``progress(n)`` is called after each.
        Each batch is split over the devices of ``mesh`` (default: every local device); ``batch_size`` is rounded
        up to a multiple of their number. Random draws do not depend on how the batch is split, so 1 and 8
        devices give the same images for the same (rounded) batch size.
        """
        if self.cond_model is not None and labels is None:
            raise ValueError("this model is class-conditional: pass labels")
        mesh = mesh if mesh is not None else parallel.make_mesh(jax.local_devices())
        devices = mesh.devices.size
        batch_size = -(-(batch_size or num) // devices) * devices
        params, fs_params, scale_factor, rng = parallel.put_replicated((params, fs_params, scale_factor, rng), mesh)
        out = []
        for i, start in enumerate(range(0, num, batch_size)):
            n = min(batch_size, num - start)
            batch_labels = np.zeros((batch_size,), np.int32)
            if labels is not None:
                chunk = np.asarray(labels[start:start + n], np.int32)
                batch_labels[:n] = chunk
                batch_labels[n:] = chunk[-1]
            fn = self._sampler((batch_size,) + tuple(latent_shape), sampler, steps, float(eta), float(guidance_scale),
                               mesh)
            images = fn(params, fs_params, scale_factor, jax.random.fold_in(rng, i), batch_labels)
            out.append(np.asarray(jax.device_get(images))[:n])
            if progress is not None:
                progress(n)
        return np.concatenate(out)
