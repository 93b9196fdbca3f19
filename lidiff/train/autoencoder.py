"""Stage 1: train a KL or VQ autoencoder with reconstruction + LPIPS + PatchGAN losses.

One jitted, sharded step updates the generator (autoencoder) and the discriminator from one forward pass:

1. x_rec = decoder(encoder(x)) (KL: a posterior sample; VQ: straight-through codes).
2. Generator loss = nll (L1/L2 + perceptual_weight * LPIPS) + kl_weight * KL | codebook_weight * q_loss
   + d_weight * disc_factor * (-mean D(x_rec)), with the adaptive weight
   d_weight = disc_weight * ||d nll / d W|| / (||d g / d W|| + 1e-4) at the decoder's last conv kernel W.
3. Discriminator loss = disc_factor * hinge(D(x), D(sg(x_rec))) (or vanilla).

Before ``disc_start`` the discriminator and the adaptive weight are skipped (``lax.cond``) but both optimizers
still step with zero adversarial gradients, as the reference does. Random keys are ``fold_in(seed, step)``.
"""

from __future__ import annotations

import dataclasses
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
from lidiff.errors import ConfigError, MissingInputError
from lidiff.data.transforms import to_uint8
from lidiff.losses import autoencoder as ae_losses
from lidiff.metrics.writers import MetricWriter, image_grid
from lidiff.models.autoencoder import conv_out_apply
from lidiff.train import builders
from lidiff.train.common import (compile_step, compute_dtype, ema_decay_at, ema_update, global_norm, make_loader,
                                 init_sharded, abstract_sharded)
from lidiff.train.loop import LoopSettings, train_loop

STAGE = "autoencoder"


@flax.struct.dataclass
class AutoencoderState:
    """Everything stage 1 trains. ``params = {"autoencoder": ..., "logvar": []}``."""

    step: jax.Array  # [] int32: number of updates done
    params: Any
    opt_state: Any
    disc_params: Any
    disc_batch_stats: Any  # {} when the discriminator has no BatchNorm
    disc_opt_state: Any
    ema_params: Any  # autoencoder params EMA, {} when off
    code_counts: Any  # [n_embed] moving average of code usage (VQ), {} otherwise


def stage_dir(workdir: str) -> str:
    return os.path.join(workdir, STAGE)


def load_lpips(loss: ConfigDict) -> dict:
    """LPIPS params when ``perceptual_weight > 0`` (stops with how to get them if missing), else {}."""
    if loss.perceptual_weight <= 0:
        logging.warning(
            "perceptual loss is OFF (config.autoencoder.loss.perceptual_weight=0): training with pixel and "
            "adversarial losses only. Set lpips_weights and perceptual_weight to use LPIPS."
        )
        return {}
    from lidiff.convert.lpips_weights import conversion_command, load_lpips_params

    if not loss.lpips_weights:
        raise MissingInputError(
            "config.autoencoder.loss.perceptual_weight > 0 but config.autoencoder.loss.lpips_weights is empty. "
            f"Convert the VGG16 and LPIPS v0.1 weights once with:\n  {conversion_command()}\n"
            "then set --config.autoencoder.loss.lpips_weights=lpips_vgg16.safetensors "
            "(or set perceptual_weight=0 to train without LPIPS)."
        )
    try:
        return load_lpips_params(loss.lpips_weights)
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class AutoencoderSettings:
    """The static settings of ``train_step`` (bound with ``functools.partial`` before jit)."""

    seed: int
    is_vq: bool
    dropout: bool  # whether the autoencoder's dropout is on
    reconstruction: str  # l1 | l2
    perceptual_weight: float
    kl_weight: float  # KL models
    codebook_weight: float  # VQ models
    learn_logvar: bool
    disc_start: int
    disc_factor: float
    disc_weight: float
    disc_loss: str  # hinge | vanilla
    ema_decay: float  # 0 = no EMA
    dead_code_restart: bool
    dead_code_threshold: float
    dead_code_restart_every: int

    @classmethod
    def from_config(cls, stage: ConfigDict, seed: int) -> "AutoencoderSettings":
        m, loss = stage.model, stage.loss
        return cls(seed=seed, is_vq=m.kind == "vq", dropout=m.dropout > 0, reconstruction=loss.reconstruction,
                   perceptual_weight=loss.perceptual_weight, kl_weight=loss.kl_weight,
                   codebook_weight=loss.codebook_weight, learn_logvar=loss.learn_logvar, disc_start=loss.disc_start,
                   disc_factor=loss.disc_factor, disc_weight=loss.disc_weight, disc_loss=loss.disc_loss,
                   ema_decay=stage.train.ema_decay, dead_code_restart=m.dead_code_restart,
                   dead_code_threshold=m.dead_code_threshold, dead_code_restart_every=m.dead_code_restart_every)


