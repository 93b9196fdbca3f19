"""The stage-2 model as one pure object: UNet + conditioning encoder + schedule + frozen first stage.

    ldm = LatentDiffusion(unet, conditioner, schedule, parameterization, first_stage)
    params = ldm.init_params(rng, latent_shape)                 # {"unet": ..., "cond": ... or {}}
    cond = ldm.encode_condition(params, inputs)                 # raw inputs -> {"context" | "y" | "concat": ...}
    out = ldm.apply_model(params, x_t, t, cond)                 # [B, h, w, c] eps / x0 / v
    images = ldm.generate(params, first_stage_params, scale_factor, rng, num=..., latent_shape=...,
                          inputs=..., sampler="ddim", steps=50, guidance_scale=5.0)

``FirstStage`` is the frozen KL or VQ autoencoder behind one interface: ``encode`` returns a posterior
(``DiagonalGaussian``; VQ a point posterior at the pre-quantisation latent), ``decode`` takes an unscaled latent.
Nothing here reads files or configs; ``lidiff.runs`` builds these objects from a run directory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lidiff import parallel
from lidiff.diffusion import samplers
from lidiff.diffusion.schedule import DiffusionSchedule
from lidiff.models.autoencoder import DiagonalGaussian
from lidiff.models.conditioning import check_inputs


@dataclasses.dataclass(frozen=True)
class FirstStage:
    """A KL or VQ autoencoder used frozen. All methods are pure in ``params`` (jit them from outside).

    Latents here are UNSCALED (``scale_factor`` is applied by the caller).
    """

    model: Any
    kind: str  # "kl" | "vq"

    @property
    def latent_channels(self) -> int:
        return self.model.embed_dim

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factor

    def encode(self, params: Any, x: jax.Array) -> DiagonalGaussian:
        """x: [B, R, R, 3] in [-1, 1] -> the posterior over latents [B, R/f, R/f, c] (VQ: a point posterior at
        the pre-quantisation latent, which LDM trains on)."""
        if self.kind == "kl":
            return self.model.apply({"params": params}, x, method=self.model.encode)
        return DiagonalGaussian.point(self.model.apply({"params": params}, x, method=self.model.encode))

    def decode(self, params: Any, z: jax.Array) -> jax.Array:
        """z: [B, h, w, c] unscaled latent -> images [B, h*f, w*f, 3] float32 (VQ quantises first)."""
        return self.model.apply({"params": params}, z, method=self.model.decode)


def posterior_arrays(posterior: DiagonalGaussian) -> dict[str, jax.Array]:
    """A posterior as named arrays (what the latent cache stores): ``mean`` and, for KL, ``logvar``."""
    return {"mean": posterior.mean} if posterior.is_point else {"mean": posterior.mean, "logvar": posterior.logvar}


def posterior_from_arrays(arrays: Mapping[str, jax.Array]) -> DiagonalGaussian:
    """The inverse of ``posterior_arrays`` (``logvar`` absent = a point posterior)."""
    if "logvar" in arrays:
        return DiagonalGaussian.from_mean_logvar(arrays["mean"], arrays["logvar"])
    return DiagonalGaussian.point(arrays["mean"])


class LatentDiffusion:
    """UNet + conditioning encoder + schedule + frozen first stage (see the module docstring).

    params: {"unet": ..., "cond": ...}; raw conditioning ``inputs`` as the encoder's ``input_specs`` say.
    """

    def __init__(self, unet: Any, conditioner: Any, schedule: DiffusionSchedule, parameterization: str,
                 first_stage: FirstStage):
        self.unet = unet
        self.conditioner = conditioner
        self.schedule = schedule
        self.parameterization = parameterization
        self.first_stage = first_stage
        self._compiled: dict[tuple, Callable] = {}

    @property
    def conditional(self) -> bool:
        return bool(self.conditioner.input_specs)

    def null_inputs(self, n: int) -> dict:
        """The encoder's null input for ``n`` rows (classifier-free guidance's unconditional branch)."""
        return self.conditioner.null_inputs(n)

    def init_params(self, rng: jax.Array, latent_shape: tuple[int, int, int]) -> dict:
        k_unet, k_cond = jax.random.split(rng)
        cond_params = self.conditioner.init(k_cond)
        cond = self.conditioner.encode(cond_params, self.conditioner.null_inputs(1))
        x = jnp.zeros((1,) + tuple(latent_shape), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        unet_params = self.unet.init(k_unet, self._unet_input(x, cond), t, context=cond.get("context"),
                                     y=cond.get("y"))["params"]
        return {"unet": unet_params, "cond": cond_params}

    def encode_condition(self, params: dict, inputs: Mapping[str, Any]) -> dict:
        """Raw conditioning inputs [B, ...] -> cond pytree ({} for unconditional models)."""
        return self.conditioner.encode(params["cond"], inputs)

    @staticmethod
    def _unet_input(x: jax.Array, cond: Mapping[str, jax.Array]) -> jax.Array:
        if "concat" not in cond:
            return x
        return jnp.concatenate([x, cond["concat"].astype(x.dtype)], axis=-1)

    def apply_model(self, params: dict, x: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array] | None, *,
                    deterministic: bool = True, dropout_rng: jax.Array | None = None) -> jax.Array:
        """x: [B, h, w, c] noisy scaled latents, t: [B] int32, cond: ``encode_condition``'s pytree (or None)
        -> model output [B, h, w, c] float32."""
        cond = cond or {}
        rngs = {"dropout": dropout_rng} if not deterministic else {}
        return self.unet.apply({"params": params["unet"]}, self._unet_input(x, cond), t,
                               context=cond.get("context"), y=cond.get("y"), deterministic=deterministic, rngs=rngs)

    def _sampler(self, shape: tuple[int, ...], sampler: str, steps: int | None, eta: float,
                 guidance_scale: float, mesh: Mesh) -> Callable:
        key = (shape, sampler, steps, eta, guidance_scale, mesh)
        if key not in self._compiled:
            guided = self.conditional and guidance_scale != 1.0

            def run(params, fs_params, scale_factor, rng, inputs):
                cond = self.encode_condition(params, inputs) if self.conditional else None
                uncond = self.encode_condition(params, self.null_inputs(shape[0])) if guided else None
                model_fn = lambda x, t, c: self.apply_model(params, x, t, c)  # noqa: E731
                z = samplers.sample(model_fn, self.schedule, shape, rng, sampler=sampler, num_steps=steps, eta=eta,
                                    guidance_scale=guidance_scale, cond=cond, uncond=uncond,
                                    parameterization=self.parameterization)
                return self.first_stage.decode(fs_params, z / scale_factor)

            rep, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)
            self._compiled[key] = jax.jit(run, in_shardings=(rep, rep, rep, rep, split), out_shardings=split)
        return self._compiled[key]

    def generate(self, params: dict, fs_params: Any, scale_factor: Any, rng: jax.Array, *, num: int,
                 latent_shape: tuple[int, int, int], inputs: Mapping[str, np.ndarray] | None = None,
                 sampler: str = "ddim", steps: int | None = 50, eta: float = 0.0, guidance_scale: float = 1.0,
                 batch_size: int | None = None, progress: Callable[[int], None] | None = None,
                 mesh: Mesh | None = None) -> np.ndarray:
        """Draws ``num`` images [num, h*f, w*f, 3] float32 in about [-1, 1] (host array).

        inputs: raw conditioning inputs, each [num, ...] (the encoder's ``input_specs``; required exactly when the
        model is conditional). Batches of ``batch_size`` (default: all at once) use keys ``fold_in(rng,
        batch_index)``; ``progress(n)`` is called after each. Each batch is split over the devices of ``mesh``
        (default: every local device); ``batch_size`` is rounded up to a multiple of their number. Random draws
        do not depend on how the batch is split, so 1 and 8 devices give the same images for the same (rounded)
        batch size. With ``guidance_scale`` != 1 the unconditional branch uses the encoder's null input.
        """
        inputs = dict(inputs or {})
        check_inputs(self.conditioner, inputs, num)
        mesh = mesh if mesh is not None else parallel.make_mesh(jax.local_devices())
        devices = mesh.devices.size
        batch_size = -(-(batch_size or num) // devices) * devices
        params, fs_params, scale_factor, rng = parallel.put_replicated((params, fs_params, scale_factor, rng), mesh)
        fn = self._sampler((batch_size,) + tuple(latent_shape), sampler, steps, float(eta), float(guidance_scale),
                           mesh)
        out = []
        for i, start in enumerate(range(0, num, batch_size)):
            n = min(batch_size, num - start)
            chunk = {k: _pad_rows(np.asarray(v)[start:start + n], batch_size) for k, v in inputs.items()}
            images = fn(params, fs_params, scale_factor, jax.random.fold_in(rng, i), chunk)
            out.append(np.asarray(jax.device_get(images))[:n])
            if progress is not None:
                progress(n)
        return np.concatenate(out)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x [n, ...] -> [rows, ...], repeating the last row (n <= rows)."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])
