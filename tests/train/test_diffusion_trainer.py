"""Stage-2 trainer: scale_factor, latents and the latent cache, EMA, p_uncond, AdamW, resume, refusals, the shipped
configs, and ``sample.py`` end to end.

Everything runs on one tiny setup: a KL first stage (16x16 RGB -> 8x8x2 latents, ch 32, random weights saved as a
stage-1 checkpoint) and a one-level class-conditional UNet (32 channels, 3 classes + the null label) on synthetic
labelled images, global batch 8 over the 8 forced CPU devices. A persistent compilation cache private to this
module (switched off again afterwards) lets the several ``train_diffusion`` runs compile each step once.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from configs import base
from lidiff import parallel
from lidiff.checkpoint import Checkpointer
from lidiff.data import transforms
from lidiff.data.latents import CachedLatentLoader
from lidiff.train import builders
from lidiff.train.autoencoder import AutoencoderTrainer
from lidiff.train.autoencoder import checkpoint_meta as ae_checkpoint_meta
from lidiff.train.common import compile_step, make_loader
from lidiff.train.diffusion import DiffusionTrainer, make_optimizer, train_diffusion, write_final_samples
from lidiff.ldm import FirstStage, posterior_arrays
from lidiff.runs import load_first_stage
from tests.compilation_cache import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RES, BATCH, CLASSES, LATENT_CH = 16, 8, 3, 2
LATENT_SHAPE = (RES // 2, RES // 2, LATENT_CH)
NUM_EXAMPLES = 40  # 5 global batches per epoch
SAMPLE_STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
    """Caches compiled executables on disk for this module only (restores JAX's settings afterwards)."""
    with compilation_cache(str(tmp_path_factory.getbasetemp() / "jax_compilation_cache_diffusion")):
        yield


def first_stage_model(kind: str = "kl") -> ConfigDict:
    return base.autoencoder_model(kind, ch_mult=(1, 2), z_channels=LATENT_CH, embed_dim=LATENT_CH, ch=32,
                                  num_res_blocks=1, resolution=RES, n_embed=16 if kind == "vq" else 0)


def tiny_config(fs_workdir: str = "", *, seed: int = 0, num_steps: int = 2, scale_by_std: bool = True,
                scale_factor: float = 1.0, cache: bool = True, p_uncond: float = 0.0, learning_rate: float = 1e-3,
                weight_decay: float = 0.0, ema_decay: float = 0.9999) -> ConfigDict:
    """The tiny class-conditional LDM experiment (see the module docstring)."""
    unet = base.unet_model(in_channels=LATENT_CH, out_channels=LATENT_CH, model_channels=32, channel_mult=(1,),
                           num_res_blocks=1, attention_resolutions=(), num_heads=2, num_head_channels=-1,
                           legacy=False, use_spatial_transformer=True, context_dim=16)
    d = base.diffusion_stage(unet, batch_size=BATCH, learning_rate=learning_rate)
    d.conditioning.kind = "class"
    d.conditioning.num_classes = CLASSES
    d.conditioning.embed_dim = 16
    d.conditioning.p_uncond = p_uncond
    d.first_stage.workdir = fs_workdir
    d.first_stage.scale_by_std = scale_by_std
    d.first_stage.scale_factor = scale_factor
    d.latent_cache.enabled = cache
    d.optim.weight_decay = weight_decay
    d.train.update(dict(num_steps=num_steps, ema_decay=ema_decay, log_every=1, sample_every=0, checkpoint_every=2,
                        keep_checkpoints=10))
    d.sample.update(dict(steps=SAMPLE_STEPS, guidance_scale=2.0, num_images=4, final_samples_per_class=0))
    ae = base.autoencoder_stage(first_stage_model(), base.autoencoder_loss(perceptual_weight=0.0, disc_num_layers=1,
                                                                         disc_ndf=8), batch_size=BATCH,
                                learning_rate=1e-3)
    data = base.data_config("synthetic", resolution=RES, num_examples=NUM_EXAMPLES, num_classes=CLASSES,
                            num_threads=0)
    config = base.experiment(("diffusion",), data, ae, d, seed=seed)
    config.lock()
    return config


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_close(a, b, **tol):
    la, lb = jax.tree.leaves(host(a)), jax.tree.leaves(host(b))
    assert jax.tree.structure(host(a)) == jax.tree.structure(host(b))
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, **tol)


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fs_workdir(tmp_path_factory):
    """A stage-1 workdir holding a (randomly initialised) tiny KL autoencoder checkpoint, as stage 1 saves it."""
    workdir = str(tmp_path_factory.mktemp("stage1"))
    config = tiny_config()
    trainer = AutoencoderTrainer(config.autoencoder, seed=0)
    state = jax.jit(trainer.init_state)(jax.random.PRNGKey(0))
    checkpointer = Checkpointer(os.path.join(workdir, "autoencoder", "checkpoints"))
    checkpointer.save(1, state, ae_checkpoint_meta(config))
    checkpointer.close()
    return workdir


