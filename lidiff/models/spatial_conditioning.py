"""Spatial conditioning encoders: inputs aligned with the image, concatenated to x_t (CompVis ``concat`` mode).

    super-resolution   {"lowres": [B, H/s, W/s, 3] float32 in [-1, 1]}          s = the SR factor
    inpainting         {"masked_image": [B, H, W, 3] in [-1, 1], "mask": [B, H, W, 1] in {0, 1}, 1 = to fill}
    semantic maps      {"segmentation": [B, H, W] int32 class ids}

H x W is the image the model is to produce; the latent is ``H/f x W/f`` for a first stage of factor f. Nothing
here fixes H and W: a convolutional UNet conditioned densely renders any size whose inputs fit, so an input twice
as large gives a sample twice as large (``latent_hw`` says which latent size an input implies, and refuses one
that does not divide).

Each encoder follows the interface of ``lidiff.models.conditioning`` (``input_specs`` with ``None`` for the free
spatial sizes, ``init``, ``encode(params, inputs, *, latent_hw, first_stage_params)``, ``null_inputs(n,
latent_hw)``) and returns ``{"concat": [B, h, w, concat_channels]}``:

- ``SuperResolutionConditioning``: the low-res image itself when it is already latent-sized (LDM-SR: x4 with an
  f4 first stage, CompVis's Identity), else resized to the latent with bicubic interpolation. Null input: zeros.
- ``InpaintingConditioning`` (CompVis ``__is_first_stage__``): the frozen first stage's encoding (posterior mode,
  unscaled) of the masked image, and the mask resized to the latent (PyTorch's nearest) and mapped to [-1, 1] as
  ``scripts/inpaint.py`` feeds it. Null input: everything unknown (mask 1, masked image -1).
  ``keep_known`` pastes the known pixels back into a decoded sample.
- ``SemanticConditioning``: the one-hot map through a ``SpatialRescaler`` (log2 f bilinear halvings, then a 1x1
  map to ``map_channels``; CompVis semantic synthesis: 182 -> 3). Null input: all class 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lidiff.models.conditioning import SpatialRescaler

Inputs = Mapping[str, Any]


def _latent_hw_from(name: str, shape: tuple[int, ...], per_latent: float) -> tuple[int, int]:
    """(h, w) of the latent an input of ``shape`` [B, H, W, ...] implies when one latent pixel spans ``per_latent``
    input pixels; ValueError naming the input and the multiple it needs otherwise."""
    h, w = int(shape[1]), int(shape[2])
    lh, lw = h / per_latent, w / per_latent
    if lh != int(lh) or lw != int(lw) or lh < 1 or lw < 1:
        step = per_latent if per_latent >= 1 else 1
        raise ValueError(f"{name} is {h}x{w}: its sides must be multiples of {step:g} for this model "
                         f"({per_latent:g} {name} pixels per latent pixel)")
    return int(lh), int(lw)


@dataclasses.dataclass(frozen=True)
class SuperResolutionConditioning:
    """Low-res image -> concat at the latent's size.

    factor: the SR factor s (high-res side / low-res side). latent_factor: the first stage's f.
    """

    factor: int
    latent_factor: int
    channels: int = 3
    kind = "superres"
    mode = "concat"

    @property
    def concat_channels(self) -> int:
        return self.channels

    @property
    def input_specs(self) -> dict:
        return {"lowres": ((None, None, self.channels), np.float32)}

    def latent_hw(self, inputs: Inputs) -> tuple[int, int]:
        """The latent (h, w) a low-res input implies: its size times s / f."""
        return _latent_hw_from("lowres", np.shape(inputs["lowres"]), self.latent_factor / self.factor)

    def init(self, rng: jax.Array) -> dict:
        return {}

    def encode(self, params: Any, inputs: Inputs, *, latent_hw: tuple[int, int] | None = None,
               first_stage_params: Any = None) -> dict:
        x = jnp.asarray(inputs["lowres"], jnp.float32)
        hw = tuple(latent_hw) if latent_hw is not None else self.latent_hw(inputs)
        if x.shape[1:3] != hw:
            x = jax.image.resize(x, (x.shape[0],) + hw + (x.shape[3],), method="bicubic")
        return {"concat": x}

    def null_inputs(self, n: int, latent_hw: tuple[int, int] | None = None) -> dict:
        h, w = _input_hw(latent_hw, self.latent_factor / self.factor, "super-resolution")
        return {"lowres": jnp.zeros((n, h, w, self.channels), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class InpaintingConditioning:
    """Masked image + mask -> [first-stage encoding of the masked image, mask at the latent size in [-1, 1]].

    first_stage: the frozen autoencoder (``lidiff.ldm.FirstStage``: ``encode(params, x)`` -> posterior with
    ``mode()``, ``latent_channels``, ``downsample_factor``); its params come as ``first_stage_params``.
    """

    first_stage: Any
    kind = "inpainting"
    mode = "concat"

    @property
    def latent_factor(self) -> int:
        return self.first_stage.downsample_factor

    @property
    def concat_channels(self) -> int:
        return self.first_stage.latent_channels + 1

    @property
    def input_specs(self) -> dict:
        return {"masked_image": ((None, None, 3), np.float32), "mask": ((None, None, 1), np.float32)}

    def latent_hw(self, inputs: Inputs) -> tuple[int, int]:
        hw = _latent_hw_from("masked_image", np.shape(inputs["masked_image"]), self.latent_factor)
        if tuple(np.shape(inputs["mask"])[1:3]) != tuple(np.shape(inputs["masked_image"])[1:3]):
            raise ValueError(f"mask is {'x'.join(map(str, np.shape(inputs['mask'])[1:3]))} but the image is "
                             f"{'x'.join(map(str, np.shape(inputs['masked_image'])[1:3]))}: give a mask of the "
                             "image's size")
        return hw

    def init(self, rng: jax.Array) -> dict:
        return {}

    def encode(self, params: Any, inputs: Inputs, *, latent_hw: tuple[int, int] | None = None,
               first_stage_params: Any = None) -> dict:
        if first_stage_params is None:
            raise ValueError("inpainting conditioning encodes the masked image with the first stage: pass "
                             "first_stage_params")
        masked = jnp.asarray(inputs["masked_image"], jnp.float32)
        z = self.first_stage.encode(first_stage_params, masked).mode()  # [B, h, w, c], unscaled (as CompVis)
        mask = _torch_nearest(jnp.asarray(inputs["mask"], jnp.float32), z.shape[1:3])
        return {"concat": jnp.concatenate([z.astype(jnp.float32), 2.0 * mask - 1.0], axis=-1)}

    def null_inputs(self, n: int, latent_hw: tuple[int, int] | None = None) -> dict:
        h, w = _input_hw(latent_hw, self.latent_factor, "inpainting")
        return {"masked_image": -jnp.ones((n, h, w, 3), jnp.float32), "mask": jnp.ones((n, h, w, 1), jnp.float32)}

    @staticmethod
    def keep_known(images: jax.Array, inputs: Inputs) -> jax.Array:
        """Decoded samples [B, H, W, 3] with the known pixels (mask 0) replaced by the given image's, exactly."""
        mask = jnp.asarray(inputs["mask"], images.dtype)
        return jnp.where(mask > 0.5, images, jnp.asarray(inputs["masked_image"], images.dtype))


