"""Per-example image transforms (numpy + PIL, host side).

Images enter as uint8 ``[H, W, 3]`` of any size and leave as float32 ``[R, R, 3]`` in ``[-1, 1]``:

    ensure_rgb_uint8 -> resize_center_crop -> (flip) -> to_float

``resize_center_crop`` is the CompVis face/ImageNet preprocessing (albumentations ``SmallestMaxSize`` followed by
``CenterCrop``); ``to_float`` is ``x / 127.5 - 1``. Nothing here touches JAX or TensorFlow.
"""

from __future__ import annotations

from typing import Union

import numpy as np
from PIL import Image

Resample = Union[str, int, Image.Resampling]

_RESAMPLE_BY_NAME = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resample_filter(resample: Resample) -> Image.Resampling:
    """PIL resampling filter from a name ('nearest', 'box', 'bilinear', 'hamming', 'bicubic', 'lanczos') or a PIL
    constant. Unknown names raise ValueError listing the choices."""
    if isinstance(resample, str):
        try:
            return _RESAMPLE_BY_NAME[resample.lower()]
        except KeyError:
            raise ValueError(
                f"Unknown resample filter {resample!r}; expected one of {sorted(_RESAMPLE_BY_NAME)}."
            ) from None
    return Image.Resampling(resample)


def ensure_rgb_uint8(image) -> np.ndarray:
    """Any decoded image as uint8 ``[H, W, 3]``.

    Accepts uint8 ``[H, W]`` or ``[H, W, 1]`` (grey, repeated to 3 channels), ``[H, W, 3]`` (returned as is) and
    ``[H, W, 4]`` (alpha dropped). Other dtypes or shapes raise ValueError naming them.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image, got dtype {image.dtype} with shape {image.shape}.")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"Expected an image of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}.")
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        return image[:, :, :3]
    return image


def resize_center_crop(image: np.ndarray, resolution: int, resample: Resample = "bicubic") -> np.ndarray:
    """Resize the smaller side to ``resolution``, then crop the centre ``resolution x resolution``.

    Args:
      image: uint8 ``[H, W, 3]``, any size.
      resolution: output side R.
      resample: PIL filter (name or constant). PIL's bicubic/bilinear/lanczos filters widen their support when
        downscaling, so they antialias; for small upscales (e.g. 8x8 digits) bicubic keeps strokes smooth.
    Returns:
      uint8 ``[R, R, 3]``. The input is returned unchanged when it already is R x R.

    The scaled size is ``round(side * R / min(H, W))`` with the smaller side exactly R (albumentations
    ``SmallestMaxSize``); the crop starts at ``((h - R) // 2, (w - R) // 2)`` (``CenterCrop``).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}.")
    image = np.asarray(image)
    h, w = image.shape[:2]
    if (h, w) == (resolution, resolution):
        return image
    if min(h, w) != resolution:
        scale = resolution / min(h, w)
        new_h = resolution if h <= w else max(resolution, int(round(h * scale)))
        new_w = resolution if w <= h else max(resolution, int(round(w * scale)))
        pil = Image.fromarray(image).resize((new_w, new_h), resample=resample_filter(resample))
        image = np.asarray(pil)
        h, w = new_h, new_w
    top = (h - resolution) // 2
    left = (w - resolution) // 2
    return image[top : top + resolution, left : left + resolution]


def hflip(image: np.ndarray) -> np.ndarray:
    """Mirror left-right: ``[H, W, C] -> [H, W, C]`` (a view)."""
    return image[:, ::-1]


def random_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror ``image`` ``[H, W, C]`` left-right with probability ``p`` drawn from ``rng``.

    The DataLoader does not call this; it draws all flip decisions of a step at once from (seed, step) so that
    they are the same whatever the process count (see ``pipeline.flip_decisions``).
    """
    return hflip(image) if rng.random() < p else image


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` in 0..255 -> float32 in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    return np.asarray(image, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x) -> np.ndarray:
    """Inverse of ``to_float``: float in ``[-1, 1]`` (numpy or jax array) -> uint8, rounded to nearest and clipped
    to 0..255 (values outside [-1, 1] saturate)."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