@pytest.fixture(scope="module")
def first_stage(fs_workdir):
    return load_first_stage(tiny_config(fs_workdir), fs_workdir)


@pytest.fixture(scope="module")
def runs(fs_workdir, tmp_path_factory):
    """The ``train_diffusion`` runs several tests read (latent cache on, scale_by_std):

    - ``resumed``: 2 steps, then (a new call) resumed to 4 steps, seed 0;
    - ``straight``: 4 steps in one call, seed 0;
    - ``new_data``: a copy of ``resumed`` at step 2 whose latent cache is replaced by other data (posteriors
      scaled by 3, so a recomputed scale_factor would be 1/3 of the saved one), resumed to 3 steps;
    - ``fixed_scale``: 1 step, scale_by_std=False, scale_factor=0.37.

    All runs share one compiled step (through the compilation cache): only data, step counts and state differ.
    """
    root = tmp_path_factory.mktemp("stage2")
    w = {name: str(root / name) for name in ("resumed", "straight", "new_data", "fixed_scale")}
    out = {"workdirs": w, "states": {}}
    out["states"]["resumed@2"] = host(train_diffusion(tiny_config(fs_workdir, num_steps=2), w["resumed"]))
    shutil.copytree(w["resumed"], w["new_data"])
    cache = os.path.join(w["new_data"], "diffusion", "latents.npz")
    with np.load(cache) as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(cache, **{**arrays, "mean": 3.0 * arrays["mean"], "logvar": arrays["logvar"] + 2.0 * np.log(3.0)})
    out["states"]["resumed"] = host(train_diffusion(tiny_config(fs_workdir, num_steps=4), w["resumed"]))
    out["states"]["straight"] = host(train_diffusion(tiny_config(fs_workdir, num_steps=4), w["straight"]))
    out["states"]["new_data"] = host(train_diffusion(tiny_config(fs_workdir, num_steps=3), w["new_data"]))
    out["states"]["fixed_scale"] = host(train_diffusion(
        tiny_config(fs_workdir, num_steps=1, scale_by_std=False, scale_factor=0.37), w["fixed_scale"]))
    return out


@pytest.fixture(scope="module")
def run_trainer(fs_workdir, first_stage):
    """A trainer with the runs' config (for sampling from their states)."""
    return DiffusionTrainer(tiny_config(fs_workdir).diffusion, first_stage[0], seed=0)


class Stepper:
    """``train_step`` compiled exactly as ``train_diffusion`` compiles it (8-device mesh, batches of cached
    encodings), so the p_uncond=0 one is the runs' executable; called on host states, returning host states."""

    def __init__(self, trainer: DiffusionTrainer, state, fs_params):
        self.trainer, self.mesh = trainer, parallel.make_mesh()
        self.fs_params = parallel.put_replicated(fs_params, self.mesh)
        example = {"mean": np.zeros((BATCH,) + LATENT_SHAPE, np.float32),
                   "logvar": np.zeros((BATCH,) + LATENT_SHAPE, np.float32), "label": np.zeros((BATCH,), np.int32)}
        self.step, _ = compile_step(trainer.train_step, self.mesh, state, example, self.fs_params, name="test")

    def __call__(self, state, batch):
        state = parallel.put_replicated(state, self.mesh)  # a fresh copy: the step donates it
        state, metrics = self.step(state, parallel.global_batch(batch, self.mesh), self.fs_params)
        return host(state), host(metrics)


@pytest.fixture(scope="module")
def steppers(first_stage):
    """Steppers without weight decay for p_uncond 0 and 1, and a shared initial state (host arrays).

    Zero-initialised kernels (the UNet's output conv, each resblock's last conv, each transformer's proj_out)
    would stop gradients in the first step; the state gets random ones (in params and EMA alike) so that every
    param is trained from step 1.
    """
    fs, fs_params = first_stage
    trainers = {p: DiffusionTrainer(tiny_config(p_uncond=p).diffusion, fs, seed=0) for p in (0.0, 1.0)}
    mesh = parallel.make_mesh()
    init = jax.jit(trainers[0.0].init_state, static_argnums=(2,), out_shardings=parallel.replicated(mesh))
    state = host(init(jax.random.PRNGKey(0), jnp.float32(1.0), LATENT_SHAPE))
    rng = np.random.default_rng(0)

    def randomize(path, x):
        if jax.tree_util.keystr(path).endswith("['kernel']") and not x.any():
            return 0.05 * rng.standard_normal(x.shape).astype(np.float32)
        return x

    assert not state.params["unet"]["out_2"]["kernel"].any()
    params = jax.tree_util.tree_map_with_path(randomize, state.params)
    state = state.replace(params=params, ema_params=jax.tree.map(np.copy, params))
    return {p: Stepper(t, state, fs_params) for p, t in trainers.items()}, state, fs_params


