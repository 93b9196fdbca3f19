"""Stage 2: train the latent diffusion UNet on latents of the frozen first stage.

Per step (one jitted, sharded function): latents = first_stage(x) * scale_factor (KL: a posterior sample;
VQ: the pre-quantisation latent; or read from the latent cache), class labels replaced by the null label with
probability ``p_uncond``, the denoising loss of ``lidiff.losses.diffusion`` on uniform timesteps, AdamW with the
configured learning rate (optional linear warm-up and clipping), and the EMA update (CompVis warm-up) of the
UNet and conditioning params. ``scale_factor`` lives in the train state, so a resumed run never recomputes it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from ml_collections import ConfigDict

from lidiff import parallel
from lidiff.checkpoint import Checkpointer
from lidiff.errors import ConfigError, MissingInputError, UserError
from lidiff.diffusion.schedule import DiffusionSchedule
from lidiff.losses.diffusion import diffusion_loss
from lidiff.metrics.writers import MetricWriter, image_grid, save_samples
from lidiff.train import builders
from lidiff.train.common import (compile_step, compute_dtype, ema_decay_at, ema_update, global_norm, make_loader,
                                 run_once)
from lidiff.train.evaluator import generate_for_eval, make_fid_evaluator
from lidiff.train.first_stage import FirstStage, load_first_stage
from lidiff.train.generate import LatentDiffusion, to_uint8
from lidiff.train.loop import LoopSettings, train_loop

STAGE = "diffusion"


@flax.struct.dataclass
class DiffusionState:
    """Everything stage 2 trains. ``params = {"unet": ..., "cond": ... or {}}``; ``ema_params`` alike."""

    step: jax.Array  # [] int32
    params: Any
    opt_state: Any
    ema_params: Any
    scale_factor: jax.Array  # [] float32: latents are multiplied by this before diffusion


def make_optimizer(optim: ConfigDict) -> optax.GradientTransformation:
    """AdamW at exactly ``optim.learning_rate`` (after an optional linear warm-up from 0), optional clipping."""
    lr: Any = optim.learning_rate
    if optim.warmup_steps > 0:
        lr = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)
    adamw = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
    return adamw


class DiffusionTrainer:
    """Modules, schedule and optimizer of stage 2, with its pure init and step functions."""

    def __init__(self, stage: ConfigDict, first_stage: FirstStage, seed: int):
        self.cfg = stage
        self.dtype = compute_dtype(stage.train.dtype)
        self.first_stage = first_stage
        if stage.model.in_channels != first_stage.latent_channels:
            raise ConfigError(
                f"config.diffusion.model.in_channels ({stage.model.in_channels}) != the first stage's latent "
                f"channels ({first_stage.latent_channels}); set them equal"
            )
        self.ldm = LatentDiffusion(
            unet=builders.build_unet(stage.model, stage.conditioning, self.dtype),
            cond_model=builders.build_conditioning(stage.conditioning, self.dtype),
            schedule=DiffusionSchedule.create(stage.process.schedule, stage.process.num_timesteps,
                                              stage.process.linear_start, stage.process.linear_end),
            parameterization=stage.process.parameterization,
            first_stage=first_stage,
            null_label=stage.conditioning.num_classes if stage.conditioning.kind == "class" else None,
        )
        self.tx = make_optimizer(stage.optim)
        self.seed_key = jax.random.PRNGKey(seed)

    @property
    def conditional(self) -> bool:
        return self.ldm.cond_model is not None

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        f = self.first_stage.downsample_factor
        return resolution // f, resolution // f, self.first_stage.latent_channels

    def init_state(self, rng: jax.Array, scale_factor: jax.Array, latent_shape: tuple[int, int, int]) -> DiffusionState:
        params = self.ldm.init_params(rng, latent_shape)
        ema = jax.tree.map(jnp.copy, params)
        return DiffusionState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                              ema_params=ema, scale_factor=jnp.asarray(scale_factor, jnp.float32))

    def latents(self, batch: dict, first_stage_params: Any, rng: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, c] of a batch of images or of cached encodings."""
        if "image" in batch:
            encoding = self.first_stage.encode(first_stage_params, batch["image"])
        else:
            encoding = {k: batch[k] for k in ("mean", "logvar", "latent") if k in batch}
        return jax.lax.stop_gradient(self.first_stage.latent_from_encoding(encoding, rng))

    def scaled_latents(self, batch: dict, first_stage_params: Any, scale_factor: jax.Array,
                       rng: jax.Array) -> jax.Array:
        """What the UNet learns to generate: ``latents(...) * scale_factor``, [B, h, w, c] float32."""
        return self.latents(batch, first_stage_params, rng) * scale_factor

    def train_step(self, state: DiffusionState, batch: dict, first_stage_params: Any):
        """One AdamW + EMA update. batch: {"image": [B,R,R,3]} or cached encodings, plus "label" [B] if conditional."""
        c = self.cfg
        rng = jax.random.fold_in(self.seed_key, state.step)
        k_latent, k_loss, k_drop, k_uncond = jax.random.split(rng, 4)
        z = self.scaled_latents(batch, first_stage_params, state.scale_factor, k_latent)
        cond = None
        if self.conditional:
            labels = batch["label"].astype(jnp.int32)
            if c.conditioning.p_uncond > 0:
                drop = jax.random.uniform(k_uncond, labels.shape) < c.conditioning.p_uncond
                labels = jnp.where(drop, self.ldm.null_label, labels)
            cond = {"label": labels}
        deterministic = c.model.dropout == 0

        def loss_fn(params):
            model_fn = lambda x_t, t: self.ldm.apply_model(  # noqa: E731
                params, x_t, t, cond, deterministic=deterministic, dropout_rng=k_drop)
            return diffusion_loss(model_fn, self.ldm.schedule, z, k_loss, parameterization=c.process.parameterization,
                                  loss_type=c.process.loss_type, min_snr_gamma=c.process.min_snr_gamma or None)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay_at(state.step, c.train.ema_decay, c.train.ema_warmup)
        ema = ema_update(state.ema_params, params, decay)
        metrics = {**metrics, "loss": loss, "grad_norm": global_norm(grads), "ema_decay": decay,
                   "latent_std": jnp.std(z)}
        return DiffusionState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                              scale_factor=state.scale_factor), metrics


