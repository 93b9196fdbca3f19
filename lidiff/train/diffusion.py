"""Stage 2: train the latent diffusion UNet (and a trainable conditioning encoder) on first-stage latents.

Per step (``train_step``, one jitted, sharded function): latents = a sample of the frozen first stage's posterior
(KL; VQ: its pre-quantisation latent), computed from the images or read from the latent cache, times
``scale_factor``; each row's conditioning inputs replaced by the encoder's null input with probability
``p_uncond``; the denoising loss of ``lidiff.losses.diffusion`` on uniform timesteps; AdamW with the configured
learning rate (optional linear warm-up and clipping); and the EMA update (CompVis warm-up) of the UNet and encoder
params. ``scale_factor`` lives in the train state, so a resumed run never recomputes it. A frozen pretrained text
encoder (CLIP) is not in the state: its weights are a step argument like the first stage's, and with
``latent_cache.text_embeddings`` its outputs are computed once into the latent cache.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from ml_collections import ConfigDict

from lidiff import parallel, runs
from lidiff.checkpoint import Checkpointer
from lidiff.diffusion.schedule import DiffusionSchedule
from lidiff.errors import ConfigError, MissingInputError, UserError
from lidiff.data.transforms import to_uint8
from lidiff.ldm import FirstStage, LatentDiffusion, posterior_arrays, posterior_from_arrays
from lidiff.losses.diffusion import diffusion_loss
from lidiff.metrics.writers import MetricWriter, image_grid, save_samples
from lidiff.models.conditioning import drop_to_null
from lidiff.train import builders
from lidiff.train import conditioning as conditioning_setup
from lidiff.train.common import (abstract_sharded, compile_step, compute_dtype, ema_decay_at, ema_update,
                                 global_norm, init_sharded, make_loader)
from lidiff.train.evaluator import generate_for_eval, make_fid_evaluator
from lidiff.train.loop import LoopSettings, train_loop

STAGE = "diffusion"
ENCODING_KEYS = ("mean", "logvar")  # a cached posterior (lidiff.ldm.posterior_arrays)
CACHED_TEXT_KEY = "text_embedding"  # a frozen text encoder's output, cached beside the latents


@flax.struct.dataclass
class DiffusionState:
    """Everything stage 2 trains. ``params = {"unet": ..., "cond": ... or {}}``; ``ema_params`` alike."""

    step: jax.Array  # [] int32
    params: Any
    opt_state: Any
    ema_params: Any
    scale_factor: jax.Array  # [] float32: latents are multiplied by this before diffusion


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static settings of ``train_step`` (bound with ``functools.partial`` before jit)."""

    seed: int
    p_uncond: float  # probability of replacing a row's conditioning by the null input
    parameterization: str  # eps | x0 | v
    loss_type: str  # l2 | l1
    min_snr_gamma: float | None
    ema_decay: float
    ema_warmup: bool
    dropout: bool  # whether the UNet's dropout is on
    # super-resolution / inpainting: (images, rng) -> the conditioning inputs, made on the device
    derive_inputs: Callable[[jax.Array, jax.Array], dict] | None = None

    @classmethod
    def from_config(cls, stage: ConfigDict, seed: int) -> "StepSettings":
        return cls(seed=seed, p_uncond=float(stage.conditioning.p_uncond),
                   parameterization=stage.process.parameterization, loss_type=stage.process.loss_type,
                   min_snr_gamma=stage.process.min_snr_gamma or None, ema_decay=stage.train.ema_decay,
                   ema_warmup=stage.train.ema_warmup, dropout=stage.model.dropout > 0,
                   derive_inputs=conditioning_setup.input_deriver(stage.conditioning))


def make_optimizer(optim: ConfigDict) -> optax.GradientTransformation:
    """AdamW at exactly ``optim.learning_rate`` (after an optional linear warm-up from 0), optional clipping."""
    lr: Any = optim.learning_rate
    if optim.warmup_steps > 0:
        lr = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)
    adamw = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
    return adamw


