"""What a run directory holds and how to load a trained model from one: the only code that knows the layout.

    <workdir>/autoencoder/checkpoints/<step>/   stage 1: params, ema_params, opt_state, ... ; meta: model, config
    <workdir>/autoencoder/metrics.jsonl, images/, events.out.tfevents.*
    <workdir>/diffusion/checkpoints/<step>/     stage 2: params, ema_params, opt_state, scalars (step,
                                                scale_factor); meta: config (the whole experiment, JSON)
    <workdir>/diffusion/metrics.jsonl, images/, latents.npz (latent cache)
    <workdir>/diffusion/tokenizer/              text models: the tokenizer the model was trained with
    <workdir>/diffusion/text_encoder/           frozen CLIP text encoders: config.json + model.safetensors
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
from absl import logging
from ml_collections import ConfigDict

from lidiff.checkpoint import Checkpointer
from lidiff.errors import MissingInputError

AUTOENCODER, DIFFUSION = "autoencoder", "diffusion"


def checkpoint_dir(workdir: str, stage: str) -> str:
    """``<workdir>/<stage>/checkpoints``."""
    return os.path.join(workdir, stage, "checkpoints")


def tokenizer_dir(workdir: str) -> str:
    """``<workdir>/diffusion/tokenizer``: a text model's tokenizer, kept with its run."""
    return os.path.join(workdir, DIFFUSION, "tokenizer")


def text_encoder_dir(workdir: str) -> str:
    """``<workdir>/diffusion/text_encoder``: a frozen CLIP text encoder (a Hugging Face ``CLIPTextModel`` folder)."""
    return os.path.join(workdir, DIFFUSION, "text_encoder")


def latent_cache_path(workdir: str) -> str:
    """``<workdir>/diffusion/latents.npz``: the default latent cache."""
    return os.path.join(workdir, DIFFUSION, "latents.npz")


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


def _restore_autoencoder(directory: str, step: int | None, use_ema: bool):
    from lidiff.ldm import FirstStage
    from lidiff.train import builders

    checkpointer = Checkpointer(directory, create=False)
    try:
        items, meta, restored = checkpointer.restore_items(step=step, names=("step", "params", "ema_params"))
    finally:
        checkpointer.close()
    model_cfg = ConfigDict(meta["model"])
    ema = use_ema and bool(items.get("ema_params"))
    params = items["ema_params"] if ema else items["params"]["autoencoder"]
    first_stage = FirstStage(model=builders.build_autoencoder(model_cfg, jnp.float32), kind=model_cfg.kind)
    logging.info("first stage: %s autoencoder from %s (step %d, %s params)", model_cfg.kind, directory, restored,
                 "EMA" if ema else "raw")
    return first_stage, params, restored


def load_autoencoder(workdir: str, step: int | None = None, use_ema: bool = True):
    """A trained first stage from ``<workdir>/autoencoder`` -> ``(FirstStage, params, step)``.

    The architecture is the one saved with the checkpoint; params are the EMA ones when the run kept an EMA and
    ``use_ema``. Only ``params``, ``ema_params`` and ``step`` are read.
    """
    if not has_stage(workdir, AUTOENCODER):
        raise MissingInputError(f"{workdir}: no autoencoder checkpoint in {checkpoint_dir(workdir, AUTOENCODER)}; "
                                "train stage 1 first (a config whose stages include 'autoencoder')")
    return _restore_autoencoder(checkpoint_dir(workdir, AUTOENCODER), step, use_ema)


def load_first_stage(config: ConfigDict, workdir: str):
    """The frozen autoencoder named by ``config.diffusion.first_stage`` -> ``(FirstStage, params on host)``.

    It lives in ``first_stage.workdir`` (default: ``workdir`` itself). The architecture comes from the checkpoint,
    so a stage-2 config cannot silently pair a checkpoint with the wrong model.
    """
    fs = config.diffusion.first_stage
    root = fs.workdir or workdir
    if not has_stage(root, AUTOENCODER):
        raise MissingInputError(
            f"no autoencoder checkpoint in {checkpoint_dir(root, AUTOENCODER)}. Train stage 1 first "
            "(config.stages=('autoencoder', 'diffusion') or configs/autoencoder_*.py with the same --workdir), or "
            "point --config.diffusion.first_stage.workdir at a stage-1 workdir."
        )
    first_stage, params, _ = _restore_autoencoder(checkpoint_dir(root, AUTOENCODER), None, fs.use_ema)
    return first_stage, params