def _batch_keys(batch: dict, conditional: bool) -> tuple[str, ...]:
    keys = tuple(k for k in ("image", "mean", "logvar", "latent") if k in batch)
    return keys + (("label",) if conditional else ())


def _prepare_cache(config: ConfigDict, trainer: DiffusionTrainer, fs_params: Any, workdir: str, mesh) -> str:
    """Builds the latent cache once (if missing) and returns its path."""
    from lidiff.data.latents import build_latent_cache

    c = config.diffusion.latent_cache
    path = c.path or os.path.join(workdir, STAGE, "latents.npz")
    if os.path.exists(path):
        return path
    if config.data.random_flip:
        raise ConfigError("config.diffusion.latent_cache.enabled does not support config.data.random_flip=True: "
                         "turn one of them off")
    loader = make_loader(config.data, config.diffusion.train.batch_size, config.seed)
    encode = jax.jit(trainer.first_stage.encode)
    batch_size = config.diffusion.train.batch_size

    def encode_host(images: np.ndarray) -> dict:
        out = encode(fs_params, parallel.global_batch({"image": images}, mesh)["image"])
        return jax.device_get(out)

    if jax.process_count() > 1:
        raise NotImplementedError("building the latent cache needs a single process; build it once, then train "
                                  "multi-host with config.diffusion.latent_cache.path pointing at it")
    build_latent_cache(loader.source, encode_host, path, resolution=config.data.resolution, batch_size=batch_size)
    loader.close()
    return path


TFDS_MANUAL_HINT = (
    "A tfds dataset whose files are placed by hand, such as CelebA-HQ, is read with --config.data.source=tfds "
    "--config.data.tfds_name=celeb_a_hq/256 --config.data.manual_dir=<folder holding its downloaded files>."
)