def unscaled_latents(ldm: LatentDiffusion, batch: dict, first_stage_params: Any, rng: jax.Array) -> jax.Array:
    """Latents [B, h, w, c] of a batch's images (``"image"``) or cached posteriors (``"mean"``[, ``"logvar"``]):
    a posterior sample (KL) or the pre-quantisation latent (VQ), unscaled, without gradient."""
    if "image" in batch:
        posterior = ldm.first_stage.encode(first_stage_params, batch["image"])
    else:
        posterior = posterior_from_arrays({k: batch[k] for k in ENCODING_KEYS if k in batch})
    return jax.lax.stop_gradient(posterior.sample(rng))


def conditioning_inputs(ldm: LatentDiffusion, batch: dict, p_uncond: float, rng: jax.Array, *,
                        derive: Callable | None = None, latent_hw: tuple[int, int] | None = None,
                        encoder_params: Any = None) -> dict:
    """The batch's raw conditioning inputs (or those ``derive(batch["image"], key)`` makes from its images), each
    row replaced by the null input (sized for ``latent_hw`` latents) with probability ``p_uncond``.

    A batch from a text-embedding cache carries a frozen encoder's output ``"text_embedding"`` [B, L, D] instead of
    tokens; its dropped rows become the encoding of the empty prompt (by the frozen ``encoder_params``), exactly
    what dropping the tokens gives."""
    if derive is not None:
        inputs = derive(batch["image"], jax.random.fold_in(rng, 1))
    elif CACHED_TEXT_KEY in batch:
        inputs = {CACHED_TEXT_KEY: batch[CACHED_TEXT_KEY]}
    else:
        inputs = {k: batch[k] for k in ldm.conditioner.input_specs}
    if not inputs or p_uncond <= 0:
        return inputs
    rows = next(iter(inputs.values())).shape[0]
    drop = jax.random.uniform(rng, (rows,)) < p_uncond
    if CACHED_TEXT_KEY in inputs:
        null = ldm.encode_condition({"cond": encoder_params}, ldm.null_inputs(1))["context"]
        return {CACHED_TEXT_KEY: jnp.where(drop[:, None, None], null, inputs[CACHED_TEXT_KEY])}
    return drop_to_null(ldm.conditioner, inputs, drop, latent_hw)


def train_step(state: DiffusionState, batch: dict, first_stage_params: Any, encoder_params: Any = None, *,
               ldm: LatentDiffusion, tx: optax.GradientTransformation,
               settings: StepSettings) -> tuple[DiffusionState, dict]:
    """One AdamW + EMA update.

    batch: ``{"image": [B, R, R, 3]}`` or a cached posterior ``{"mean", "logvar"?: [B, h, w, c]}``, plus the
    encoder's raw inputs (``label`` [B] / ``tokens`` [B, L] or a cached ``text_embedding`` [B, L, D] / ``boxes``
    [B, K, 4] and ``box_labels`` [B, K]). encoder_params: a frozen text encoder's weights (None otherwise); its
    context is computed outside the differentiated function, so no gradient or optimizer state touches it.
    """
    rng = jax.random.fold_in(jax.random.PRNGKey(settings.seed), state.step)
    k_latent, k_loss, k_drop, k_uncond = jax.random.split(rng, 4)
    z = unscaled_latents(ldm, batch, first_stage_params, k_latent) * state.scale_factor
    inputs = conditioning_inputs(ldm, batch, settings.p_uncond, k_uncond, derive=settings.derive_inputs,
                                 latent_hw=z.shape[1:3], encoder_params=encoder_params)
    encode = functools.partial(ldm.encode_condition, inputs=inputs, latent_hw=z.shape[1:3],
                               first_stage_params=first_stage_params)
    frozen_cond = encode(ldm.with_frozen_encoder(state.params, encoder_params)) if ldm.frozen_encoder else None

    def loss_fn(params):
        cond = frozen_cond if ldm.frozen_encoder else encode(params)
        model_fn = lambda x_t, t: ldm.apply_model(  # noqa: E731
            params, x_t, t, cond, deterministic=not settings.dropout, dropout_rng=k_drop)
        return diffusion_loss(model_fn, ldm.schedule, z, k_loss, parameterization=settings.parameterization,
                              loss_type=settings.loss_type, min_snr_gamma=settings.min_snr_gamma)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, settings.ema_decay, settings.ema_warmup)
    ema = ema_update(state.ema_params, params, decay)
    metrics = {**metrics, "loss": loss, "grad_norm": global_norm(grads), "ema_decay": decay,
               "latent_std": jnp.std(z)}
    return DiffusionState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                          scale_factor=state.scale_factor), metrics