def cache_batch(step: int, seed: int = 0, path: str = "") -> dict:
    return CachedLatentLoader(path, global_batch_size=BATCH, seed=seed).batch_at(step)


def first_batch_scale(trainer: DiffusionTrainer, fs_params, batch: dict, seed: int) -> float:
    """1 / std (ddof=1) of the latents of ``batch`` drawn as stage 2 draws them for scale_by_std."""
    z = trainer.latents({k: v for k, v in batch.items() if k != "label"}, fs_params, jax.random.PRNGKey(seed))
    return float(1.0 / np.std(np.asarray(z, np.float64), ddof=1))


# ------------------------------------------------------------------------------------------------ scale_factor


def test_scale_factor_is_one_over_std_of_first_batch_and_saved(runs, run_trainer, first_stage):
    w = runs["workdirs"]["resumed"]
    cache = os.path.join(w, "diffusion", "latents.npz")
    expected = first_batch_scale(run_trainer, first_stage[1], cache_batch(0, path=cache), seed=0)
    z = np.asarray(run_trainer.latents({k: v for k, v in cache_batch(0, path=cache).items() if k != "label"},
                                       first_stage[1], jax.random.PRNGKey(0)), np.float64)
    assert abs(1.0 / np.std(z, ddof=0) - expected) / expected > 1e-5  # ddof is distinguishable here
    state = runs["states"]["resumed@2"]
    np.testing.assert_allclose(float(state.scale_factor), expected, rtol=2e-6)
    checkpointer = Checkpointer(os.path.join(w, "diffusion", "checkpoints"))
    for step in (2, 4):
        meta = checkpointer.restore_meta(step)
        np.testing.assert_allclose(meta["scale_factor"], expected, rtol=2e-6)
        saved, _, _ = checkpointer.restore_items(step=step, names=("scale_factor",))
        np.testing.assert_allclose(float(saved["scale_factor"]), expected, rtol=2e-6)
    checkpointer.close()


def test_scale_factor_not_recomputed_on_resume(runs, run_trainer, first_stage):
    w = runs["workdirs"]["new_data"]
    saved = float(runs["states"]["resumed@2"].scale_factor)
    cache = os.path.join(w, "diffusion", "latents.npz")
    recomputed = first_batch_scale(run_trainer, first_stage[1], cache_batch(0, path=cache), seed=0)
    assert abs(recomputed - saved) / saved > 0.5  # a recomputation on the new data would show
    state = runs["states"]["new_data"]
    assert int(state.step) == 3
    assert float(state.scale_factor) == saved
    checkpointer = Checkpointer(os.path.join(w, "diffusion", "checkpoints"))
    assert checkpointer.restore_meta(3)["scale_factor"] == saved
    checkpointer.close()


def test_scale_factor_as_configured_without_scale_by_std(runs):
    assert float(runs["states"]["fixed_scale"].scale_factor) == pytest.approx(0.37, rel=1e-7)
    w = runs["workdirs"]["fixed_scale"]
    checkpointer = Checkpointer(os.path.join(w, "diffusion", "checkpoints"))
    assert checkpointer.restore_meta(1)["scale_factor"] == pytest.approx(0.37, rel=1e-7)
    checkpointer.close()


def test_resume_equals_uninterrupted_run(runs):
    resumed, straight = runs["states"]["resumed"], runs["states"]["straight"]
    assert int(resumed.step) == int(straight.step) == 4
    assert_trees_close(resumed, straight, rtol=1e-6, atol=1e-7)
    # ... and the runs did train: 4 steps moved the params away from the step-2 state
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), resumed.params,
                                         runs["states"]["resumed@2"].params))
    assert max(moved) > 1e-4


# ---------------------------------------------------------------------------------------------------- latents


def test_kl_latents_are_posterior_samples_times_scale(first_stage, steppers):
    fs, fs_params = first_stage
    step, state = steppers[0][0.0], steppers[1]
    trainer = step.trainer
    x = jax.random.uniform(jax.random.PRNGKey(3), (BATCH, RES, RES, 3), minval=-1.0, maxval=1.0)
    enc = jax.jit(lambda p, x: posterior_arrays(fs.encode(p, x)))(fs_params, x)
    mean, std = np.asarray(enc["mean"]), np.exp(0.5 * np.asarray(enc["logvar"]))
    assert std.min() > 1e-3  # the posterior is not a point mass, so sampling is visible
    scale, n = 1.7, 4000
    latents = jax.jit(lambda batch, p, scale, k: trainer.latents(batch, p, k) * scale)
    key = jax.random.PRNGKey(4)
    # from images = from their encoding, for the same key
    np.testing.assert_allclose(np.asarray(latents({"image": x}, fs_params, scale, key)),
                               np.asarray(latents(enc, fs_params, scale, key)), rtol=1e-5, atol=1e-6)
    keys = jax.random.split(key, n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: trainer.latents(enc, fs_params, k) * scale))(keys))
    assert np.abs(draws[0] - draws[1]).max() > 1e-3  # fresh noise per key
    np.testing.assert_array_less(np.abs(draws.mean(0) - scale * mean), 5 * scale * std / np.sqrt(n))
    np.testing.assert_allclose(draws.std(0), scale * std, rtol=0.1)
    # the train step multiplies by state.scale_factor: same rng, so the latent std metric scales exactly
    batch = {**host(enc), "label": np.zeros((BATCH,), np.int32)}
    _, m1 = step(state.replace(scale_factor=np.float32(1.0)), batch)
    _, m2 = step(state.replace(scale_factor=np.float32(2.5)), batch)
    np.testing.assert_allclose(float(m2["latent_std"]), 2.5 * float(m1["latent_std"]), rtol=1e-5)