@dataclasses.dataclass(frozen=True)
class SemanticConditioning:
    """Segmentation map [B, H, W] int -> one-hot [B, H, W, num_classes] -> ``SpatialRescaler`` -> concat.

    latent_factor: the first stage's f, a power of 2 (the rescaler halves log2 f times). map_channels: width of the
    rescaler's trained 1x1 map, or 0 for none (the averaged one-hot map is concatenated as it is).
    """

    num_classes: int
    latent_factor: int
    map_channels: int = 0
    dtype: Any = jnp.float32
    kind = "semantic"
    mode = "concat"

    def __post_init__(self):
        if self.latent_factor < 1 or self.latent_factor & (self.latent_factor - 1):
            raise ValueError(f"semantic conditioning needs a power-of-2 first-stage factor, got {self.latent_factor}")
        if self.num_classes <= 0:
            raise ValueError(f"semantic conditioning needs num_classes > 0, got {self.num_classes}")

    @property
    def rescaler(self) -> SpatialRescaler:
        return SpatialRescaler(n_stages=int(math.log2(self.latent_factor)), method="bilinear",
                               out_channels=self.map_channels or None, dtype=self.dtype)

    @property
    def concat_channels(self) -> int:
        return self.map_channels or self.num_classes

    @property
    def input_specs(self) -> dict:
        return {"segmentation": ((None, None), np.int32)}

    def latent_hw(self, inputs: Inputs) -> tuple[int, int]:
        return _latent_hw_from("segmentation", np.shape(inputs["segmentation"]), self.latent_factor)

    def one_hot(self, segmentation: jax.Array) -> jax.Array:
        return jax.nn.one_hot(jnp.asarray(segmentation, jnp.int32), self.num_classes, dtype=jnp.float32)

    def init(self, rng: jax.Array) -> dict:
        f = self.latent_factor
        params = self.rescaler.init(rng, jnp.zeros((1, f, f, self.num_classes), jnp.float32))
        return params.get("params", {})

    def encode(self, params: Any, inputs: Inputs, *, latent_hw: tuple[int, int] | None = None,
               first_stage_params: Any = None) -> dict:
        variables = {"params": params} if params else {}
        return {"concat": self.rescaler.apply(variables, self.one_hot(inputs["segmentation"]))}

    def null_inputs(self, n: int, latent_hw: tuple[int, int] | None = None) -> dict:
        h, w = _input_hw(latent_hw, self.latent_factor, "semantic")
        return {"segmentation": jnp.zeros((n, h, w), jnp.int32)}


def _torch_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """x [B, H, W, C] resized to ``size`` as PyTorch's ``F.interpolate(mode="nearest")`` (CompVis resizes the mask
    this way): output pixel i reads input pixel ``floor(i * H / h)``, the top-left of its block for whole factors."""
    rows = (np.arange(size[0]) * x.shape[1]) // size[0]
    cols = (np.arange(size[1]) * x.shape[2]) // size[1]
    return x[:, rows][:, :, cols]


def _input_hw(latent_hw: tuple[int, int] | None, per_latent: float, what: str) -> tuple[int, int]:
    if latent_hw is None:
        raise ValueError(f"the null input of {what} conditioning is an image: pass latent_hw for its size")
    return int(round(latent_hw[0] * per_latent)), int(round(latent_hw[1] * per_latent))