class DiffusionTrainer:
    """Stage 2 built from its config: the model (``ldm``), the optimizer and the step settings.

    ``train_step`` is the module-level ``train_step`` with these bound; ``init_state`` makes a fresh state.
    tokenizer: the text model's tokenizer (``lidiff.train.conditioning.prepare_tokenizer``), else None.
    text_encoder: a frozen CLIP text encoder ``(module, params)`` (``conditioning_setup.prepare_text_encoder``),
    else None; its weights are ``encoder_params``, which ``train_step`` and ``sampling_params`` add.
    """

    def __init__(self, stage: ConfigDict, first_stage: FirstStage, seed: int, tokenizer: Any = None,
                 text_encoder: tuple[Any, Any] | None = None):
        self.cfg = stage
        dtype = compute_dtype(stage.train.dtype)
        self.first_stage = first_stage
        self.tokenizer = tokenizer
        module, self.encoder_params = text_encoder if text_encoder is not None else (None, None)
        conditioning_setup.check_conditioning(stage.conditioning, stage.model)
        conditioner = conditioning_setup.build_conditioner(stage.conditioning, dtype, tokenizer, first_stage, module)
        conditioning_setup.check_unet_channels(stage.model, first_stage.latent_channels, conditioner)
        self.ldm = LatentDiffusion(
            unet=builders.build_unet(stage.model, conditioning_setup.unet_num_classes(stage.conditioning), dtype),
            conditioner=conditioner,
            schedule=DiffusionSchedule.create(stage.process.schedule, stage.process.num_timesteps,
                                              stage.process.linear_start, stage.process.linear_end),
            parameterization=stage.process.parameterization,
            first_stage=first_stage,
        )
        self.tx = make_optimizer(stage.optim)
        self.settings = StepSettings.from_config(stage, seed)
        self.train_step = functools.partial(train_step, ldm=self.ldm, tx=self.tx, settings=self.settings)

    @property
    def conditional(self) -> bool:
        return self.ldm.conditional

    def sampling_params(self, params: Any, encoder_params: Any = None) -> dict:
        """Trained (EMA) params -> what ``ldm.generate`` takes: a frozen text encoder's weights added
        (``encoder_params``, default this trainer's host copy)."""
        return self.ldm.with_frozen_encoder(params, self.encoder_params if encoder_params is None else encoder_params)

    def step_extras(self, first_stage_params: Any, encoder_params: Any = None) -> tuple:
        """The arguments ``train_step`` takes after the batch: the first stage's params, and a frozen text
        encoder's when there is one."""
        return (first_stage_params, encoder_params) if self.ldm.frozen_encoder else (first_stage_params,)

    @property
    def batch_inputs(self) -> tuple[str, ...]:
        """The conditioning inputs the batches must carry (none when the step derives them from the images)."""
        return () if self.settings.derive_inputs is not None else tuple(self.ldm.conditioner.input_specs)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        f = self.first_stage.downsample_factor
        return resolution // f, resolution // f, self.first_stage.latent_channels

    def init_state(self, rng: jax.Array, scale_factor: jax.Array, latent_shape: tuple[int, int, int]) -> DiffusionState:
        params = self.ldm.init_params(rng, latent_shape)
        ema = jax.tree.map(jnp.copy, params)
        return DiffusionState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                              ema_params=ema, scale_factor=jnp.asarray(scale_factor, jnp.float32))

    def latents(self, batch: dict, first_stage_params: Any, rng: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, c] of a batch of images or of cached posteriors."""
        return unscaled_latents(self.ldm, batch, first_stage_params, rng)


def data_fields(config: ConfigDict, tokenizer: Any) -> list:
    """What the loader carries per row besides the image: the conditioning encoder's raw inputs."""
    from lidiff.data.fields import fields_for

    cond = config.diffusion.conditioning
    if cond.kind in conditioning_setup.DERIVED_KINDS:
        return []
    if cond.kind == "semantic":
        from lidiff.data.spatial import SegmentationField

        return [SegmentationField(cond.num_classes, config.data.resolution)]
    return fields_for(cond.kind, tokenizer=tokenizer, max_length=cond.max_length, max_boxes=cond.max_boxes)