def test_vq_latents_are_prequantisation_times_scale():
    model = builders.build_autoencoder(first_stage_model("vq"))
    trainer = DiffusionTrainer(tiny_config().diffusion, FirstStage(model=model, kind="vq"), seed=0)
    x = jax.random.uniform(jax.random.PRNGKey(5), (2, RES, RES, 3), minval=-1.0, maxval=1.0)

    @jax.jit
    def run(x):
        params = model.init(jax.random.PRNGKey(6), x)["params"]
        z = trainer.latents({"image": x}, params, jax.random.PRNGKey(0)) * 0.5
        pre = model.apply({"params": params}, x, method=lambda m, x: m.quant_conv(m.encoder(x)))
        z_q = model.apply({"params": params}, pre, method=lambda m, h: m.quantize_latent(h)[0])
        z_cached = trainer.latents({"mean": pre}, params, jax.random.PRNGKey(1)) * 0.5  # cache entry (no logvar)
        return z, pre, z_q, z_cached

    z, pre, z_q, z_cached = host(run(x))
    np.testing.assert_allclose(z, 0.5 * pre, rtol=1e-6, atol=1e-7)
    assert np.abs(pre - z_q).max() > 1e-3  # quantising would have changed them
    np.testing.assert_allclose(z_cached, z, rtol=1e-6, atol=1e-7)