@dataclasses.dataclass(frozen=True)
class AutoencoderModules:
    """The networks and optimizers of stage 1: autoencoder, PatchGAN, LPIPS, and their Adam optimizers."""

    model: Any
    disc: Any
    lpips: Any
    tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    dtype: Any


def _disc_apply(m: AutoencoderModules, params, batch_stats, x):
    """Discriminator in training mode -> (logits, new batch_stats)."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
        logits, updates = m.disc.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]
    return m.disc.apply(variables, x, train=True), batch_stats


def _features(m: AutoencoderModules, s: AutoencoderSettings, ae_params, x, rng):
    """-> (h fed into decoder/conv_out, regulariser loss, metrics, aux)."""
    k_post, k_drop = jax.random.split(rng)
    deterministic = not s.dropout
    rngs = {"dropout": k_drop}
    if s.is_vq:
        h, q = m.model.apply({"params": ae_params}, x, deterministic=deterministic, return_features=True, rngs=rngs)
        metrics = {"codebook_loss": q.loss, "perplexity": q.perplexity, "codebook_usage": q.codebook_usage}
        return h, s.codebook_weight * q.loss, metrics, q.counts
    h, posterior = m.model.apply({"params": ae_params}, x, k_post, sample_posterior=True,
                                 deterministic=deterministic, return_features=True, rngs=rngs)
    kl = jnp.mean(posterior.kl())
    return h, s.kl_weight * kl, {"kl_loss": kl}, None


def _lpips_features(m: AutoencoderModules, s: AutoencoderSettings, x, lpips_params):
    """LPIPS features of the real images, once per step, or None without the perceptual loss.

    x: [B, R, R, 3] float32 in [-1, 1] -> ``LPIPS.features(x)`` (five unit-normalised taps
    [B, R/2**k, R/2**k, C_k] float32) under ``stop_gradient``: x is data, so no gradient reaches them anyway.
    """
    if s.perceptual_weight <= 0:
        return None
    feats = m.lpips.apply({"params": lpips_params}, x, method="features")
    return jax.lax.stop_gradient(feats)


def _nll(m: AutoencoderModules, s: AutoencoderSettings, x, x_rec, logvar, lpips_params, x_feats):
    """-> (nll [] float32, metrics). x, x_rec: [B, R, R, 3] in [-1, 1]; x_feats: ``_lpips_features(x)``
    (LPIPS(x, x_rec) is computed from them, so x's VGG features are not recomputed)."""
    rec = ae_losses.reconstruction_loss(x, x_rec, s.reconstruction)
    metrics = {"rec_loss": jnp.mean(rec)}
    if s.perceptual_weight > 0:
        p = m.lpips.apply({"params": lpips_params}, x_feats, x_rec, method="distance")
        rec = ae_losses.add_perceptual(rec, p, s.perceptual_weight)
        metrics["perceptual_loss"] = jnp.mean(p)
    if s.is_vq:
        return ae_losses.nll_loss_mean(rec), metrics
    if not s.learn_logvar:
        logvar = jax.lax.stop_gradient(logvar)
    return ae_losses.nll_loss_sum_per_image(rec, logvar), metrics


def train_step(state: AutoencoderState, batch: dict, lpips_params: Any, *, modules: AutoencoderModules,
               settings: AutoencoderSettings) -> tuple[AutoencoderState, dict]:
    """One generator + discriminator update. batch["image"]: [B, R, R, 3] float32 in [-1, 1]."""
    m, s = modules, settings
    x = batch["image"]
    x_feats = _lpips_features(m, s, x, lpips_params)  # shared by the loss and the adaptive-weight gradient
    rng = jax.random.fold_in(jax.random.PRNGKey(s.seed), state.step)
    k_fwd, k_restart = jax.random.split(rng)
    disc_factor = ae_losses.adopt_weight(s.disc_factor, state.step, s.disc_start)
    disc_on = disc_factor > 0
    g_of_rec = lambda x_rec: ae_losses.generator_adversarial_loss(  # noqa: E731
        _disc_apply(m, state.disc_params, state.disc_batch_stats, x_rec)[0])

    def generator_loss(params):
        ae = params["autoencoder"]
        h, reg, metrics, counts = _features(m, s, ae, x, k_fwd)
        conv_out = ae["decoder"]["conv_out"]
        rec_of = lambda kernel, feats: conv_out_apply(  # noqa: E731
            {"kernel": kernel, "bias": conv_out["bias"]}, feats, m.dtype)
        x_rec = rec_of(conv_out["kernel"], h)
        nll, nll_metrics = _nll(m, s, x, x_rec, params["logvar"], lpips_params, x_feats)

        def weight_and_g():
            kernel, feats = jax.lax.stop_gradient(conv_out["kernel"]), jax.lax.stop_gradient(h)

            def nll_of(k):
                return _nll(m, s, x, rec_of(k, feats), params["logvar"], lpips_params, x_feats)[0]

            nll_grad = jax.grad(nll_of)(kernel)
            g_grad = jax.grad(lambda k: g_of_rec(rec_of(k, feats)))(kernel)
            return ae_losses.adaptive_weight(nll_grad, g_grad, s.disc_weight), g_of_rec(x_rec)

        d_weight, g_loss = jax.lax.cond(disc_on, weight_and_g, lambda: (jnp.float32(0), jnp.float32(0)))
        total = nll + reg + d_weight * disc_factor * g_loss
        metrics = {**metrics, **nll_metrics, "nll_loss": nll, "g_loss": g_loss, "d_weight": d_weight}
        return total, (x_rec, metrics, counts)

    (loss, (x_rec, metrics, counts)), grads = jax.value_and_grad(generator_loss, has_aux=True)(state.params)
    updates, opt_state = m.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    fake = jax.lax.stop_gradient(x_rec)

    def disc_grads():
        def d_loss_fn(dp):
            real_logits, stats = _disc_apply(m, dp, state.disc_batch_stats, x)
            fake_logits, stats = _disc_apply(m, dp, stats, fake)
            d_fn = ae_losses.hinge_d_loss if s.disc_loss == "hinge" else ae_losses.vanilla_d_loss
            return disc_factor * d_fn(real_logits, fake_logits), (stats, jnp.mean(real_logits), jnp.mean(fake_logits))

        (d_loss, aux), g = jax.value_and_grad(d_loss_fn, has_aux=True)(state.disc_params)
        return g, d_loss, aux

    def no_disc():
        zeros = jax.tree.map(jnp.zeros_like, state.disc_params)
        return zeros, jnp.float32(0), (state.disc_batch_stats, jnp.float32(0), jnp.float32(0))

    d_grads, d_loss, (batch_stats, logits_real, logits_fake) = jax.lax.cond(disc_on, disc_grads, no_disc)
    d_updates, disc_opt_state = m.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, d_updates)

    ema = state.ema_params
    if s.ema_decay > 0:
        ema = ema_update(ema, params["autoencoder"], ema_decay_at(state.step, s.ema_decay, True))
    code_counts = state.code_counts
    if s.is_vq:
        code_counts = 0.99 * code_counts + 0.01 * counts
        if s.dead_code_restart:
            params, code_counts = _restart_dead_codes(m, s, params, code_counts, x, state.step, k_restart)

    metrics = {
        **metrics, "loss": loss, "d_loss": d_loss, "disc_factor": disc_factor, "logits_real": logits_real,
        "logits_fake": logits_fake, "grad_norm": global_norm(grads), "disc_grad_norm": global_norm(d_grads),
        "logvar": params["logvar"],
    }
    new_state = AutoencoderState(
        step=state.step + 1, params=params, opt_state=opt_state, disc_params=disc_params,
        disc_batch_stats=batch_stats, disc_opt_state=disc_opt_state, ema_params=ema, code_counts=code_counts,
    )
    return new_state, metrics


