"""Spatial conditioning read from files, for sampling: low-res images, images with masks, segmentation maps.

Each flag of ``sample.py`` names a file or a folder (its images in name order; folders given together pair their
files by stem, ``a.jpg`` <-> ``a.png``). Every reader returns host arrays with a leading batch axis, ready for
``LatentDiffusion.generate``, and raises ``ConfigError`` naming the flag, the file and what to give instead:

    read_lowres(path)                   {"lowres": [N, h, w, 3] float32 in [-1, 1]}
    read_inpainting(image, mask)        {"masked_image": [N, H, W, 3] in [-1, 1] (unknown pixels -1),
                                         "mask": [N, H, W, 1] float32, 1 = to fill}  (mask files: white = fill,
                                         binarised at 0.5 as CompVis's scripts/inpaint.py)
    read_segmentation(path, classes)    {"segmentation": [N, H, W] int32 class ids}

All files of one call must have the same size (one batch).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

from lidiff.data.transforms import ensure_rgb_uint8, to_float
from lidiff.errors import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_files(path: str, flag: str) -> list[str]:
    """``path`` itself, or the images directly inside the folder ``path`` in name order."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ConfigError(f"{flag}={path}: no such file or folder")
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ConfigError(f"{flag}={path}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _open(path: str, flag: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag}: {path} is not an image PIL can read ({e})") from None


def _same_size(arrays: Sequence[np.ndarray], files: Sequence[str], flag: str) -> np.ndarray:
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        listed = ", ".join(f"{os.path.basename(f)} {a.shape[0]}x{a.shape[1]}" for f, a in zip(files, arrays))
        raise ConfigError(f"{flag}: the files differ in size ({listed}); sample each size in its own call")
    return np.stack(arrays)


def read_rgb(path: str, flag: str) -> tuple[list[str], np.ndarray]:
    """(files, uint8 [N, H, W, 3]) of a file or folder of images."""
    files = list_files(path, flag)
    arrays = [ensure_rgb_uint8(np.asarray(_open(f, flag).convert("RGB"))) for f in files]
    return files, _same_size(arrays, files, flag)


def read_lowres(path: str, flag: str = "--cond_image") -> dict[str, np.ndarray]:
    """Low-res images for super-resolution -> ``{"lowres": [N, h, w, 3] float32 in [-1, 1]}``."""
    _, images = read_rgb(path, flag)
    return {"lowres": to_float(images)}


def _paired(files: list[str], other: list[str], flag: str, other_flag: str) -> list[str]:
    """``other`` reordered to match ``files`` by stem (a single file on each side pairs as is)."""
    if len(files) == 1 and len(other) == 1:
        return other
    by_stem = {os.path.splitext(os.path.basename(f))[0]: f for f in other}
    missing = [os.path.basename(f) for f in files if os.path.splitext(os.path.basename(f))[0] not in by_stem]
    if missing:
        raise ConfigError(f"{other_flag}: no file named like {', '.join(missing[:5])} of {flag} (files pair by "
                          "name: a.jpg <-> a.png)")
    return [by_stem[os.path.splitext(os.path.basename(f))[0]] for f in files]


def read_mask(path: str, flag: str = "--mask") -> np.ndarray:
    """A mask file -> float32 [H, W, 1] in {0, 1}: 1 (white, >= 0.5 of full scale) = the region to fill."""
    grey = np.asarray(_open(path, flag).convert("L"), np.float32) / 255.0
    return (grey >= 0.5).astype(np.float32)[..., None]


def read_inpainting(image_path: str, mask_path: str | None, flags: tuple[str, str] = ("--cond_image", "--mask")
                    ) -> dict[str, np.ndarray]:
    """Images and their masks -> ``{"masked_image", "mask"}`` (see the module docstring)."""
    image_flag, mask_flag = flags
    if not mask_path:
        raise ConfigError(f"an inpainting model needs {mask_flag}=FILE_OR_FOLDER (white = the region to fill) "
                          f"besides {image_flag}")
    files, images = read_rgb(image_path, image_flag)
    mask_files = _paired(files, list_files(mask_path, mask_flag), image_flag, mask_flag)
    masks = [read_mask(f, mask_flag) for f in mask_files]
    for f, m, mf in zip(files, masks, mask_files):
        if m.shape[:2] != images.shape[1:3]:
            raise ConfigError(f"{mask_flag}: {mf} is {m.shape[0]}x{m.shape[1]} but its image {os.path.basename(f)} "
                              f"is {images.shape[1]}x{images.shape[2]}; give a mask of the image's size")
    mask = np.stack(masks)
    masked = np.where(mask > 0.5, -1.0, to_float(images)).astype(np.float32)
    return {"masked_image": masked, "mask": mask}


def read_class_map(path: str, flag: str) -> np.ndarray:
    """A class-id PNG (mode L, P (palette indices), I or I;16) -> int32 [H, W]."""
    image = _open(path, flag)
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise ConfigError(f"{flag}: {path} has mode {image.mode}; a segmentation map stores one class id per pixel "
                          "(a greyscale, palette or 16-bit PNG)")
    return np.asarray(image).astype(np.int32)


def read_segmentation(path: str, num_classes: int, flag: str = "--segmentation") -> dict[str, np.ndarray]:
    """Class-id maps -> ``{"segmentation": [N, H, W] int32}``, refusing ids outside [0, num_classes)."""
    files = list_files(path, flag)
    maps = [read_class_map(f, flag) for f in files]
    for f, m in zip(files, maps):
        if m.min() < 0 or m.max() >= num_classes:
            raise ConfigError(f"{flag}: {f} holds class id {int(m.max())}, outside [0, {num_classes}) of this model "
                              f"(num_classes={num_classes})")
    return {"segmentation": _same_size(maps, files, flag)}
