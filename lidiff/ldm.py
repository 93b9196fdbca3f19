"""The stage-2 model as one pure object: UNet + conditioning encoder + schedule + frozen first stage.

    ldm = LatentDiffusion(unet, conditioner, schedule, parameterization, first_stage)
    params = ldm.init_params(rng, latent_shape)                 # {"unet": ..., "cond": ... or {}}
    params = ldm.with_frozen_encoder(params, clip_params)       # a frozen text encoder's weights as "cond"
    cond = ldm.encode_condition(params, inputs, latent_hw=(h, w))  # raw inputs -> {"context" | "y" | "concat"}
    out = ldm.apply_model(params, x_t, t, cond)                 # [B, h, w, c] eps / x0 / v
    images = ldm.generate(params, first_stage_params, scale_factor, rng, num=..., latent_shape=...,
                          inputs=..., sampler="ddim", steps=50, guidance_scale=5.0)

``FirstStage`` is the frozen KL or VQ autoencoder behind one interface: ``encode`` returns a posterior
(``DiagonalGaussian``; VQ a point posterior at the pre-quantisation latent), ``decode`` takes an unscaled latent.
Nothing here reads files or configs; ``lidiff.runs`` builds these objects from a run directory.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lidiff import parallel
from lidiff.diffusion import samplers, tiling
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

    @property
    def frozen_encoder(self) -> bool:
        """Whether the conditioning encoder is pretrained and frozen (CLIP): its weights are not in the trained
        params, whose ``"cond"`` is {}; ``with_frozen_encoder`` puts them in for encoding and sampling."""
        return not getattr(self.conditioner, "trainable", True)

    def with_frozen_encoder(self, params: dict, encoder_params: Any) -> dict:
        """Trained params {"unet", "cond"} -> the params ``encode_condition`` / ``generate`` take: ``"cond"``
        replaced by the frozen encoder's weights when there is one, else ``params`` unchanged."""
        return {**params, "cond": encoder_params} if self.frozen_encoder else params

    def null_inputs(self, n: int, latent_hw: tuple[int, int] | None = None) -> dict:
        """The encoder's null input for ``n`` rows (classifier-free guidance's unconditional branch); spatial
        inputs are sized for latents of ``latent_hw``."""
        return self.conditioner.null_inputs(n, latent_hw)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be multiples of this: the UNet halves them ``len(channel_mult) - 1`` times."""
        return 2 ** (len(getattr(self.unet, "channel_mult", (1,))) - 1)

    def latent_hw(self, inputs: Mapping[str, Any]) -> tuple[int, int] | None:
        """The latent (h, w) spatial conditioning inputs imply, or None when the conditioning is not spatial.
        ValueError, naming the input, when its size does not fit the encoder or the UNet's halvings."""
        if not hasattr(self.conditioner, "latent_hw"):
            return None
        h, w = self.conditioner.latent_hw(inputs)
        m = self.latent_multiple
        if h % m or w % m:
            name = next(iter(self.conditioner.input_specs))
            size = "x".join(str(d) for d in np.shape(inputs[name])[1:3])
            scale = np.shape(inputs[name])[1] / h
            raise ValueError(f"{name} is {size}, which gives {h}x{w} latents; the UNet halves them "
                             f"{m.bit_length() - 1} times, so they must be multiples of {m}: give {name} sides "
                             f"that are multiples of {m * scale:g}")
        return h, w

    def init_params(self, rng: jax.Array, latent_shape: tuple[int, int, int]) -> dict:
        k_unet, k_cond = jax.random.split(rng)
        cond_params = self.conditioner.init(k_cond)
        hw = tuple(latent_shape[:2])
        if getattr(self.conditioner, "first_stage", None) is not None:  # the UNet's init needs the concat's shape only
            cond = {"concat": jnp.zeros((1,) + hw + (self.conditioner.concat_channels,), jnp.float32)}
        elif self.frozen_encoder:  # ... or the context's
            cond = {"context": jnp.zeros((1,) + self.conditioner.context_shape, jnp.float32)}
        else:
            cond = self.conditioner.encode(cond_params, self.conditioner.null_inputs(1, hw), latent_hw=hw)
        x = jnp.zeros((1,) + tuple(latent_shape), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        unet_params = self.unet.init(k_unet, self._unet_input(x, cond), t, context=cond.get("context"),
                                     y=cond.get("y"))["params"]
        return {"unet": unet_params, "cond": cond_params}

    def encode_condition(self, params: dict, inputs: Mapping[str, Any], *, latent_hw: tuple[int, int] | None = None,
                         first_stage_params: Any = None) -> dict:
        """Raw conditioning inputs [B, ...] -> cond pytree ({} for unconditional models).

        latent_hw: (h, w) of the latents the cond goes with (spatial encoders draw or check their ``concat`` map
        at that size); first_stage_params: the frozen autoencoder's, for encoders that encode images with it.
        """
        return self.conditioner.encode(params["cond"], inputs, latent_hw=latent_hw,
                                       first_stage_params=first_stage_params)

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
                 guidance_scale: float, mesh: Mesh, tile: int | None = None, tile_overlap: int = 16) -> Callable:
        key = (shape, sampler, steps, eta, guidance_scale, mesh, tile, tile_overlap)
        if key not in self._compiled:
            guided = self.conditional and guidance_scale != 1.0

            def run(params, fs_params, scale_factor, rng, inputs, x_T):
                encode = functools.partial(self.encode_condition, params, latent_hw=shape[1:3],
                                           first_stage_params=fs_params)
                cond = encode(inputs) if self.conditional else None
                uncond = encode(self.null_inputs(shape[0], shape[1:3])) if guided else None
                model_fn = lambda x, t, c: self.apply_model(params, x, t, c)  # noqa: E731
                decode = functools.partial(self.first_stage.decode, fs_params)
                if tile:
                    tiles = dict(tile=tile, overlap=tile_overlap, margin=tile_overlap // 4)
                    model_fn = tiling.tiled_denoiser(model_fn, **tiles)
                    decode = functools.partial(tiling.tiled_map, decode, scale=self.first_stage.downsample_factor,
                                               **tiles)
                z = samplers.sample(model_fn, self.schedule, shape, rng, sampler=sampler, num_steps=steps, eta=eta,
                                    guidance_scale=guidance_scale, cond=cond, uncond=uncond,
                                    parameterization=self.parameterization, x_T=x_T)
                images = decode(z / scale_factor)
                if hasattr(self.conditioner, "keep_known"):  # inpainting: the known pixels exactly as given
                    images = self.conditioner.keep_known(images, inputs)
                return images

            rep, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)
            self._compiled[key] = jax.jit(run, in_shardings=(rep, rep, rep, rep, split, split), out_shardings=split)
        return self._compiled[key]

    def generate(self, params: dict, fs_params: Any, scale_factor: Any, rng: jax.Array, *, num: int,
                 latent_shape: tuple[int, int, int], inputs: Mapping[str, np.ndarray] | None = None,
                 sampler: str = "ddim", steps: int | None = 50, eta: float = 0.0, guidance_scale: float = 1.0,
                 batch_size: int | None = None, progress: Callable[[int], None] | None = None,
                 mesh: Mesh | None = None, tile: int | None = None, tile_overlap: int = 16,
                 x_T: np.ndarray | None = None) -> np.ndarray:
        """Draws ``num`` images [num, h*f, w*f, 3] float32 in about [-1, 1] (host array).

        inputs: raw conditioning inputs, each [num, ...] (the encoder's ``input_specs``; required exactly when the
        model is conditional). Batches of ``batch_size`` (default: all at once) use keys ``fold_in(rng,
        batch_index)``; ``progress(n)`` is called after each. ``tile``: denoise and decode latents larger than
        ``tile`` x ``tile`` in overlapping tiles (``lidiff.diffusion.tiling``, ``tile_overlap`` latent pixels of
        overlap blended with a raised cosine), so memory stays that of one tile; the same as untiled when the
        latents fit in one tile. ``x_T``: the starting noise [num, h, w, c] float32 (scaled latent space) instead
        of drawing it, e.g. another implementation's, to reproduce its samples. Each batch is split over the
        devices of ``mesh``
        (default: every local device); ``batch_size`` is rounded up to a multiple of their number. Random draws
        do not depend on how the batch is split, so 1 and 8 devices give the same images for the same (rounded)
        batch size. With ``guidance_scale`` != 1 the unconditional branch uses the encoder's null input.
        """
        inputs = dict(inputs or {})
        check_inputs(self.conditioner, inputs, num)
        if x_T is not None and tuple(np.shape(x_T)) != (num,) + tuple(latent_shape):
            raise ValueError(f"x_T has shape {tuple(np.shape(x_T))}, expected (num, *latent_shape) = "
                             f"{(num,) + tuple(latent_shape)}")
        implied = self.latent_hw(inputs)
        if implied is not None and tuple(implied) != tuple(latent_shape[:2]):
            raise ValueError(f"the conditioning inputs imply {implied[0]}x{implied[1]} latents, but latent_shape is "
                             f"{tuple(latent_shape)}; pass latent_shape=({implied[0]}, {implied[1]}, "
                             f"{latent_shape[2]})")
        mesh = mesh if mesh is not None else parallel.make_mesh(jax.local_devices())
        devices = mesh.devices.size
        batch_size = -(-(batch_size or num) // devices) * devices
        params, fs_params, scale_factor, rng = parallel.put_replicated((params, fs_params, scale_factor, rng), mesh)
        fn = self._sampler((batch_size,) + tuple(latent_shape), sampler, steps, float(eta), float(guidance_scale),
                           mesh, tile, tile_overlap)
        split = parallel.batch_sharded(mesh)
        out = []
        for i, start in enumerate(range(0, num, batch_size)):
            n = min(batch_size, num - start)
            chunk = {k: _pad_rows(np.asarray(v)[start:start + n], batch_size) for k, v in inputs.items()}
            start_noise = None if x_T is None else _pad_rows(np.asarray(x_T, np.float32)[start:start + n], batch_size)
            if start_noise is not None:
                start_noise = parallel.put_sharded(start_noise, split)
            images = fn(params, fs_params, scale_factor, jax.random.fold_in(rng, i),
                        parallel.put_sharded(chunk, split), start_noise)
            out.append(parallel.to_host(images)[:n])
            if progress is not None:
                progress(n)
        return np.concatenate(out)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x [n, ...] -> [rows, ...], repeating the last row (n <= rows)."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])