def _prepare_cache(config: ConfigDict, trainer: DiffusionTrainer, fs_params: Any, workdir: str, mesh,
                   fields: list) -> str:
    """Builds the latent cache once (if missing) and returns its path. It holds each example's posterior
    (``lidiff.ldm.posterior_arrays``) and its conditioning inputs (``fields``). In a multi-process run process 0
    builds it on its own devices while the others wait; all then read the one file."""
    c = config.diffusion.latent_cache
    path = c.path or runs.latent_cache_path(workdir)
    if config.data.random_flip:  # the cache holds unflipped images: training from it would silently drop flips
        raise ConfigError("config.diffusion.latent_cache.enabled does not support config.data.random_flip=True: "
                          "turn one of them off")
    if jax.process_count() > 1:  # built once, by process 0 on its own devices; the others wait, then all read it
        if jax.process_index() == 0:
            local = parallel.make_mesh(jax.local_devices())
            _fill_cache(config, trainer, parallel.put_replicated(fs_params, local), path, local, fields)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lidiff latent cache written")
        if not os.path.exists(path):
            raise MissingInputError(f"process {jax.process_index()} cannot see the latent cache {path} that process "
                                    "0 wrote: every process must see the same workdir (a shared filesystem), or "
                                    "build the cache once and set config.diffusion.latent_cache.path to a copy on "
                                    "each host")
        return path
    _fill_cache(config, trainer, fs_params, path, mesh, fields)
    return path


def _fill_cache(config: ConfigDict, trainer: DiffusionTrainer, fs_params: Any, path: str, mesh, fields: list):
    """Builds the cache at ``path`` if it is missing, then adds a frozen text encoder's output for every caption
    when ``latent_cache.text_embeddings`` asks and the cache lacks it (on the devices of ``mesh``)."""
    if not os.path.exists(path):
        _build_cache(config, trainer, fs_params, path, mesh, fields)
    if not config.diffusion.latent_cache.get("text_embeddings", False):
        return
    from lidiff.data.latents import add_text_embeddings

    params = parallel.put_replicated(trainer.encoder_params, mesh)
    embed = jax.jit(lambda p, tokens: trainer.ldm.encode_condition({"cond": p}, {"tokens": tokens})["context"])
    split = parallel.batch_sharded(mesh)
    add_text_embeddings(path, lambda tokens: jax.device_get(embed(params, jax.device_put(tokens, split))),
                        batch_size=config.diffusion.train.batch_size, key=CACHED_TEXT_KEY)