def _data_problem(config: ConfigDict) -> str | None:
    """Why stage 2 could not read ``config.data`` (the loader's own message plus how to point it at a tfds
    dataset with a manual dir), or None when it can. Builds the source once and closes it."""
    cache = config.diffusion.latent_cache
    if cache.enabled and cache.path and os.path.exists(cache.path):
        return None
    try:
        make_loader(config.data, config.diffusion.train.batch_size, config.seed).close()
    except UserError as e:
        return f"{e}\n{TFDS_MANUAL_HINT}"
    return None


def load_inputs(config: ConfigDict, workdir: str) -> tuple[FirstStage, Any]:
    """The frozen first stage, failing before anything compiles. When it is missing, the data is checked too,
    so that one message names everything the user has to provide (data first: stage 1 needs it as well)."""
    try:
        return load_first_stage(config, workdir)
    except MissingInputError as missing_first_stage:
        data_problem = _data_problem(config)
        if data_problem is None:
            raise
        raise MissingInputError(
            "stage 2 (diffusion) cannot start; two things are missing:\n"
            f"1. the data: {data_problem}\n"
            f"2. the first stage: {missing_first_stage}"
        ) from None


def checkpoint_meta(config: ConfigDict, scale_factor: float) -> dict:
    return {"stage": STAGE, "scale_factor": float(scale_factor), "config": config.to_json()}


