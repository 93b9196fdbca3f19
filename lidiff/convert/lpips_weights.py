"""LPIPS weights: convert torchvision VGG16 + LPIPS v0.1 heads into one safetensors file, and load it.

Two source files are needed (neither can be downloaded from this code; fetch them once by hand):

- ``vgg16-397923af.pth``: torchvision's ImageNet VGG16 weights
  (``https://download.pytorch.org/models/vgg16-397923af.pth``, what ``torchvision.models.vgg16(pretrained=True)``
  downloads). Keys ``features.{idx}.weight`` [O, I, 3, 3] and ``features.{idx}.bias`` [O]; ``classifier.*`` is
  dropped.
- ``vgg.pth``: the LPIPS v0.1 linear heads, keys ``lin{k}.model.1.weight`` [1, C_k, 1, 1], from
  richzhang/PerceptualSimilarity (``lpips/weights/v0.1/vgg.pth``) or the identical taming-transformers release
  (``vgg_lpips``, md5 d507d7349b931f0638a25a48a722f98a). ``scaling_layer.*`` buffers, if present, are dropped.

Convert (needs torch only to read the ``.pth`` pickles)::

    python -m lidiff.convert.lpips_weights --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg16.safetensors

The output holds the lidiff ``LPIPS`` params, already NHWC, under ``/``-joined paths (``vgg/features_0/kernel``,
``lin0/kernel``, ...); ``load_lpips_params`` reads it back with the numpy safetensors API (no pickle, no torch).
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from lidiff.convert.common import (ConversionError, convert_state_dict, flatten, load_checked_safetensors,
                                   to_numpy_state_dict, torch_state_dict)
from lidiff.models.lpips import lpips_param_shapes

FORMAT = "lidiff-lpips-vgg16-v0.1"

_VGG_KEY = re.compile(r"^features\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin([0-4])\.model\.1\.weight$")


def conversion_command(out: str = "lpips_vgg16.safetensors") -> str:
    """The exact shell command that writes ``out``."""
    return f"python -m lidiff.convert.lpips_weights --vgg vgg16-397923af.pth --lin vgg.pth --out {out}"


_SOURCES = (
    "vgg16-397923af.pth is torchvision's ImageNet VGG16 weights "
    "(https://download.pytorch.org/models/vgg16-397923af.pth); vgg.pth is the LPIPS v0.1 linear layers from the "
    "richzhang/PerceptualSimilarity repository (lpips/weights/v0.1/vgg.pth) or the taming-transformers release "
    "(vgg_lpips). Both must be fetched by hand; converting needs torch (pip install torch==2.13.0)."
)


def _missing_file_message(path: str) -> str:
    return f"LPIPS weights not found at {path!r}. Create them once with\n    {conversion_command(path)}\n{_SOURCES}"


def lpips_params_from_state_dicts(vgg_state_dict: Mapping[str, Any], lin_state_dict: Mapping[str, Any]) -> dict:
    """Torchvision VGG16 + LPIPS v0.1 head state dicts -> lidiff ``LPIPS`` params (nested dict, float32 numpy).

    Args:
      vgg_state_dict: ``features.{idx}.weight`` [O, I, 3, 3] / ``.bias`` [O]; ``classifier.*`` is ignored.
      lin_state_dict: ``lin{k}.model.1.weight`` [1, C_k, 1, 1] for k = 0..4; ``scaling_layer.*`` is ignored.

    Raises:
      ConversionError: naming every missing, unexpected or wrongly shaped tensor.
    """
    merged: dict[str, Any] = {}
    unexpected = []
    for key, value in to_numpy_state_dict(vgg_state_dict).items():
        if key.startswith("classifier."):
            continue
        if _VGG_KEY.match(key):
            merged[f"vgg.{key}"] = value
        else:
            unexpected.append(f"vgg file: {key}")
    for key, value in to_numpy_state_dict(lin_state_dict).items():
        if key.startswith("scaling_layer."):
            continue
        m = _LIN_KEY.match(key)
        if m:
            merged[f"lin{m.group(1)}.weight"] = value
        else:
            unexpected.append(f"lin file: {key}")
    if unexpected:
        raise ConversionError("unexpected keys in the LPIPS sources: " + ", ".join(sorted(unexpected)))
    return convert_state_dict(merged, lpips_param_shapes())


def save_lpips_params(params: Mapping[str, Any], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes LPIPS params as safetensors with ``/``-joined keys (``vgg/features_0/kernel``)."""
    from safetensors.numpy import save_file

    tensors = {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten(params).items()}
    meta = {"format": FORMAT, **dict(metadata or {})}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, path, metadata=meta)


def load_lpips_params(path: str) -> dict:
    """Reads LPIPS params written by this module's converter.

    Returns:
      the nested params dict of float32 numpy arrays for ``LPIPS().apply({'params': params}, x, y)``.

    Raises:
      FileNotFoundError: if ``path`` does not exist; the message gives the conversion command and the sources.
      ConversionError: if any expected tensor is missing, unexpected or has the wrong shape.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_file_message(path))
    return load_checked_safetensors(path, lpips_param_shapes(), "LPIPS VGG16 params", conversion_command(path))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; ``argv`` excludes the program name (``None``: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        prog="python -m lidiff.convert.lpips_weights",
        description="Convert torchvision VGG16 + LPIPS v0.1 heads into one lidiff safetensors file.",
    )
    parser.add_argument("--vgg", required=True, help="torchvision vgg16-397923af.pth")
    parser.add_argument("--lin", required=True, help="LPIPS v0.1 vgg.pth (richzhang or taming release)")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    args = parser.parse_args(argv)
    vgg = torch_state_dict(args.vgg, _SOURCES)
    lin = torch_state_dict(args.lin, _SOURCES)
    params = lpips_params_from_state_dicts(vgg, lin)
    save_lpips_params(
        params, args.out, {"vgg_source": os.path.basename(args.vgg), "lin_source": os.path.basename(args.lin)}
    )
    load_lpips_params(args.out)  # read back: fails loudly if the file is not what the model expects
    n = sum(int(np.prod(v.shape)) for v in flatten(params).values())
    print(f"wrote {n:,} LPIPS parameters to {args.out}")  # command-line output of this entry point


if __name__ == "__main__":
    main()