def _build_cache(config: ConfigDict, trainer: DiffusionTrainer, fs_params: Any, path: str, mesh, fields: list):
    """Encodes ``config.data`` on the devices of ``mesh`` (all addressable here) into the cache at ``path``."""
    from lidiff.data.latents import build_latent_cache

    loader = make_loader(config.data, config.diffusion.train.batch_size, config.seed, fields=fields)
    encode = jax.jit(lambda params, x: posterior_arrays(trainer.first_stage.encode(params, x)))

    def encode_host(images: np.ndarray) -> dict:
        return jax.device_get(encode(fs_params, jax.device_put(images, parallel.batch_sharded(mesh))))

    try:
        build_latent_cache(loader.source, encode_host, path, resolution=config.data.resolution,
                           batch_size=config.diffusion.train.batch_size, fields=fields)
    finally:
        loader.close()


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
        return runs.load_first_stage(config, workdir)
    except MissingInputError as missing_first_stage:
        data_problem = _data_problem(config)
        if data_problem is None:
            raise
        raise MissingInputError(
            "stage 2 (diffusion) cannot start; two things are missing:\n"
            f"1. the data: {data_problem}\n"
            f"2. the first stage: {missing_first_stage}"
        ) from None


def batch_condition_keys(config: ConfigDict, trainer: DiffusionTrainer) -> tuple[str, ...]:
    """The conditioning arrays the training batches carry: the encoder's raw inputs, or a frozen text encoder's
    cached output (``latent_cache.text_embeddings``)."""
    if config.diffusion.latent_cache.enabled and config.diffusion.latent_cache.get("text_embeddings", False):
        return (CACHED_TEXT_KEY,)
    return trainer.batch_inputs


def check_text_embedding_cache(config: ConfigDict) -> None:
    """``latent_cache.text_embeddings`` needs the latent cache and a frozen text encoder."""
    stage = config.diffusion
    if not stage.latent_cache.get("text_embeddings", False):
        return
    if not stage.latent_cache.enabled:
        raise ConfigError("config.diffusion.latent_cache.text_embeddings keeps the text encoder's output beside the "
                          "cached latents: set config.diffusion.latent_cache.enabled=True too")
    if stage.conditioning.kind != "text" or conditioning_setup.text_encoder_kind(stage.conditioning) != "clip":
        raise ConfigError("config.diffusion.latent_cache.text_embeddings caches a frozen text encoder's output, but "
                          "this model trains its encoder (conditioning.kind / encoder is not text / clip): set "
                          "text_embeddings=False")


def checkpoint_meta(config: ConfigDict, scale_factor: float) -> dict:
    return {"stage": STAGE, "scale_factor": float(scale_factor), "config": config.to_json()}


def _open_loader(config: ConfigDict, trainer: DiffusionTrainer, fs_params: Any, workdir: str, mesh, fields: list):
    """The training batches: cached posteriors (built once) or images, with the encoder's raw inputs."""
    stage = config.diffusion
    if stage.latent_cache.enabled:
        from lidiff.data.latents import CachedLatentLoader

        path = _prepare_cache(config, trainer, fs_params, workdir, mesh, fields)
        return CachedLatentLoader(path, global_batch_size=stage.train.batch_size, seed=config.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  required=batch_condition_keys(config, trainer))
    loader = make_loader(config.data, stage.train.batch_size, config.seed, fields=fields)
    missing = [k for k in trainer.batch_inputs if k not in loader.field_names]
    if missing:
        raise ConfigError(f"conditioning.kind={stage.conditioning.kind!r} needs {', '.join(missing)} from the data, "
                          f"but config.data.source={config.data.source!r} gives none (for class labels set "
                          "data.label_key or data.class_from_subdir, or use a labelled source)")
    return loader