def _restart_dead_codes(m: AutoencoderModules, s: AutoencoderSettings, params, code_counts, x, step, rng):
    """Every ``dead_code_restart_every`` steps, moves rarely used codes onto this batch's encoder outputs."""
    from lidiff.models.quantizer import restart_dead_codes

    threshold = s.dead_code_threshold

    def restart(args):
        params, counts = args
        ae = params["autoencoder"]
        h = m.model.apply({"params": ae}, x, method=m.model.encode)
        codebook = ae["quantize"]["embedding"]["embedding"]
        codebook = restart_dead_codes(codebook, counts, h.reshape(-1, h.shape[-1]), rng, threshold)
        ae = {**ae, "quantize": {**ae["quantize"], "embedding": {"embedding": codebook}}}
        return {**params, "autoencoder": ae}, jnp.maximum(counts, threshold)

    due = (step + 1) % s.dead_code_restart_every == 0
    return jax.lax.cond(due, restart, lambda args: args, (params, code_counts))


class AutoencoderTrainer:
    """Stage 1 built from its config: modules and optimizers (``modules``), step settings (``settings``), the
    module-level ``train_step`` with both bound, and ``init_state``."""

    def __init__(self, stage: ConfigDict, seed: int):
        self.cfg = stage
        self.dtype = compute_dtype(stage.train.dtype)
        if stage.loss.disc_loss not in ("hinge", "vanilla"):
            raise ConfigError(f"unknown config.autoencoder.loss.disc_loss {stage.loss.disc_loss!r}; use hinge or vanilla")
        if stage.loss.reconstruction not in ("l1", "l2"):
            raise ConfigError(f"unknown config.autoencoder.loss.reconstruction {stage.loss.reconstruction!r}; use l1 or l2")
        o = stage.optim
        self.modules = AutoencoderModules(
            model=builders.build_autoencoder(stage.model, self.dtype),
            disc=builders.build_discriminator(stage.loss, self.dtype),
            lpips=builders.build_lpips(self.dtype),
            tx=optax.adam(o.learning_rate, b1=o.b1, b2=o.b2),
            disc_tx=optax.adam(o.disc_learning_rate, b1=o.b1, b2=o.b2),
            dtype=self.dtype,
        )
        self.settings = AutoencoderSettings.from_config(stage, seed)
        self.model, self.disc, self.lpips = self.modules.model, self.modules.disc, self.modules.lpips
        self.tx, self.disc_tx = self.modules.tx, self.modules.disc_tx
        self.is_vq = self.settings.is_vq
        self.train_step = functools.partial(train_step, modules=self.modules, settings=self.settings)

    def init_state(self, rng: jax.Array) -> AutoencoderState:
        """Fresh state (call under ``jax.jit`` with replicated ``out_shardings``)."""
        r = self.cfg.model.resolution
        x = jnp.zeros((1, r, r, 3), jnp.float32)
        k_model, k_disc = jax.random.split(rng)
        if self.is_vq:
            ae = self.model.init(k_model, x)["params"]
        else:
            ae = self.model.init(k_model, x, sample_posterior=False)["params"]
        params = {"autoencoder": ae, "logvar": jnp.asarray(self.cfg.loss.logvar_init, jnp.float32)}
        disc_vars = self.disc.init(k_disc, x, train=False)
        ema = jax.tree.map(jnp.copy, ae) if self.cfg.train.ema_decay > 0 else {}
        counts = jnp.full((self.cfg.model.n_embed,), self.cfg.model.dead_code_threshold, jnp.float32) if self.is_vq else {}
        return AutoencoderState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            disc_params=disc_vars["params"],
            disc_batch_stats=disc_vars.get("batch_stats", {}),
            disc_opt_state=self.disc_tx.init(disc_vars["params"]),
            ema_params=ema,
            code_counts=counts,
        )

    def reconstruct(self, ae_params: Any, x: jax.Array) -> jax.Array:
        """Deterministic reconstruction (KL: posterior mode). x: [B, R, R, 3] in [-1, 1] -> same shape."""
        if self.is_vq:
            return self.model.apply({"params": ae_params}, x)[0]
        return self.model.apply({"params": ae_params}, x, sample_posterior=False)[0]


