"""``python -m lidiff.eval --samples A --reference B [--out result.json] [--num_samples N] ...``

A: an image folder, a samples ``.npz`` (``images`` uint8 [N,H,W,3]), a stats ``.npz`` (``mu``, ``sigma``), or an ADM
batch (``arr_0`` images or activations). B: the same kinds, or a dataset config (``configs/x.py[:arg]``) read
through lidiff's training data pipeline. Prints a table, writes JSON (``--out``), and with ``--save_stats`` the
samples' statistics in pytorch-fid format (without ``--reference``: only that, e.g. reference statistics of a
dataset config). User mistakes end with one message on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from lidiff.eval.errors import EvalInputError

DEFAULT_WEIGHTS = "inception_fid.safetensors"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lidiff.eval", description=__doc__.split("\n\n")[1])
    p.add_argument("--samples", default=None,
                   help="run directory | image folder | samples .npz | stats .npz | ADM .npz | dataset config")
    p.add_argument("--autoencoder", default=None,
                   help="instead of --samples: a run directory whose first stage is scored (PSNR, SSIM, LPIPS, "
                        "rFID, codebook use) on the images of --reference, a dataset config of the validation split")
    p.add_argument("--lpips_weights", default=None, help="with --autoencoder: converted LPIPS weights (optional)")
    p.add_argument("--reference", default=None,
                   help="as --samples, or a dataset config configs/x.py[:arg]; omit it to only --save_stats")
    p.add_argument("--out", default=None, help="write the result JSON here")
    p.add_argument("--num_samples", type=int, default=None, help="use at most N images of --samples")
    p.add_argument("--num_reference", type=int, default=None, help="use at most N images of --reference")
    p.add_argument("--batch_size", type=int, default=64, help="images per Inception call (over all devices)")
    p.add_argument("--inception_weights", default=os.environ.get("LIDIFF_INCEPTION_WEIGHTS", DEFAULT_WEIGHTS),
                   help="converted FID Inception (.safetensors); default $LIDIFF_INCEPTION_WEIGHTS or "
                        f"{DEFAULT_WEIGHTS}")
    p.add_argument("--allow_random_inception", action="store_true",
                   help="without a weights file, use a randomly initialised Inception (tests only; labelled)")
    p.add_argument("--save_stats", default=None, help="write the samples' mu/sigma (pytorch-fid .npz) here")
    p.add_argument("--max_pr_features", type=int, default=10_000,
                   help="features kept per side for precision/recall and KID (uniform subsample)")
    p.add_argument("--kid_subsets", type=int, default=100)
    p.add_argument("--kid_subset_size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="dataset order, subsampling, KID subsets, sampling")
    g = p.add_argument_group("sampling a run directory (--samples DIR with a diffusion/ stage)")
    g.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "plms", "dpm_solver++"])
    g.add_argument("--steps", type=int, default=200, help="sampler steps (ddpm always runs all T)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale")
    g.add_argument("--guidance_scale", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    g.add_argument("--sample_batch_size", type=int, default=16, help="images per sampler call")
    g.add_argument("--checkpoint_step", type=int, default=None, help="checkpoint to load (default: the latest)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def _variables(args):
    """(a function loading the Inception variables, where they come from, whether they are random).

    Missing or malformed weights are refused here, before any input is read; loading waits until it is needed.
    """
    from lidiff.convert.inception_weights import load_inception_variables, missing_weights_message
    from lidiff.models.inception import random_inception_variables

    if os.path.isfile(args.inception_weights):
        path = os.path.abspath(args.inception_weights)
        return lambda: load_inception_variables(path), path, False
    if args.allow_random_inception:
        return lambda: random_inception_variables(0), "random (seed 0) - --allow_random_inception", True
    raise EvalInputError(
        missing_weights_message(args.inception_weights)
        + " Point --inception_weights (or $LIDIFF_INCEPTION_WEIGHTS) at the converted file; "
        "--allow_random_inception runs with random weights for testing only."
    )


def run(argv: Sequence[str] | None = None, mesh=None) -> dict:
    """Parses ``argv`` (without the program name), scores, prints the table, writes files; returns the result."""
    from lidiff.convert.common import ConversionError
    from lidiff.eval.evaluate import Settings, evaluate, format_table
    from lidiff.eval.sources import Sampling

    args = _parser().parse_args(argv)
    for name in ("num_samples", "num_reference", "batch_size", "max_pr_features", "kid_subsets", "kid_subset_size",
                 "sample_batch_size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvalInputError(f"--{name} must be at least 1, got {value}")
    if (args.samples is None) == (args.autoencoder is None):
        raise EvalInputError("give --samples (score generated images) or --autoencoder (score a first stage)")
    variables, weights, random = _variables(args)
    if args.autoencoder is not None:
        return _run_autoencoder(args, variables, weights, random, mesh)
    settings = Settings(
        variables=variables, weights=weights, random_inception=random, num_samples=args.num_samples,
        num_reference=args.num_reference, batch_size=args.batch_size, mesh=mesh,
        max_pr_features=args.max_pr_features, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
        seed=args.seed, progress=not args.no_progress, save_stats=args.save_stats,
        sampling=Sampling(sampler=args.sampler, steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale,
                          batch_size=args.sample_batch_size, checkpoint_step=args.checkpoint_step,
                          num_samples=args.num_samples or 50_000),
    )
    try:
        result = evaluate(args.samples, args.reference, settings)
    except ConversionError as e:  # a weights file that is not the converted FID Inception
        raise EvalInputError(str(e)) from None
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    print("\n".join(format_table(result, [f"wrote {args.out}"] if args.out else [])))  # the command's output
    return result


def _run_autoencoder(args, variables, weights: str, random: bool, mesh) -> dict:
    from lidiff.eval.autoencoder import evaluate_autoencoder

    if not args.reference:
        raise EvalInputError("--autoencoder needs --reference configs/x.py: the validation images to reconstruct")
    result = evaluate_autoencoder(args.autoencoder, args.reference, num_images=args.num_reference,
                                  batch_size=args.batch_size, seed=args.seed, variables=variables(), mesh=mesh,
                                  lpips_weights=args.lpips_weights, progress=not args.no_progress)
    result.update(inception_weights=weights, random_inception=random)
    label = "[RANDOM INCEPTION - rFID not a real score] " if random else ""
    lines = [f"autoencoder {args.autoencoder} ({result['kind']}, step {result['checkpoint_step']}) on "
             f"{result['num_images']} images of {args.reference}",
             f"PSNR {result['psnr']:.3f} dB | SSIM {result['ssim']:.4f}"
             + (f" | LPIPS {result['lpips']:.4f}" if "lpips" in result else "")
             + (f" | {label}rFID {result['rfid']:.3f}" if "rfid" in result else "")]
    if "codebook" in result:
        cb = result["codebook"]
        lines.append(f"codebook: perplexity {cb['perplexity']:.2f}, usage {cb['usage']:.3f} ({cb['num_used']} codes)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        lines.append(f"wrote {args.out}")
    print("\n".join((label + line) if random and not line.startswith(label) else line for line in lines))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: user mistakes (any ``lidiff.errors.UserError``) print one paragraph on stderr and exit 1."""
    from lidiff import cli, parallel

    cli.quiet_logs()
    parallel.initialize_distributed()
    cli.guard(lambda _: run(argv))([])


if __name__ == "__main__":
    main()