def train_diffusion(config: ConfigDict, workdir: str) -> DiffusionState:
    """Trains stage 2 into ``<workdir>/diffusion`` (resuming from its latest checkpoint when there is one)."""
    stage = config.diffusion
    mesh = parallel.mesh_from_config(config)
    parallel.check_batch_size(stage.train.batch_size, mesh, "config.diffusion.train.batch_size")
    conditioning_setup.check_conditioning(stage.conditioning, stage.model)
    if stage.latent_cache.enabled and stage.conditioning.kind in conditioning_setup.DERIVED_KINDS:
        raise ConfigError(f"conditioning.kind={stage.conditioning.kind!r} makes its inputs from the training images "
                          "in every step, which the latent cache does not keep: set "
                          "config.diffusion.latent_cache.enabled=False")
    check_text_embedding_cache(config)
    first_stage, fs_params = load_inputs(config, workdir)
    fs_params = parallel.put_replicated(fs_params, mesh)
    tokenizer = conditioning_setup.prepare_tokenizer(config, workdir, captions=functools.partial(
        _training_captions, config))
    text_encoder = conditioning_setup.prepare_text_encoder(config, workdir, compute_dtype(stage.train.dtype))
    trainer = DiffusionTrainer(stage, first_stage, config.seed, tokenizer, text_encoder)
    encoder_params = parallel.put_replicated(trainer.encoder_params, mesh) if trainer.ldm.frozen_encoder else None
    extras = trainer.step_extras(fs_params, encoder_params)
    fields = data_fields(config, tokenizer)
    loader = _open_loader(config, trainer, fs_params, workdir, mesh, fields)
    directory = os.path.join(workdir, STAGE)
    checkpointer = Checkpointer(os.path.join(directory, "checkpoints"), keep=stage.train.keep_checkpoints)
    latent_shape = trainer.latent_shape(config.data.resolution)
    init = lambda key, scale, shape: init_sharded(functools.partial(trainer.init_state, latent_shape=shape),  # noqa: E731
                                                  mesh, key, scale)
    first_batch = loader.batch_at(0)
    encoding_keys = tuple(k for k in ("image",) + ENCODING_KEYS if k in first_batch)
    keys = encoding_keys + batch_condition_keys(config, trainer)
    start = 0
    if checkpointer.latest_step() is not None:
        target = abstract_sharded(functools.partial(trainer.init_state, latent_shape=latent_shape), mesh,
                                  jax.random.PRNGKey(config.seed), jnp.float32(1.0))
        state = restore_state(checkpointer, target, trainer.tx)
        start = int(state.step)
        if start >= stage.train.num_steps:  # done: nothing to compile
            logging.info("diffusion: already trained to step %d of %d", start, stage.train.num_steps)
            loader.close()
            checkpointer.close()
            if stage.sample.final_samples_per_class > 0 and not os.path.exists(os.path.join(workdir, "samples.npz")):
                write_final_samples(config, trainer, state, fs_params, latent_shape, workdir, mesh, encoder_params)
            return state
        logging.info("diffusion: resuming from step %d with the saved scale_factor %.6g", start,
                     float(state.scale_factor))
    else:
        scale = stage.first_stage.scale_factor
        if stage.first_stage.scale_by_std:
            batch = parallel.global_batch({k: first_batch[k] for k in encoding_keys}, mesh)
            std = jax.jit(lambda b, p, k: jnp.std(trainer.latents(b, p, k), ddof=1),  # one value on every device
                          out_shardings=parallel.replicated(mesh))(batch, fs_params, jax.random.PRNGKey(config.seed))
            scale = float(1.0 / std)
            logging.info("diffusion: scale_factor = 1/std of the first batch's latents = %.6g", scale)
        state = init(jax.random.PRNGKey(config.seed), jnp.float32(scale), latent_shape)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("diffusion: %.2fM params, latents %s x scale_factor %.6g, %d devices, global batch %d",
                 n_params / 1e6, latent_shape, float(state.scale_factor), mesh.devices.size, stage.train.batch_size)
    eval_inputs = lambda num: conditioning_setup.sample_inputs(config, num, tokenizer, seed=config.seed)[0]  # noqa: E731
    # the evaluator's files are checked here, before compiling
    evaluate = make_fid_evaluator(stage.eval, generate_for_eval(trainer.ldm, fs_params, latent_shape, stage.eval,
                                                                eval_inputs, mesh, encoder_params))
    example = {k: np.zeros((stage.train.batch_size,) + first_batch[k].shape[1:], first_batch[k].dtype) for k in keys}
    step_fn, _ = compile_step(trainer.train_step, mesh, state, example, *extras, name=STAGE)

    s = stage.sample
    grid_inputs, _ = conditioning_setup.sample_inputs(config, s.num_images, tokenizer, seed=config.seed)
    grid_shape = sample_latent_shape(trainer.ldm, grid_inputs, latent_shape)

    def images(state: DiffusionState, batch: dict) -> dict[str, np.ndarray]:
        x = trainer.ldm.generate(trainer.sampling_params(state.ema_params, encoder_params), fs_params,
                                 state.scale_factor, jax.random.PRNGKey(config.seed),
                                 num=s.num_images, latent_shape=grid_shape, inputs=grid_inputs,
                                 sampler=s.sampler, steps=s.steps, eta=s.eta, guidance_scale=s.guidance_scale,
                                 mesh=mesh)
        return {"samples_ema": image_grid(to_uint8(x))}

    writer = MetricWriter(directory)
    settings = LoopSettings(name=STAGE, num_steps=stage.train.num_steps, batch_size=stage.train.batch_size,
                            log_every=stage.train.log_every, checkpoint_every=stage.train.checkpoint_every,
                            image_every=stage.train.sample_every, eval_every=stage.eval.every, batch_keys=keys)
    try:
        state = train_loop(settings, state, start, step_fn, extras, loader, mesh, checkpointer,
                           checkpoint_meta(config, float(state.scale_factor)), writer, images, evaluate)
    finally:
        writer.close()
        checkpointer.close()
    if s.final_samples_per_class > 0:
        write_final_samples(config, trainer, state, fs_params, latent_shape, workdir, mesh, encoder_params)
    return state


