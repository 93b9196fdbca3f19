"""Shared by the stage-2 tests that train tiny conditioned models end to end: a random stage-1 checkpoint to
start from, a recorded training run, and params whose zero-initialised kernels are made random."""

import logging as std_logging
import os
import types

import jax
import numpy as np
from ml_collections import ConfigDict

from lidiff.checkpoint import Checkpointer
from lidiff.train.autoencoder import AutoencoderTrainer
from lidiff.train.autoencoder import checkpoint_meta as ae_checkpoint_meta
from lidiff.train.diffusion import train_diffusion


def write_random_first_stage(workdir: str, config: ConfigDict, resolution: int) -> str:
    """Saves a stage-1 checkpoint of ``config.autoencoder`` into ``workdir`` as stage 1 saves it: randomly
    initialised autoencoder params, every other item of the stage-1 state zero (only the init is compiled)."""
    trainer = AutoencoderTrainer(config.autoencoder, seed=0)
    rng = jax.random.PRNGKey(0)
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(trainer.init_state, rng))
    x = np.zeros((1, resolution, resolution, 3), np.float32)
    ae = jax.jit(lambda key: trainer.model.init(key, x, sample_posterior=False)["params"])(rng)
    state = state.replace(params={**state.params, "autoencoder": ae})
    checkpointer = Checkpointer(os.path.join(workdir, "autoencoder", "checkpoints"))
    checkpointer.save(1, state, ae_checkpoint_meta(config))
    checkpointer.close()
    return workdir


class _Records(std_logging.Handler):
    def __init__(self):
        super().__init__(std_logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def train_recorded(kind: str, config: ConfigDict, workdir: str) -> types.SimpleNamespace:
    """``train_diffusion`` on the locked config -> (kind, config, workdir, final state on the host, the warnings
    logged meanwhile)."""
    config.lock()
    handler = _Records()
    absl_logger = std_logging.getLogger("absl")
    absl_logger.addHandler(handler)
    try:
        state = train_diffusion(config, workdir)
    finally:
        absl_logger.removeHandler(handler)
    return types.SimpleNamespace(kind=kind, config=config, workdir=workdir, state=jax.device_get(state),
                                 warnings=handler.messages)


def randomized_kernels(params, seed: int = 0):
    """``params`` on the host with the kernels that were zero-initialised (the UNet's output conv, each resblock's
    last conv, each transformer's proj_out) drawn at random: 2 training steps leave them at about lr * steps, so
    the images would hardly depend on the conditioning. Initialised kernels all have entries far above 0.01."""
    rng = np.random.default_rng(seed)
    count = [0]

    def randomize(path, x):
        x = np.asarray(x)
        if jax.tree_util.keystr(path).endswith("['kernel']") and np.abs(x).max() < 0.01:
            count[0] += 1
            return 0.05 * rng.standard_normal(x.shape).astype(x.dtype)
        return x

    out = jax.tree_util.tree_map_with_path(randomize, jax.device_get(params))
    assert count[0] >= 2, "expected the zero-initialised output convs among the kernels"
    return out