def checkpoint_meta(config: ConfigDict) -> dict:
    """What a stage-1 checkpoint carries besides arrays: enough to rebuild the model without the config."""
    return {"stage": STAGE, "model": config.autoencoder.model.to_dict(), "config": config.to_json()}


def train_autoencoder(config: ConfigDict, workdir: str) -> AutoencoderState:
    """Trains stage 1 into ``<workdir>/autoencoder`` (resuming from its latest checkpoint when there is one)."""
    stage = config.autoencoder
    mesh = parallel.mesh_from_config(config)
    parallel.check_batch_size(stage.train.batch_size, mesh, "config.autoencoder.train.batch_size")
    if config.data.resolution != stage.model.resolution:
        raise ConfigError(
            f"config.data.resolution ({config.data.resolution}) != config.autoencoder.model.resolution "
            f"({stage.model.resolution}); set them equal"
        )
    trainer = AutoencoderTrainer(stage, config.seed)
    lpips_params = parallel.put_replicated(load_lpips(stage.loss), mesh)
    loader = make_loader(config.data, stage.train.batch_size, config.seed)
    directory = stage_dir(workdir)
    checkpointer = Checkpointer(os.path.join(directory, "checkpoints"), keep=stage.train.keep_checkpoints)
    start = 0
    if checkpointer.latest_step() is None:
        state = init_sharded(trainer.init_state, mesh, jax.random.PRNGKey(config.seed))
    else:
        state, _ = checkpointer.restore(abstract_sharded(trainer.init_state, mesh, jax.random.PRNGKey(config.seed)))
        start = int(state.step)
        if start >= stage.train.num_steps:  # done: nothing to compile
            logging.info("autoencoder: already trained to step %d of %d", start, stage.train.num_steps)
            loader.close()
            checkpointer.close()
            return state
        logging.info("autoencoder: resuming from step %d", start)
    loader.batch_at(start)  # unreadable data fails here, before the step compiles
    n_params = sum(x.size for x in jax.tree.leaves(state.params["autoencoder"]))
    logging.info("autoencoder (%s): %.2fM params, %d devices, global batch %d", stage.model.kind, n_params / 1e6,
                 mesh.devices.size, stage.train.batch_size)
    r = stage.model.resolution
    example = {"image": np.zeros((stage.train.batch_size, r, r, 3), np.float32)}
    step_fn, _ = compile_step(trainer.train_step, mesh, state, example, lpips_params, name=STAGE)
    recon = jax.jit(trainer.reconstruct)

    def images(state: AutoencoderState, batch: dict) -> dict[str, np.ndarray]:
        x = batch["image"][:8]
        params = state.ema_params if stage.train.ema_decay > 0 else state.params["autoencoder"]
        x_rec = recon(params, x)
        return {"inputs": image_grid(to_uint8(x), ncols=8), "reconstructions": image_grid(to_uint8(x_rec), ncols=8)}

    writer = MetricWriter(directory)
    settings = LoopSettings(
        name=STAGE, num_steps=stage.train.num_steps, batch_size=stage.train.batch_size,
        log_every=stage.train.log_every, checkpoint_every=stage.train.checkpoint_every,
        image_every=stage.train.image_every,
    )
    try:
        state = train_loop(settings, state, start, step_fn, (lpips_params,), loader, mesh, checkpointer,
                           checkpoint_meta(config), writer, images)
    finally:
        writer.close()
        checkpointer.close()
    return state
