"""In-training FID: every ``config.diffusion.eval.every`` steps, FID of EMA samples against reference statistics.

Off by default (``every = 0``). Its inputs are checked when training starts, before anything compiles: the
reference statistics (a pytorch-fid ``.npz``, e.g. written by ``python -m lidiff.eval --samples configs/x.py
--save_stats ref.npz``, through the same data pipeline as training) and the converted FID Inception weights.
Each evaluation logs ``eval/fid``, ``eval/num_samples`` and its own cost ``eval/seconds`` with the scalars (and
so in ``metrics.jsonl``); with ``allow_random_inception`` (tests only) it logs ``eval/fid_random_inception``
instead, so a number from an untrained network is never mistaken for an FID.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from lidiff.errors import ConfigError, MissingInputError


def make_fid_evaluator(eval_cfg: ConfigDict, generate: Callable[[Any, int, int], np.ndarray]
                       ) -> Callable[[Any, int], dict[str, float]] | None:
    """``evaluate(state, step) -> scalars`` from ``config.diffusion.eval``, or None when it is off.

    generate: ``(state, num, seed) -> uint8 images [num, H, W, 3]`` drawn with the state's EMA params.
    """
    if eval_cfg.every <= 0:
        return None
    from lidiff.convert.inception_weights import load_inception_variables, missing_weights_message
    from lidiff.eval.features import fid_of_images
    from lidiff.metrics.fid import load_stats
    from lidiff.models.inception import random_inception_variables

    if eval_cfg.num_samples < 2:
        raise ConfigError(f"config.diffusion.eval.num_samples={eval_cfg.num_samples}: FID needs at least 2 samples")
    if not eval_cfg.reference_stats or not os.path.isfile(eval_cfg.reference_stats):
        raise MissingInputError(
            f"config.diffusion.eval.reference_stats={eval_cfg.reference_stats!r}: no such file. Write the training "
            "data's statistics once with: python -m lidiff.eval --samples configs/<this config>.py "
            "--save_stats ref_stats.npz (or use a pytorch-fid .npz), or set config.diffusion.eval.every=0."
        )
    try:
        reference = load_stats(eval_cfg.reference_stats)
    except ValueError as e:
        raise ConfigError(f"config.diffusion.eval.reference_stats: {e}") from None
    random_inception = not eval_cfg.inception_weights and eval_cfg.allow_random_inception
    if random_inception:
        variables = random_inception_variables(0)
        logging.warning("in-training FID uses a RANDOM Inception (config.diffusion.eval.allow_random_inception): "
                        "its numbers only test the plumbing and are logged as eval/fid_random_inception")
    elif not os.path.isfile(eval_cfg.inception_weights):
        raise MissingInputError(f"config.diffusion.eval.inception_weights: "
                                f"{missing_weights_message(eval_cfg.inception_weights or 'inception_fid.safetensors')}")
    else:
        variables = load_inception_variables(eval_cfg.inception_weights)
    if eval_cfg.num_samples < 2048:
        logging.warning("in-training FID on %d samples is biased upwards (use >= 2048, 50k for papers); compare "
                        "it only with itself", eval_cfg.num_samples)
    name = "eval/fid_random_inception" if random_inception else "eval/fid"

    def evaluate(state: Any, step: int) -> dict[str, float]:
        start = time.perf_counter()
        images = generate(state, eval_cfg.num_samples, step)
        fid = fid_of_images(images, reference, variables, batch_size=eval_cfg.batch_size)
        seconds = time.perf_counter() - start
        logging.info("step %d: %s = %.4g on %d EMA samples (%.1f s)", step, name, fid, len(images), seconds)
        return {name: float(fid), "eval/num_samples": float(len(images)), "eval/seconds": seconds}

    return evaluate


def generate_for_eval(ldm: Any, fs_params: Any, latent_shape: tuple[int, int, int], eval_cfg: ConfigDict,
                      inputs: Callable[[int], dict], mesh: Any = None,
                      encoder_params: Any = None) -> Callable[[Any, int, int], np.ndarray]:
    """``(state, num, seed) -> uint8 images``: EMA samples with the eval section's sampler, conditioned on
    ``inputs(num)`` (classes round-robin, the configured prompts or layouts), split over ``mesh`` (default: this
    process's devices). encoder_params: a frozen text encoder's weights (``ldm.with_frozen_encoder``)."""
    from lidiff.data.transforms import to_uint8

    def generate(state: Any, num: int, seed: int) -> np.ndarray:
        x = ldm.generate(ldm.with_frozen_encoder(state.ema_params, encoder_params), fs_params, state.scale_factor, jax.random.PRNGKey(seed),
                         num=num, latent_shape=latent_shape, inputs=inputs(num), sampler=eval_cfg.sampler,
                         steps=None if eval_cfg.sampler == "ddpm" else eval_cfg.steps, eta=eval_cfg.eta,
                         guidance_scale=eval_cfg.guidance_scale, batch_size=min(num, eval_cfg.batch_size),
                         mesh=mesh)
        return to_uint8(x)

    return generate
