"""FID Inception weights: convert pytorch-fid's ``pt_inception-2015-12-05-*.pth`` into safetensors, and load it.

The source file is the 2015-12-05 TensorFlow Inception graph as released by pytorch-fid
(``pt_inception-2015-12-05-6726825d.pth`` from the pytorch-fid GitHub releases; torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` holds the same tensors). lidiff never downloads it: fetch it once
by hand, then convert (needs torch only to read the pickle, loaded with ``weights_only=True``)::

    python -m lidiff.convert.inception_weights --pth pt_inception-2015-12-05-6726825d.pth \\
        --out inception_fid.safetensors

Key mapping (strict, one to one; ``*.num_batches_tracked`` counters are dropped):

=====================================  ============================================  ============
torch key                              lidiff variable                               conversion
=====================================  ============================================  ============
``{block}.conv.weight`` [O, I, kh, kw]  ``params/{block}/conv/kernel`` [kh, kw, I, O]  transpose
``{block}.bn.weight`` / ``.bias``       ``params/{block}/bn/scale`` / ``bias``         copy
``{block}.bn.running_mean`` / ``_var``  ``batch_stats/{block}/bn/mean`` / ``var``      copy
``fc.weight`` [1008, 2048] / ``.bias``  ``params/fc/kernel`` [2048, 1008] / ``bias``   transpose
=====================================  ============================================  ============

``{block}`` is the dotted torch module path (``Mixed_6b.branch7x7_2``), one Flax level per dot. The output file
stores the variables under ``/``-joined paths; ``load_inception_variables`` reads it with the numpy safetensors
API (no pickle, no torch).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Sequence

import numpy as np

from lidiff.convert.common import (ConversionError, convert_state_dict, flatten, load_checked_safetensors,
                                   torch_state_dict)
from lidiff.models.inception import inception_variable_shapes

FORMAT = "lidiff-inception-fid-2015-12-05"
SOURCE_NAME = "pt_inception-2015-12-05-6726825d.pth"

_STATS = {"running_mean": "mean", "running_var": "var"}


def conversion_command(out: str = "inception_fid.safetensors", pth: str = SOURCE_NAME) -> str:
    """The exact shell command that writes ``out``."""
    return f"python -m lidiff.convert.inception_weights --pth {pth} --out {out}"


_SOURCES = (
    f"{SOURCE_NAME} is pytorch-fid's port of the 2015-12-05 TensorFlow FID Inception (a release asset of "
    "github.com/mseitzer/pytorch-fid, the file pytorch_fid downloads on first use); it must be fetched by hand. "
    "Converting needs torch (pip install torch==2.13.0)."
)


def missing_weights_message(path: str) -> str:
    """What to tell a user whose Inception weights file does not exist."""
    return (
        f"FID Inception weights not found at {path!r}. Create them once with\n    {conversion_command(path)}\n"
        f"{_SOURCES}"
    )


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """``'Mixed_5b.branch1x1.bn.running_mean'`` -> ``('batch_stats', 'Mixed_5b', 'branch1x1', 'bn', 'mean')``."""
    parts = key.split(".")
    if parts[-1] in _STATS:
        return ("batch_stats", *parts[:-1], _STATS[parts[-1]])
    return ("params", *parts)


def path_to_torch_key(path: Sequence[str]) -> str:
    """Inverse of ``torch_key_to_path`` on lidiff variable paths (``params/fc/kernel`` -> ``fc.weight``)."""
    collection, *rest = path
    leaf = rest[-1]
    if collection == "batch_stats":
        leaf = {v: k for k, v in _STATS.items()}[leaf]
    elif leaf in ("kernel", "scale"):
        leaf = "weight"
    return ".".join([*rest[:-1], leaf])


def inception_variables_from_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """pytorch-fid Inception state dict -> lidiff ``InceptionV3`` variables (nested dict of float32 numpy).

    Raises:
      ConversionError: naming every missing, unexpected or wrongly shaped tensor.
    """
    return convert_state_dict(
        state_dict, inception_variable_shapes(), key_to_path=torch_key_to_path, ignore=(r"\.num_batches_tracked$",)
    )


def save_inception_variables(
    variables: Mapping[str, Any], path: str, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes Inception variables as safetensors with ``/``-joined keys (``params/Mixed_5b/branch1x1/conv/kernel``)."""
    from safetensors.numpy import save_file

    tensors = {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten(variables).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"format": FORMAT, **dict(metadata or {})})


def load_inception_variables(path: str) -> dict:
    """Reads variables written by this module's converter: ``{"params": ..., "batch_stats": ...}`` float32 numpy.

    Raises:
      FileNotFoundError: if ``path`` does not exist; the message gives the conversion command and the source.
      ConversionError: if any expected tensor is missing, unexpected or has the wrong shape.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_weights_message(path))
    return load_checked_safetensors(path, inception_variable_shapes(), "FID Inception variables", conversion_command(path))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; ``argv`` excludes the program name (``None``: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(
        prog="python -m lidiff.convert.inception_weights",
        description="Convert pytorch-fid's FID Inception weights (.pth) into a lidiff safetensors file.",
    )
    parser.add_argument("--pth", required=True, help=f"pytorch-fid weights, e.g. {SOURCE_NAME}")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    args = parser.parse_args(argv)
    try:
        variables = inception_variables_from_state_dict(torch_state_dict(args.pth, _SOURCES))
    except ConversionError as e:
        raise SystemExit(f"{args.pth} is not pytorch-fid's FID Inception:\n{e}") from None
    save_inception_variables(variables, args.out, {"source": os.path.basename(args.pth)})
    load_inception_variables(args.out)  # read back: fails loudly if the file is not what the model expects
    n = sum(int(np.prod(v.shape)) for v in flatten(variables).values())
    print(f"wrote {n:,} FID Inception values to {args.out}")  # command-line output of this entry point


if __name__ == "__main__":
    main()
