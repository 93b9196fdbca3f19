"""``python -m lidiff.convert --src PATH [--format compvis|diffusers] [--config configs/x.py[:arg]] [--no_ema]
[--resolution 256] [--config.<field>=<value> ...] --out DIR``

Imports a released Latent Diffusion / Stable Diffusion checkpoint (a CompVis ``.ckpt`` / ``.safetensors`` single
file, or a diffusers folder such as a ``StableDiffusionPipeline``'s) into a lidiff run directory that
``sample.py --workdir DIR`` samples from and ``train.py`` fine-tunes. The logic is in ``lidiff.convert.run_import``.
User mistakes and checkpoints that do not match print one message on stderr and exit with status 1.

Stable Diffusion::

    python -m lidiff.convert --src stable-diffusion-v1-5/ --resolution 512 --out runs/sd15      # diffusers folder
    python -m lidiff.convert --src v1-5-pruned-emaonly.safetensors --resolution 512 --out runs/sd15 \
        --config.diffusion.model.num_heads=8 --config.diffusion.conditioning.tokenizer=<CLIP tokenizer folder>
"""

from __future__ import annotations

import argparse
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lidiff.convert",
                                description="Import a released LDM checkpoint into a lidiff run directory.",
                                epilog="Any --config.<field>=<value> (e.g. --config.diffusion.model.num_head_channels"
                                       "=32) overrides a field of the written config, as in train.py.")
    p.add_argument("--src", required=True, help="CompVis .ckpt/.safetensors file, or diffusers pipeline folder "
                                                "(LDM, or Stable Diffusion 1.x / 2.x with its CLIP text encoder)")
    p.add_argument("--format", choices=("compvis", "diffusers"), default=None,
                   help="default: diffusers for a folder, compvis for a file")
    p.add_argument("--config", default=None,
                   help="configs/x.py[:arg] describing the model (default: inferred from the tensor shapes)")
    p.add_argument("--no_ema", action="store_true", help="use the raw UNet weights even when EMA ones are stored")
    p.add_argument("--resolution", type=int, default=256,
                   help="without --config: the image size of the written config (places the autoencoder's "
                        "attention levels; the default sampling size)")
    p.add_argument("--out", required=True, help="the run directory to write (must not hold checkpoints)")
    return p


def run(argv: Sequence[str] | None = None):
    """Parses ``argv`` (without the program name), imports, prints the report; returns the ``ImportReport``."""
    import sys

    from lidiff.convert.run_import import import_checkpoint, split_override_args

    rest, overrides = split_override_args(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(rest)
    report = import_checkpoint(args.src, args.out, fmt=args.format, config_file=args.config, overrides=overrides,
                               use_ema=not args.no_ema, resolution=args.resolution)
    print("\n".join(report.lines))  # the command's output
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: a ``lidiff.errors.UserError`` (bad flags, files, mismatching tensors) prints its message and
    exits with status 1."""
    from lidiff import cli

    cli.quiet_logs()
    cli.guard(lambda _: run(argv))([])


if __name__ == "__main__":
    main()