def test_latent_cache_holds_the_encoder_posterior(runs, run_trainer, first_stage):
    fs, fs_params = first_stage
    config = tiny_config()
    path = os.path.join(runs["workdirs"]["straight"], "diffusion", "latents.npz")
    with np.load(path) as data:
        cached = {k: data[k] for k in data.files}
    assert set(cached) == {"mean", "logvar", "label", "_fields"}
    assert list(cached["_fields"]) == ["label"]
    assert cached["mean"].shape == (NUM_EXAMPLES,) + LATENT_SHAPE
    loader = make_loader(config.data, BATCH, config.seed)
    source = loader.source
    images = np.stack([transforms.to_float(transforms.resize_center_crop(source[i]["image"], RES))
                       for i in range(NUM_EXAMPLES)])
    enc = jax.jit(lambda p, x: posterior_arrays(fs.encode(p, x)))(fs_params, images)
    np.testing.assert_allclose(cached["mean"], np.asarray(enc["mean"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached["logvar"], np.asarray(enc["logvar"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cached["label"], [source[i]["label"] for i in range(NUM_EXAMPLES)])
    # training batches from the cache = training batches from images (same rows, same posterior, same draw)
    latents = jax.jit(run_trainer.latents)
    for step in (0, 6):  # 6 lies in the second epoch
        from_images = loader.batch_at(step)
        from_cache = cache_batch(step, path=path)
        np.testing.assert_array_equal(from_cache["label"], from_images["label"])
        key = jax.random.PRNGKey(step)
        z_img = latents({"image": from_images["image"]}, fs_params, key)
        z_cache = latents({"mean": from_cache["mean"], "logvar": from_cache["logvar"]}, fs_params, key)
        np.testing.assert_allclose(np.asarray(z_cache), np.asarray(z_img), rtol=1e-5, atol=1e-5)
    loader.close()


# ----------------------------------------------------------------------------------------- EMA and sampling


def labelled_batch(seed: int = 7) -> dict:
    """8 random posteriors (as the latent cache holds them) with labels 0 and 1 only (class 2 unused)."""
    rng = np.random.default_rng(seed)
    return {"mean": rng.standard_normal((BATCH,) + LATENT_SHAPE).astype(np.float32),
            "logvar": rng.uniform(-6.0, -2.0, (BATCH,) + LATENT_SHAPE).astype(np.float32),
            "label": np.array([0, 1] * (BATCH // 2), np.int32)}


def test_ema_follows_warmup_schedule(steppers):
    step, state0 = steppers[0][0.0], steppers[1]
    batch = labelled_batch()
    state1, m1 = step(state0, batch)
    state2, m2 = step(state1, batch)
    d0, d1 = min(0.9999, 1 / 10), min(0.9999, 2 / 11)  # (1 + n) / (10 + n) after n = 0, 1 updates
    assert float(m1["ema_decay"]) == pytest.approx(d0, rel=1e-6)
    assert float(m2["ema_decay"]) == pytest.approx(d1, rel=1e-6)
    ema1 = jax.tree.map(lambda e, p: d0 * e + (1 - d0) * p, state0.ema_params, host(state1.params))
    assert_trees_close(state1.ema_params, ema1, rtol=1e-5, atol=1e-7)
    ema2 = jax.tree.map(lambda e, p: d1 * e + (1 - d1) * p, ema1, host(state2.params))
    assert_trees_close(state2.ema_params, ema2, rtol=1e-5, atol=1e-7)
    assert not np.allclose(host(state2.ema_params)["unet"]["out_2"]["bias"], host(state2.params)["unet"]["out_2"]["bias"])


def test_final_samples_use_ema_params(runs, run_trainer, first_stage, tmp_path):
    config = tiny_config()
    config.diffusion.sample.final_samples_per_class = 2
    state = runs["states"]["straight"]
    nan_params = jax.tree.map(lambda x: np.full_like(x, np.nan), state.params)
    other_ema = jax.tree.map(lambda x: x + 0.05 * np.sign(x), state.ema_params)

    def final_samples(s, name):
        path = write_final_samples(config, run_trainer, s, first_stage[1], LATENT_SHAPE, str(tmp_path / name))
        with np.load(path) as data:
            return data["images"], data["labels"]

    images, labels = final_samples(state, "a")
    assert images.shape == (2 * CLASSES, RES, RES, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(final_samples(state.replace(params=nan_params), "b")[0], images)
    assert np.abs(final_samples(state.replace(ema_params=other_ema), "c")[0].astype(int) - images).max() > 0


# ----------------------------------------------------------------------------------------- p_uncond and AdamW


def embedding_rows_changed(state_before, state_after) -> np.ndarray:
    """bool [CLASSES + 1]: which class-embedding rows the step moved (weight decay is 0 here)."""
    a = host(state_before.params)["cond"]["embedding"]["embedding"]
    b = host(state_after.params)["cond"]["embedding"]["embedding"]
    return np.abs(a - b).max(axis=1) > 0


@pytest.mark.parametrize("p_uncond, moved", [(1.0, [False, False, False, True]), (0.0, [True, True, False, False])])
def test_p_uncond_all_or_none(steppers, p_uncond, moved):
    step, state0 = steppers[0][p_uncond], steppers[1]
    assert int(step.trainer.ldm.null_inputs(1)["label"][0]) == CLASSES
    state1, _ = step(state0, labelled_batch())
    np.testing.assert_array_equal(embedding_rows_changed(state0, state1), moved)


def test_train_step_uses_learning_rate_as_given(steppers):
    """Adam's first step moves each param by lr * |g| / (|g| + eps): the largest move is lr itself, not lr
    scaled by the batch size or the 8 devices."""
    step, state0 = steppers[0][0.0], steppers[1]
    assert step.trainer.cfg.optim.learning_rate == 1e-3
    state1, _ = step(state0, labelled_batch())
    moves = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), host(state1.params), state0.params))
    assert max(moves) == pytest.approx(1e-3, rel=1e-3)


def test_warmup_schedule_and_adamw_by_hand():
    lr, warmup = 0.1, 4
    optim = tiny_config(learning_rate=lr).diffusion.optim.to_dict()
    optim.update(warmup_steps=warmup, weight_decay=0.0)
    tx = make_optimizer(ConfigDict(optim))
    params = {"w": jnp.array([0.5, -2.0, 3.0])}
    grads = {"w": jnp.array([0.3, -1.0, 2.0])}
    opt_state = tx.init(params)
    for k in range(7):
        updates, opt_state = tx.update(grads, opt_state, params)
        lr_k = lr * min(k, warmup) / warmup  # linear warm-up from 0, then lr as given
        # constant gradient: Adam's bias-corrected moments are g and g^2, so the step is -lr_k * sign(g)
        np.testing.assert_allclose(np.asarray(updates["w"]), -lr_k * np.sign(grads["w"]), rtol=1e-4, atol=1e-9)
    # with weight decay, AdamW's first step by hand: -lr * (g / (|g| + eps) + wd * p)
    optim.update(warmup_steps=0, weight_decay=0.01)
    tx = make_optimizer(ConfigDict(optim))
    updates, _ = tx.update(grads, tx.init(params), params)
    g, p = np.asarray(grads["w"]), np.asarray(params["w"])
    np.testing.assert_allclose(np.asarray(updates["w"]), -lr * (g / (np.abs(g) + 1e-8) + 0.01 * p), rtol=1e-4)


def test_grad_clipping_when_set():
    optim = tiny_config(learning_rate=0.1, weight_decay=0.0).diffusion.optim.to_dict()
    params = {"w": jnp.zeros(3)}
    g1, g2 = {"w": jnp.array([6.0, 0.0, 8.0])}, {"w": jnp.array([0.01, -0.02, 0.0])}  # norms 10 and < 1

    def run(tx, grads):
        state, out = tx.init(params), []
        for g in grads:
            u, state = tx.update(g, state, params)
            out.append(np.asarray(u["w"]))
        return out

    clipped = run(make_optimizer(ConfigDict({**optim, "grad_clip_norm": 1.0})), [g1, g2])
    plain = optax.adamw(0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    by_hand = run(plain, [jax.tree.map(lambda g: g / 10.0, g1), g2])  # g1 rescaled to norm 1, g2 kept
    unclipped = run(make_optimizer(ConfigDict({**optim, "grad_clip_norm": 0.0})), [g1, g2])
    for a, b in zip(clipped, by_hand):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert np.abs(unclipped[1] - clipped[1]).max() > 1e-3


# -------------------------------------------------------------------------------------------------- refusals


def test_missing_first_stage_names_path_and_fix(tmp_path):
    config = tiny_config()  # first_stage.workdir "" = this workdir's autoencoder stage
    with pytest.raises(FileNotFoundError) as e:
        train_diffusion(config, str(tmp_path / "fresh"))
    message = str(e.value)
    assert os.path.join(str(tmp_path / "fresh"), "autoencoder", "checkpoints") in message
    assert "first_stage.workdir" in message and "stage 1" in message.lower()
    other = tmp_path / "elsewhere"
    config = tiny_config(str(other))
    with pytest.raises(FileNotFoundError, match=str(other / "autoencoder" / "checkpoints")):
        train_diffusion(config, str(tmp_path / "fresh2"))


def test_celebahq_without_data_or_first_stage_says_how_to_fix_both(tmp_path):
    workdir = tmp_path / "celebahq"
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/celebahq_f4.py", f"--workdir={workdir}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    err = result.stderr
    assert "Traceback" not in err and "two things are missing" in err
    assert "config.data.path" in err  # an image folder ...
    assert "celeb_a_hq" in err and "manual_dir" in err  # ... or tfds with its manual dir
    assert str(workdir / "autoencoder" / "checkpoints") in err  # and the missing first stage
    assert "first_stage.workdir" in err
    assert "compiled" not in err  # it stopped before compiling anything


def unet_param_count(trainer: DiffusionTrainer, config: ConfigDict) -> int:
    shape = trainer.latent_shape(config.data.resolution)
    shapes = jax.eval_shape(lambda rng: trainer.ldm.init_params(rng, shape), jax.random.PRNGKey(0))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["unet"]))


@pytest.mark.parametrize("name, millions", [("celebahq_f4", (274.06, 274.06)), ("ffhq_f4", (274.06, 274.06)),
                                            ("lsun_bedrooms_f4", (274.06, 274.06)),
                                            ("lsun_churches_f8", (294.97, 294.97)), ("quickstart", (0.1, 20.0))])
def test_shipped_stage2_configs_build(name, millions):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    d = config.diffusion
    first = builders.build_autoencoder(config.autoencoder.model)
    assert d.model.in_channels == d.model.out_channels == first.embed_dim
    assert config.data.resolution == config.autoencoder.model.resolution
    trainer = DiffusionTrainer(d, FirstStage(model=first, kind=config.autoencoder.model.kind), seed=config.seed)
    n = unet_param_count(trainer, config) / 1e6
    low, high = millions
    assert low <= round(n, 2) <= high, n


# -------------------------------------------------------------------------------------------------- sample.py


def write_config_file(path, config: ConfigDict) -> str:
    """A config file for the entry points that returns ``config`` (stored next to it as JSON)."""
    json_path = str(path) + ".json"
    with open(json_path, "w") as f:
        f.write(config.to_json())
    with open(path, "w") as f:
        f.write("import json\nfrom ml_collections import ConfigDict\n\n\ndef get_config():\n"
                f"    with open({json_path!r}) as f:\n        return ConfigDict(json.load(f))\n")
    return str(path)


@pytest.fixture(scope="module")
def ema_only_workdir(runs, tmp_path_factory):
    """A copy of the ``straight`` run whose latest checkpoint has zeroed raw params (its EMA params intact)."""
    checkpointer = Checkpointer(os.path.join(runs["workdirs"]["straight"], "diffusion", "checkpoints"))
    meta = checkpointer.restore_meta(4)
    checkpointer.close()
    state = runs["states"]["straight"]
    state = state.replace(params=jax.tree.map(np.zeros_like, state.params))
    workdir = str(tmp_path_factory.mktemp("ema_only") / "run")
    out = Checkpointer(os.path.join(workdir, "diffusion", "checkpoints"))
    out.save(4, state, meta)
    out.close()
    return workdir


def run_sample_py(config_file: str | None, workdir: str, outdir: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device, as a user runs it
    config = [f"--config={config_file}"] if config_file else []  # None: the config saved with the run
    result = subprocess.run(
        [sys.executable, "sample.py", *config, f"--workdir={workdir}", f"--outdir={outdir}",
         "--num_samples=6", "--batch_size=6", f"--steps={SAMPLE_STEPS}", "--guidance_scale=2.0", "--seed=3",
         *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_sample_py_end_to_end_with_ema_params(runs, fs_workdir, ema_only_workdir, run_trainer, first_stage,
                                              tmp_path):
    config_file = write_config_file(tmp_path / "tiny_ldm.py", tiny_config(fs_workdir))
    outdir = tmp_path / "samples"
    run_sample_py(config_file, ema_only_workdir, str(outdir))
    with np.load(outdir / "samples.npz") as data:
        images, labels = data["images"], data["labels"]
    assert images.shape == (6, RES, RES, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2])  # round-robin over the classes
    pngs = sorted(os.listdir(outdir / "images"))
    assert len(pngs) == 6 and pngs[0] == "000000_class0.png"
    assert (outdir / "samples_grid.png").exists()
    # the raw params are zero, so these images can only come from the EMA params: compare with them here
    state = runs["states"]["straight"]
    expected = run_trainer.ldm.generate(state.ema_params, first_stage[1], state.scale_factor,
                                        jax.random.PRNGKey(3), num=6, latent_shape=LATENT_SHAPE, inputs={"label": labels},
                                        sampler="ddim", steps=SAMPLE_STEPS, guidance_scale=2.0, batch_size=6,
                                        mesh=parallel.make_mesh(jax.devices()[:1]))  # sample.py has one device
    expected = np.clip(np.round((expected + 1.0) * 127.5), 0, 255)
    assert np.abs(images.astype(np.float64) - expected).max() <= 1


def test_sample_py_larger_size_from_an_8_device_run_without_config(runs, tmp_path):
    """2x the training size gives 2x images; the run was trained (and saved) on 8 devices, sample.py has one;
    no --config: the model is rebuilt from the config saved with the checkpoint."""
    outdir = tmp_path / "big"
    run_sample_py(None, runs["workdirs"]["straight"], str(outdir), f"--height={2 * RES}", f"--width={2 * RES}")
    with np.load(outdir / "samples.npz") as data:
        assert data["images"].shape == (6, 2 * RES, 2 * RES, 3)
        assert data["images"].std() > 0
        assert str(data["sampler"]) == "ddim" and int(data["steps"]) == SAMPLE_STEPS and int(data["step"]) == 4


# ------------------------------------------------------------------------------------------ in-training FID


def eval_config(**overrides) -> ConfigDict:
    cfg = base.diffusion_stage(base.unet_model(), batch_size=BATCH, learning_rate=1e-3).eval
    cfg.update(dict(every=2, num_samples=4, batch_size=4, steps=SAMPLE_STEPS, allow_random_inception=True))
    cfg.update(overrides)
    return cfg


def test_in_training_fid_scores_the_ema_samples(runs, run_trainer, first_stage, tmp_path):
    from lidiff.eval.features import fid_of_images
    from lidiff.metrics.fid import FeatureStats, load_stats, save_stats
    from lidiff.models.inception import random_inception_variables
    from lidiff.train.evaluator import generate_for_eval, make_fid_evaluator

    rng = np.random.default_rng(0)
    features = rng.normal(size=(64, 2048))
    save_stats(str(tmp_path / "ref.npz"), FeatureStats(features.mean(0), np.cov(features, rowvar=False), 64))
    cfg = eval_config(reference_stats=str(tmp_path / "ref.npz"))
    generate = generate_for_eval(run_trainer.ldm, first_stage[1], LATENT_SHAPE, cfg,
                                 lambda n: {"label": np.arange(n) % CLASSES})
    evaluate = make_fid_evaluator(cfg, generate)
    state = runs["states"]["straight"]
    scalars = evaluate(state, 4)
    assert set(scalars) == {"eval/fid_random_inception", "eval/num_samples", "eval/seconds"}  # never "eval/fid"
    assert scalars["eval/num_samples"] == 4 and scalars["eval/seconds"] > 0
    images = generate(state, 4, 4)
    assert images.shape == (4, RES, RES, 3) and images.dtype == np.uint8
    expected = fid_of_images(images, load_stats(str(tmp_path / "ref.npz")), random_inception_variables(0),
                             batch_size=4)
    assert np.isfinite(expected) and scalars["eval/fid_random_inception"] == pytest.approx(expected, rel=1e-6)
    zeroed = state.replace(ema_params=jax.tree.map(np.zeros_like, state.ema_params))
    assert np.abs(generate(zeroed, 4, 4).astype(int) - images).max() > 10  # the samples come from the EMA params


def test_in_training_fid_refuses_missing_inputs_before_training(tmp_path):
    from lidiff.errors import MissingInputError
    from lidiff.train.evaluator import make_fid_evaluator

    assert make_fid_evaluator(eval_config(every=0), None) is None  # off by default: nothing is checked
    with pytest.raises(MissingInputError, match=r"config\.diffusion\.eval\.reference_stats=.*--save_stats"):
        make_fid_evaluator(eval_config(reference_stats=str(tmp_path / "none.npz")), None)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(MissingInputError, match=r"(?s)config\.diffusion\.eval\.inception_weights.*lidiff\.convert"):
        make_fid_evaluator(eval_config(reference_stats=str(tmp_path / "ref.npz"), allow_random_inception=False),
                           None)


def test_eval_command_samples_a_run_directory(runs, fs_workdir, tmp_path, capsys):
    """``python -m lidiff.eval --samples <run dir>``: N EMA samples through lidiff.runs, scored against the run's
    own data config (random Inception, labelled), with the sampler settings and checkpoint step recorded."""
    from lidiff.eval.__main__ import run

    config_file = write_config_file(tmp_path / "tiny_ldm.py", tiny_config(fs_workdir))
    result = run(["--samples", runs["workdirs"]["straight"], "--num_samples", "4", "--sample_batch_size", "4",
                  "--steps", str(SAMPLE_STEPS), "--guidance_scale", "2", "--reference", config_file,
                  "--num_reference", "8", "--batch_size", "4", "--allow_random_inception", "--no_progress",
                  "--max_pr_features", "8", "--kid_subset_size", "4", "--kid_subsets", "2"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert np.isfinite(result["fid"]) and result["random_inception"] is True
    assert result["num_samples"] == 4 and result["num_reference"] == 8
    samples = result["samples"]
    assert samples["kind"] == "run directory (sampled)" and samples["checkpoint_step"] == 4
    assert samples["sampler_settings"]["steps"] == SAMPLE_STEPS and samples["sampler_settings"]["guidance_scale"] == 2
    assert printed and all("random" in line.lower() for line in printed)


def test_eval_command_scores_a_first_stage(fs_workdir, tmp_path, capsys):
    """``python -m lidiff.eval --autoencoder <run dir> --reference <config>``: the paper's Tab. 8 columns of the
    first stage over the config's images (random Inception for rFID, labelled)."""
    from lidiff.eval.__main__ import run

    config_file = write_config_file(tmp_path / "tiny_ldm.py", tiny_config(fs_workdir))
    result = run(["--autoencoder", fs_workdir, "--reference", config_file, "--num_reference", "4", "--batch_size",
                  "4", "--allow_random_inception", "--no_progress", "--out", str(tmp_path / "ae.json")])
    printed = capsys.readouterr().out.strip().splitlines()
    assert result["kind"] == "kl" and result["checkpoint_step"] == 1 and result["num_images"] == 4
    assert 0 < result["psnr"] < 60 and -1 <= result["ssim"] <= 1 and np.isfinite(result["rfid"])
    assert all("RANDOM INCEPTION" in line for line in printed)
    with open(tmp_path / "ae.json") as f:
        assert json.load(f)["psnr"] == pytest.approx(result["psnr"])


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0)])
def test_sharded_generate_gives_the_one_device_images(runs, run_trainer, first_stage, sampler, eta):
    """The sampling batch split over 8 devices gives the 1-device images (noise included: random draws do not
    depend on the split), and a request that does not divide over the devices is padded, not refused."""
    state = runs["states"]["straight"]
    kwargs = dict(num=8, latent_shape=LATENT_SHAPE, inputs={"label": np.arange(8) % CLASSES}, sampler=sampler,
                  steps=SAMPLE_STEPS, eta=eta, guidance_scale=2.0, batch_size=8)
    one = parallel.make_mesh(jax.devices()[:1])
    eight = parallel.make_mesh()
    assert eight.devices.size == 8
    args = (state.ema_params, first_stage[1], state.scale_factor, jax.random.PRNGKey(5))
    x1 = run_trainer.ldm.generate(*args, mesh=one, **kwargs)
    x8 = run_trainer.ldm.generate(*args, mesh=eight, **kwargs)
    assert x1.shape == x8.shape == (8, RES, RES, 3)
    np.testing.assert_allclose(x8, x1, atol=1e-4)  # float32 rounding of per-shard programs
    assert np.abs(x1[0] - x1[1]).max() > 1e-2  # distinct samples, so the comparison means something
    odd = run_trainer.ldm.generate(*args, mesh=eight, **{**kwargs, "num": 6, "batch_size": 6,
                                                                     "inputs": {"label": np.arange(6) % CLASSES}})
    np.testing.assert_allclose(odd, x8[:6], atol=1e-4)  # 6 rounded up to one batch of 8: its first 6 images