def restore_state(checkpointer: Checkpointer, target: DiffusionState, tx: optax.GradientTransformation,
                  step: int | None = None) -> DiffusionState:
    """Checkpoint ``step`` (default: the latest that restores) onto ``target`` (``ShapeDtypeStruct`` leaves with
    shardings). A checkpoint that holds the weights without an optimizer state (an imported model,
    ``python -m lidiff.convert``) starts a fresh one for its params, with ``target.opt_state``'s shardings."""
    try:
        weights_only = "opt_state" not in checkpointer.saved_items(step)
    except Exception:  # noqa: BLE001 - a damaged newest step: the full restore sets it aside, takes an older one
        weights_only = False
    if not weights_only:
        return checkpointer.restore(target, step)[0]
    names = ("step", "params", "ema_params", "scale_factor")
    items, _, step = checkpointer.restore_items({name: getattr(target, name) for name in names}, step)
    shardings = jax.tree.map(lambda x: x.sharding, target.opt_state)
    opt_state = jax.jit(tx.init, out_shardings=shardings)(items["params"])
    logging.info("diffusion: checkpoint step %d holds no optimizer state; fine-tuning starts a fresh one", step)
    return target.replace(**items, opt_state=opt_state)


def _training_captions(config: ConfigDict) -> list[str]:
    """Every caption of the training source (to train a WordPiece vocabulary on)."""
    loader = make_loader(config.data, config.diffusion.train.batch_size, config.seed, fields=[])
    try:
        if not hasattr(loader.source, "captions"):
            raise ConfigError(f"config.data.source={config.data.source!r} has no captions to build a vocabulary "
                              "from; use a captioned source or set config.diffusion.conditioning.tokenizer")
        return loader.source.captions()
    finally:
        loader.close()


