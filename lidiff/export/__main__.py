"""``python -m lidiff.export --workdir DIR --out FOLDER [--no_ema]``

Writes the run in ``--workdir`` as a diffusers folder (``unet/``, ``vae/`` or ``vqvae/``, ``scheduler/``, for
frozen-CLIP text models ``text_encoder/`` and ``tokenizer/``, and ``model_index.json`` when a diffusers pipeline
reproduces the run's sampling) that diffusers loads with ``from_pretrained``. The logic is in
``lidiff.export.run_export``. User mistakes and models diffusers cannot express print one message on stderr and
exit with status 1.
"""

from __future__ import annotations

import argparse
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lidiff.export",
                                description="Export a lidiff run directory as a diffusers-format folder.")
    p.add_argument("--workdir", required=True, help="the lidiff run directory (with a stage-2 checkpoint)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--use_ema", dest="use_ema", action="store_true", default=True,
                     help="export the EMA weights of the UNet, as sampling uses them (default)")
    ema.add_argument("--no_ema", dest="use_ema", action="store_false", help="export the raw UNet weights")
    return p


def run(argv: Sequence[str] | None = None):
    """Parses ``argv`` (without the program name), exports, prints the report; returns the ``ExportReport``."""
    from lidiff.export.run_export import export_run

    args = _parser().parse_args(argv)
    report = export_run(args.workdir, args.out, use_ema=args.use_ema)
    print("\n".join(report.lines))  # the command's output
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: a ``lidiff.errors.UserError`` (a missing run or folder, an existing --out, a model diffusers
    cannot express) prints its message and exits with status 1."""
    from lidiff import cli

    cli.quiet_logs()
    cli.guard(lambda _: run(argv))([])


if __name__ == "__main__":
    main()