def train_diffusion(config: ConfigDict, workdir: str) -> DiffusionState:
    """Trains stage 2 into ``<workdir>/diffusion`` (resuming from its latest checkpoint when there is one)."""
    stage = config.diffusion
    mesh = parallel.make_mesh()
    parallel.check_batch_size(stage.train.batch_size, mesh, "config.diffusion.train.batch_size")
    first_stage, fs_params = load_inputs(config, workdir)
    fs_params = parallel.put_replicated(fs_params, mesh)
    trainer = DiffusionTrainer(stage, first_stage, config.seed)
    if trainer.conditional and stage.conditioning.num_classes <= 0:
        raise ConfigError("class conditioning needs config.diffusion.conditioning.num_classes > 0")
    directory = os.path.join(workdir, STAGE)
    if stage.latent_cache.enabled:
        from lidiff.data.latents import CachedLatentLoader

        path = _prepare_cache(config, trainer, fs_params, workdir, mesh)
        loader = CachedLatentLoader(path, global_batch_size=stage.train.batch_size, seed=config.seed,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    else:
        loader = make_loader(config.data, stage.train.batch_size, config.seed)
    if trainer.conditional and not getattr(loader, "has_labels", False):
        raise ConfigError("conditioning.kind='class' but the data has no labels (set data.label_key, "
                         "data.class_from_subdir, or use a labelled source)")
    checkpointer = Checkpointer(os.path.join(directory, "checkpoints"), keep=stage.train.keep_checkpoints)
    rep = parallel.replicated(mesh)
    latent_shape = trainer.latent_shape(config.data.resolution)
    init = lambda key, scale, shape: run_once(functools.partial(trainer.init_state, latent_shape=shape), rep,  # noqa: E731
                                              key, scale)
    first_batch = loader.batch_at(0)
    keys = _batch_keys(first_batch, trainer.conditional)
    start = 0
    if checkpointer.latest_step() is not None:
        state = init(jax.random.PRNGKey(config.seed), jnp.float32(1.0), latent_shape)
        state, _ = checkpointer.restore(state)
        start = int(state.step)
        if start >= stage.train.num_steps:  # done: nothing to compile
            logging.info("diffusion: already trained to step %d of %d", start, stage.train.num_steps)
            loader.close()
            checkpointer.close()
            if stage.sample.final_samples_per_class > 0 and not os.path.exists(os.path.join(workdir, "samples.npz")):
                write_final_samples(config, trainer, state, fs_params, latent_shape, workdir)
            return state
        logging.info("diffusion: resuming from step %d with the saved scale_factor %.6g", start,
                     float(state.scale_factor))
    else:
        scale = stage.first_stage.scale_factor
        if stage.first_stage.scale_by_std:
            batch = parallel.global_batch({k: first_batch[k] for k in keys if k != "label"}, mesh)
            z = jax.jit(trainer.latents)(batch, fs_params, jax.random.PRNGKey(config.seed))
            scale = float(1.0 / np.std(np.asarray(z), ddof=1))
            logging.info("diffusion: scale_factor = 1/std of the first batch's latents = %.6g", scale)
        state = init(jax.random.PRNGKey(config.seed), jnp.float32(scale), latent_shape)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("diffusion: %.2fM params, latents %s x scale_factor %.6g, %d devices, global batch %d",
                 n_params / 1e6, latent_shape, float(state.scale_factor), mesh.devices.size, stage.train.batch_size)
    num_classes = stage.conditioning.num_classes if trainer.conditional else 0
    evaluate = make_fid_evaluator(stage.eval, generate_for_eval(trainer, fs_params, latent_shape, stage.eval,
                                                                num_classes))  # its files checked before compiling
    example = {k: np.zeros((stage.train.batch_size,) + first_batch[k].shape[1:], first_batch[k].dtype) for k in keys}
    step_fn, _ = compile_step(trainer.train_step, mesh, state, example, fs_params, name=STAGE)

    s = stage.sample
    grid_labels = (np.arange(s.num_images) % stage.conditioning.num_classes) if trainer.conditional else None

    def images(state: DiffusionState, batch: dict) -> dict[str, np.ndarray]:
        x = trainer.ldm.generate(state.ema_params, fs_params, state.scale_factor, jax.random.PRNGKey(config.seed),
                                 num=s.num_images, latent_shape=latent_shape, labels=grid_labels,
                                 sampler=s.sampler, steps=s.steps, eta=s.eta, guidance_scale=s.guidance_scale)
        return {"samples_ema": image_grid(to_uint8(x))}

    writer = MetricWriter(directory)
    settings = LoopSettings(name=STAGE, num_steps=stage.train.num_steps, batch_size=stage.train.batch_size,
                            log_every=stage.train.log_every, checkpoint_every=stage.train.checkpoint_every,
                            image_every=stage.train.sample_every, eval_every=stage.eval.every, batch_keys=keys)
    try:
        state = train_loop(settings, state, start, step_fn, (fs_params,), loader, mesh, checkpointer,
                           checkpoint_meta(config, float(state.scale_factor)), writer, images, evaluate)
    finally:
        writer.close()
        checkpointer.close()
    if s.final_samples_per_class > 0:
        write_final_samples(config, trainer, state, fs_params, latent_shape, workdir)
    return state


def write_final_samples(config: ConfigDict, trainer: DiffusionTrainer, state: DiffusionState, fs_params: Any,
                        latent_shape: tuple[int, int, int], workdir: str) -> str:
    """Samples ``final_samples_per_class`` images per class (or that many unconditional ones) with the EMA
    params into ``<workdir>/samples.npz`` and ``<workdir>/samples_grid.png``."""
    s = config.diffusion.sample
    n_classes = config.diffusion.conditioning.num_classes if trainer.conditional else 0
    labels = np.repeat(np.arange(n_classes), s.final_samples_per_class) if n_classes else None
    num = len(labels) if labels is not None else s.final_samples_per_class
    x = trainer.ldm.generate(state.ema_params, fs_params, state.scale_factor, jax.random.PRNGKey(config.seed + 1),
                             num=num, latent_shape=latent_shape, labels=labels, sampler=s.sampler, steps=s.steps,
                             eta=s.eta, guidance_scale=s.guidance_scale)
    path = save_samples(workdir, to_uint8(x), labels, write_pngs=False,
                        grid_cols=s.final_samples_per_class if n_classes else None)
    logging.info("wrote %d samples to %s", num, path)
    return path