def write_final_samples(config: ConfigDict, trainer: DiffusionTrainer, state: DiffusionState, fs_params: Any,
                        latent_shape: tuple[int, int, int], workdir: str, mesh=None, encoder_params: Any = None) -> str:
    """Samples ``final_samples_per_class`` images per class / prompt / layout (or that many unconditional ones)
    with the EMA params into ``<workdir>/samples.npz`` (with the conditioning) and ``<workdir>/samples_grid.png``
    (one row per class / prompt / layout). The batch is split over ``mesh`` (default: this process's devices);
    with the training mesh of a multi-process run every process samples its part and process 0 writes.
    encoder_params: a frozen text encoder's weights already on ``mesh`` (default: the trainer's host copy)."""
    s = config.diffusion.sample
    groups = conditioning_setup.num_groups(config)
    inputs, record = conditioning_setup.sample_inputs(config, groups, trainer.tokenizer, seed=config.seed + 1)
    repeat = lambda tree: {k: np.repeat(v, s.final_samples_per_class, axis=0) for k, v in tree.items()}  # noqa: E731
    inputs, record = repeat(inputs), repeat(record)
    num = groups * s.final_samples_per_class
    x = trainer.ldm.generate(trainer.sampling_params(state.ema_params, encoder_params), fs_params, state.scale_factor,
                             jax.random.PRNGKey(config.seed + 1),
                             num=num, latent_shape=sample_latent_shape(trainer.ldm, inputs, latent_shape),
                             inputs=inputs, sampler=s.sampler, steps=s.steps, eta=s.eta,
                             guidance_scale=s.guidance_scale, mesh=mesh)
    path = os.path.join(workdir, "samples.npz")
    if jax.process_index() != 0:
        return path
    labels = record.pop("labels", None)
    images = to_uint8(x)
    grid = conditioning_grid(images, record)
    path = save_samples(workdir, images, labels, write_pngs=False, conditioning=record,
                        grid_cols=(len(grid) // len(images) if grid is not None else
                                   s.final_samples_per_class if trainer.conditional else None),
                        grid=grid)
    logging.info("wrote %d samples to %s", num, path)
    if "inputs" in record and "targets" in record and images.shape[1] >= 11:
        from lidiff.metrics.reconstruction import super_resolution_quality

        q = super_resolution_quality(images, record["inputs"], record["targets"])
        logging.info("super-resolution on %d held-out images: PSNR %.2f dB, SSIM %.4f (bicubic upsampling: PSNR "
                     "%.2f dB, SSIM %.4f)", num, q["psnr"], q["ssim"], q["bicubic_psnr"], q["bicubic_ssim"])
    return path


def sample_latent_shape(ldm: LatentDiffusion, inputs: dict, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """The latent shape to sample for ``inputs``: the size spatial conditioning implies, else ``default``."""
    hw = ldm.latent_hw(inputs)
    return default if hw is None else (int(hw[0]), int(hw[1]), int(default[2]))


def conditioning_grid(images: np.ndarray, record: dict) -> np.ndarray | None:
    """For spatial conditioning, rows ``input | sample | target`` (``input | sample`` when there is no target): the
    low-res input enlarged (nearest), the masked image (the unknown region grey) or the coloured map; None
    otherwise.

    images: uint8 [N, H, W, 3]; record: ``spatial_sample_inputs``'s record, repeated to N rows.
    """
    n, h, w = images.shape[:3]
    if "inputs" in record:
        low = np.asarray(record["inputs"])
        shown = np.repeat(np.repeat(low, h // low.shape[1], axis=1), w // low.shape[2], axis=2)
    elif "masks" in record:
        shown = np.where(np.asarray(record["masks"])[..., None] > 0, record["targets"], 128).astype(np.uint8)
    elif "segmentations" in record:
        seg = np.asarray(record["segmentations"])
        palette = np.random.default_rng(0).integers(64, 256, (int(seg.max()) + 1, 3)).astype(np.uint8)
        palette[0] = 0
        shown = palette[seg]
    else:
        return None
    columns = [shown, images] + ([np.asarray(record["targets"])] if "targets" in record else [])
    return np.stack(columns, axis=1).reshape(len(columns) * n, h, w, 3)