def load_tokenizer(workdir: str, config: ConfigDict):
    """A text model's tokenizer: the run directory's copy, else ``conditioning.tokenizer``; None otherwise."""
    cond = config.diffusion.conditioning
    if cond.kind != "text":
        return None
    from lidiff.data.text import load_clip_tokenizer, load_tokenizer as load_bert_tokenizer

    load = load_clip_tokenizer if cond.get("encoder", "transformer") == "clip" else load_bert_tokenizer
    if os.path.isdir(tokenizer_dir(workdir)):
        return load(tokenizer_dir(workdir))
    if config.diffusion.conditioning.tokenizer:
        return load(config.diffusion.conditioning.tokenizer)
    raise MissingInputError(f"{workdir}: this text model's tokenizer is missing ({tokenizer_dir(workdir)} does not "
                            "exist); copy the tokenizer it was trained with there, or give --config with "
                            "diffusion.conditioning.tokenizer")


def load_text_encoder(workdir: str, config: ConfigDict):
    """A frozen CLIP text encoder ``(module, params)`` from ``text_encoder_dir(workdir)``, else from
    ``conditioning.text_encoder``; None when the model has none."""
    cond = config.diffusion.conditioning
    if cond.kind != "text" or cond.get("encoder", "transformer") != "clip":
        return None
    from lidiff.convert.clip import load_clip_text_encoder

    folder = text_encoder_dir(workdir) if os.path.isdir(text_encoder_dir(workdir)) else cond.text_encoder
    if not folder:
        raise MissingInputError(f"{workdir}: this model's CLIP text encoder is missing ({text_encoder_dir(workdir)} "
                                "does not exist); copy the CLIPTextModel folder it was trained with there, or give "
                                "--config with diffusion.conditioning.text_encoder")
    return load_clip_text_encoder(folder, attention_kernel=cond.attention_kernel)


@dataclasses.dataclass
class LoadedLDM:
    """A trained stage-2 model ready to sample: ``ldm.generate(params, first_stage_params, scale_factor, ...)``.
    ``params`` are the EMA params (UNet + conditioning encoder; a frozen text encoder's pretrained weights as
    ``"cond"``), on this process's first device."""

    config: ConfigDict
    trainer: Any  # lidiff.train.diffusion.DiffusionTrainer: the model, its tokenizer, the first stage
    params: Any
    first_stage_params: Any
    scale_factor: jax.Array
    step: int
    workdir: str

    @property
    def ldm(self):
        return self.trainer.ldm

    @property
    def tokenizer(self):
        return self.trainer.tokenizer

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The latent shape at the training resolution."""
        return self.trainer.latent_shape(self.config.data.resolution)


def load_latent_diffusion(workdir: str, step: int | None = None, config: ConfigDict | None = None) -> LoadedLDM:
    """Restores what sampling needs from a run directory: EMA params, ``scale_factor``, the frozen first stage,
    and a text model's tokenizer (and frozen CLIP text encoder).

    config: the experiment config (default: the one saved with the checkpoint). step: a checkpoint step
    (default: the newest that restores). No optimizer state is read.
    """
    from lidiff.train.diffusion import DiffusionTrainer

    directory = checkpoint_dir(workdir, DIFFUSION)
    if not has_stage(workdir, DIFFUSION):
        raise MissingInputError(f"--workdir={workdir}: no stage-2 (diffusion) checkpoint in {directory}; "
                                "train stage 2 first (train.py with a config whose stages include 'diffusion')")
    config = config if config is not None else saved_config(workdir, DIFFUSION, step)
    first_stage, fs_params = load_first_stage(config, workdir)
    trainer = DiffusionTrainer(config.diffusion, first_stage, config.seed, load_tokenizer(workdir, config),
                               load_text_encoder(workdir, config))
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
    params = trainer.sampling_params(items["ema_params"])
    return LoadedLDM(config=config, trainer=trainer, params=params, first_stage_params=fs_params,
                     scale_factor=items["scale_factor"], step=restored_step, workdir=workdir)
