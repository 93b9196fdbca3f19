"""What a run directory holds and how to load a trained model from one: the only code that knows the layout.

    <workdir>/autoencoder/checkpoints/<step>/   stage 1: params, ema_params, opt_state, ... ; meta: model, config
    <workdir>/autoencoder/metrics.jsonl, images/, events.out.tfevents.*
    <workdir>/diffusion/checkpoints/<step>/     stage 2: params, ema_params, opt_state, scalars (step,
                                                scale_factor); meta: config (the whole experiment, JSON)
    <workdir>/diffusion/metrics.jsonl, images/, latents.npz (latent cache)
    <workdir>/samples.npz, samples_grid.png     final samples, when the config asks for them

Each checkpoint item is stored separately, so ``load_latent_diffusion`` reads the EMA params, the scale factor
and the step, and never the optimizer state. The config saved with the checkpoint rebuilds the model, so
sampling and evaluation need only the directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from lidiff.checkpoint import Checkpointer
from lidiff.errors import MissingInputError

AUTOENCODER, DIFFUSION = "autoencoder", "diffusion"


def checkpoint_dir(workdir: str, stage: str) -> str:
    """``<workdir>/<stage>/checkpoints``."""
    return os.path.join(workdir, stage, "checkpoints")


def has_stage(workdir: str, stage: str) -> bool:
    """Whether ``workdir`` holds at least one complete checkpoint of ``stage``."""
    directory = checkpoint_dir(workdir, stage)
    if not os.path.isdir(directory):
        return False
    checkpointer = Checkpointer(directory, create=False)
    try:
        return checkpointer.latest_step() is not None
    finally:
        checkpointer.close()


def saved_config(workdir: str, stage: str = DIFFUSION, step: int | None = None) -> ConfigDict:
    """The experiment config saved with ``stage``'s checkpoint (default: the latest)."""
    if not has_stage(workdir, stage):
        raise MissingInputError(f"{workdir}: no {stage} checkpoint in {checkpoint_dir(workdir, stage)}")
    checkpointer = Checkpointer(checkpoint_dir(workdir, stage), create=False)
    try:
        meta = checkpointer.restore_meta(step)
    finally:
        checkpointer.close()
    return ConfigDict(json.loads(meta["config"]))


def load_autoencoder(workdir: str, step: int | None = None, use_ema: bool = True):
    """A trained first stage from ``<workdir>/autoencoder`` -> ``(FirstStage, params, step)``.

    The architecture is the one saved with the checkpoint; params are the EMA ones when the run kept an EMA and
    ``use_ema``. Only ``params``, ``ema_params`` and ``step`` are read.
    """
    from lidiff.train import builders
    from lidiff.train.first_stage import FirstStage

    if not has_stage(workdir, AUTOENCODER):
        raise MissingInputError(f"{workdir}: no autoencoder checkpoint in {checkpoint_dir(workdir, AUTOENCODER)}; "
                                "train stage 1 first (a config whose stages include 'autoencoder')")
    checkpointer = Checkpointer(checkpoint_dir(workdir, AUTOENCODER), create=False)
    try:
        items, meta, restored = checkpointer.restore_items(step=step, names=("step", "params", "ema_params"))
    finally:
        checkpointer.close()
    model_cfg = ConfigDict(meta["model"])
    params = items["ema_params"] if use_ema and items.get("ema_params") else items["params"]["autoencoder"]
    return FirstStage(model=builders.build_autoencoder(model_cfg, jnp.float32), kind=model_cfg.kind), params, restored


@dataclasses.dataclass
class LoadedLDM:
    """A trained stage-2 model ready to sample: ``trainer.ldm.generate(params, first_stage_params, scale_factor,
    ...)``. ``params`` are the EMA params (UNet + conditioning encoder), on this process's first device."""

    config: ConfigDict
    trainer: Any  # lidiff.train.diffusion.DiffusionTrainer: the modules, schedule and first stage
    params: Any
    first_stage_params: Any
    scale_factor: jax.Array
    step: int
    workdir: str

    @property
    def ldm(self):
        return self.trainer.ldm

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The latent shape at the training resolution."""
        return self.trainer.latent_shape(self.config.data.resolution)


def load_latent_diffusion(workdir: str, step: int | None = None, config: ConfigDict | None = None) -> LoadedLDM:
    """Restores what sampling needs from a run directory: EMA params, ``scale_factor``, the frozen first stage.

    config: the experiment config (default: the one saved with the checkpoint). step: a checkpoint step
    (default: the newest that restores). No optimizer is built and no optimizer state is read.
    """
    from lidiff.train.diffusion import DiffusionTrainer
    from lidiff.train.first_stage import load_first_stage

    directory = checkpoint_dir(workdir, DIFFUSION)
    if not has_stage(workdir, DIFFUSION):
        raise MissingInputError(f"--workdir={workdir}: no stage-2 (diffusion) checkpoint in {directory}; "
                                "train stage 2 first (train.py with a config whose stages include 'diffusion')")
    config = config if config is not None else saved_config(workdir, DIFFUSION, step)
    first_stage, fs_params = load_first_stage(config, workdir)
    trainer = DiffusionTrainer(config.diffusion, first_stage, config.seed)
    abstract = jax.eval_shape(
        lambda rng: trainer.init_state(rng, jnp.float32(1.0), trainer.latent_shape(config.data.resolution)),
        jax.random.PRNGKey(0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    on_device = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
    targets = {"ema_params": on_device(abstract.ema_params), "scale_factor": on_device(abstract.scale_factor),
               "step": on_device(abstract.step)}
    checkpointer = Checkpointer(directory, create=False)
    try:
        items, _, restored_step = checkpointer.restore_items(targets, step)
    finally:
        checkpointer.close()
    return LoadedLDM(config=config, trainer=trainer, params=items["ema_params"], first_stage_params=fs_params,
                     scale_factor=items["scale_factor"], step=restored_step, workdir=workdir)
