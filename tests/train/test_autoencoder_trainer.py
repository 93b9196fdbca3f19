"""Stage-1 trainer: learning, the GAN switch, 8-device sharding, resume, checkpoints, bad data, shapes.

Compiling the autoencoder step is the expensive part on CPU, so the training tests use two tiny configs
(``tiny_config``): KL with the adversarial terms on from step 2, trained on all 8 (forced CPU) devices like
``train_autoencoder`` does, and VQ with them off, trained on one device. JAX's persistent compilation cache,
switched on around those calls only, lets every ``train_autoencoder`` run and the KL fixture share one
compiled init and one compiled step instead of compiling their own.
"""

import glob
import importlib
import os

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from configs import base
from lidiff import parallel
from lidiff.checkpoint import Checkpointer
from lidiff.data.pipeline import DataLoader
from lidiff.data.sources import DigitsSource
from lidiff.errors import TrainingDiverged
from lidiff.metrics.writers import read_metrics
from lidiff.train import autoencoder as ae_train
from lidiff.train.autoencoder import AutoencoderTrainer, train_autoencoder
from lidiff.train.common import compile_step
from tests.compilation_cache import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RES, BATCH = 16, 8
KL_DISC_START = 2  # the KL config switches the discriminator on at step 2
OVERFIT_STEPS = 20
SHARD_STEPS = 4  # steps compared between the 8-device and the 1-device run (2 without, 2 with the GAN terms)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A directory for compiled executables that lives as long as this test process (one per xdist worker)."""
    return str(tmp_path_factory.getbasetemp() / "lidiff_ae_compilation_cache")


def tiny_config(kind: str, disc_start: int, source: str = "digits", **train) -> ConfigDict:
    """A 16x16, ch 32, ch_mult (1, 2) autoencoder experiment, global batch 8, lr 1e-3, no LPIPS, 2-layer
    PatchGAN with BatchNorm.

    Only ``model``, ``loss``, ``optim``, batch size and seed shape the compiled step; ``train`` overrides
    (num_steps, log_every, ...) do not, so all runs of one ``kind``/``disc_start`` share one executable.
    """
    model = base.autoencoder_model(kind, ch_mult=(1, 2), z_channels=3, embed_dim=3, ch=32, num_res_blocks=1,
                                   resolution=RES, n_embed=64 if kind == "vq" else 0)
    loss = base.autoencoder_loss(perceptual_weight=0.0, disc_start=disc_start, disc_num_layers=2, disc_ndf=16)
    stage = base.autoencoder_stage(model, loss, batch_size=BATCH, learning_rate=1e-3)
    stage.train.update(dict(num_steps=4, log_every=1, image_every=0, checkpoint_every=2, keep_checkpoints=10))
    stage.train.update(train)
    data = base.data_config(source, resolution=RES, num_threads=2)
    config = base.experiment(("autoencoder",), data, stage, seed=0)
    config.lock()
    return config


def fixed_batch() -> np.ndarray:
    """8 bundled digits at 16x16: [8, 16, 16, 3] float32 in [-1, 1]."""
    with DataLoader(DigitsSource(), global_batch_size=BATCH, resolution=RES, seed=0, num_threads=0) as loader:
        return loader.batch_at(0)["image"]


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def init_on(trainer, mesh, seed=0, quick_compile=False):
    """A fresh state replicated on ``mesh``, compiled exactly as ``train_autoencoder`` does (so the persistent
    cache shares the executable with the end-to-end runs), or, with ``quick_compile``, with LLVM optimisation
    off, which compiles this one-shot program of ~100 random initialisers ~4x faster on CPU."""
    init = jax.jit(trainer.init_state, out_shardings=parallel.replicated(mesh))
    key = jax.random.PRNGKey(seed)
    if quick_compile:
        return init.lower(key).compile({"xla_backend_optimization_level": 0})(key)
    return init(key)


def run_steps(trainer, mesh, init, images, num_steps, keep=()):
    """``num_steps`` train steps on the fixed batch, compiled with ``compile_step`` for ``mesh``.

    Returns (per-step host metrics, {step: host state for the steps in ``keep``}, final host state).
    """
    state = jax.device_put(init, parallel.replicated(mesh))
    step, _ = compile_step(trainer.train_step, mesh, state, {"image": images}, {}, name=f"{len(mesh.devices)}dev")
    batch = parallel.global_batch({"image": images}, mesh)
    n = mesh.devices.size
    assert [shard.data.shape[0] for shard in batch["image"].addressable_shards] == [BATCH // n] * n
    metrics, states = [], {}
    for i in range(num_steps):
        state, m = step(state, batch, {})
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
        if i + 1 in keep:
            states[i + 1] = host(state)
    return metrics, states, host(state)


def overfit(kind: str, disc_start: int, mesh) -> dict:
    """Trains a tiny config on the fixed batch for OVERFIT_STEPS steps; keeps what the tests compare."""
    config = tiny_config(kind, disc_start)
    trainer = AutoencoderTrainer(config.autoencoder, config.seed)
    # The 8-device KL init is the one the end-to-end runs compile too; the VQ one is needed only here.
    init = host(init_on(trainer, mesh, config.seed, quick_compile=kind == "vq"))
    images = fixed_batch()
    metrics, states, final = run_steps(trainer, mesh, init, images, OVERFIT_STEPS, keep=range(1, SHARD_STEPS + 1))
    return dict(config=config, trainer=trainer, init=init, images=images, metrics=metrics, states=states,
                final=final, devices=mesh.devices.size)


@pytest.fixture(scope="session")
def kl_run(cache_dir):
    """The KL config trained on all 8 devices (session scope: xdist may interleave other modules' tests)."""
    with compilation_cache(cache_dir):
        return overfit("kl", KL_DISC_START, parallel.make_mesh())


def assert_trees_close(actual, expected, what, atol=0.0, rtol=0.0, skip=()):
    """Leaf by leaf: max |actual - expected| <= atol + rtol * max |expected| (0, 0: bitwise equal).

    ``skip``: path suffixes (``jax.tree_util.keystr``) of leaves not compared.
    """
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_e], f"{what}: different tree structure"
    for (path, a), (_, e) in zip(flat_a, flat_e):
        name = jax.tree_util.keystr(path)
        if any(name.endswith(s) for s in skip):
            continue
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what}{name}: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        if a.size:
            diff, scale = float(np.max(np.abs(a - e))), float(np.max(np.abs(e)))
            assert diff <= atol + rtol * scale, f"{what}{name}: max diff {diff:.3g} (scale {scale:.3g})"


# --------------------------------------------------------------------------------------------------- learning


def assert_overfits(run):
    rec = [m["rec_loss"] for m in run["metrics"]]
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) for m in run["metrics"])
    assert np.mean(rec[-3:]) < 0.5 * rec[0], f"reconstruction loss {rec[0]:.4f} -> {rec[-3:]}"
    # The deterministic reconstruction with the trained params is much closer to the batch than at init.
    recon, x = jax.jit(run["trainer"].reconstruct), run["images"]
    err = lambda p: float(np.mean(np.abs(np.asarray(recon(p["autoencoder"], x)) - x)))  # noqa: E731
    assert err(run["final"].params) < 0.5 * err(run["init"].params)


def test_tiny_kl_autoencoder_overfits_a_fixed_batch(kl_run):
    assert_overfits(kl_run)


def test_tiny_vq_autoencoder_overfits_a_fixed_batch_with_adversarial_terms_off():
    run = overfit("vq", 10**6, parallel.make_mesh(jax.devices()[:1]))
    assert_overfits(run)
    metrics = run["metrics"]
    assert all(np.isfinite(m["perplexity"]) and m["perplexity"] >= 1.0 for m in metrics)
    assert all(0.0 < m["codebook_usage"] <= 1.0 and np.isfinite(m["codebook_loss"]) for m in metrics)
    # disc_start far away: no adversarial term, and the discriminator never moves.
    assert all(m["d_weight"] == 0.0 and m["g_loss"] == 0.0 and m["d_loss"] == 0.0 for m in metrics)
    assert_trees_close(run["final"].disc_params, run["init"].disc_params, "disc_params")
    assert_trees_close(run["final"].disc_batch_stats, run["init"].disc_batch_stats, "disc_batch_stats")


def test_gan_terms_and_adaptive_weight_switch_on_at_disc_start(kl_run):
    metrics, init = kl_run["metrics"], kl_run["init"]
    for i, m in enumerate(metrics):
        if i < KL_DISC_START:
            assert m["d_weight"] == 0.0 and m["disc_factor"] == 0.0, (i, m)
            assert m["g_loss"] == 0.0 and m["d_loss"] == 0.0 and m["disc_grad_norm"] == 0.0, (i, m)
        else:
            assert m["disc_factor"] == 1.0, (i, m)
            assert np.isfinite(m["d_weight"]) and m["d_weight"] > 0.0, (i, m)
            assert np.isfinite(m["d_loss"]) and m["d_loss"] > 0.0, (i, m)
            assert np.isfinite(m["disc_grad_norm"]) and m["disc_grad_norm"] > 0.0, (i, m)
            assert np.isfinite(m["g_loss"]), (i, m)
    # Before disc_start the discriminator (params and BatchNorm statistics) does not move; afterwards it does.
    before = kl_run["states"][KL_DISC_START]
    assert init.disc_batch_stats, "the tiny config should exercise the BatchNorm discriminator"
    assert_trees_close(before.disc_params, init.disc_params, "disc_params")
    assert_trees_close(before.disc_batch_stats, init.disc_batch_stats, "disc_batch_stats")
    after = kl_run["final"]
    for name in ("disc_params", "disc_batch_stats"):
        pairs = zip(jax.tree.leaves(getattr(after, name)), jax.tree.leaves(getattr(init, name)))
        assert min(np.max(np.abs(a - b)) for a, b in pairs) > 0, f"some {name} leaf never changed after disc_start"


# --------------------------------------------------------------------------------------------------- sharding


def assert_adam_steps_agree(before, eight, one, opt8, opt1, lr, what):
    """Two Adam updates of the same params (``before``) from gradients that differ only by rounding agree.

    Adam moves every element by about ``lr * m / sqrt(v)``: a learning-rate-sized step whose sign is the sign
    of the first moment ``m``. Where the true gradient is zero (attention key biases: softmax ignores a shift
    shared by all keys; biases of convs feeding a GroupNorm with one channel per group) or tiny, ``m`` is float32
    rounding noise of the gradient's reductions, whose sign depends on their order, so two correct shardings
    legitimately step such an element in opposite directions. Those "ill-conditioned" elements are the ones
    whose ``m`` is within 1000x of the two runs' difference in ``m`` (its measured rounding noise); every other
    step, ``lr * m / (sqrt(v) + eps)`` with ``m`` and ``v`` known to 1e-3, agrees to ``2e-3 * lr``. The moments
    agree to 2e-5 of their leaf's scale plus 1e-5 of the largest (rounding is relative to the summed terms,
    i.e. the gradient scale, which on zero-gradient leaves is all there is). Returns the ill-conditioned
    fraction of elements.
    """
    for m8, m1, name in ((opt8[0].mu, opt1[0].mu, "mu"), (opt8[0].nu, opt1[0].nu, "nu")):  # optax.adam state
        largest = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(m1))
        assert_trees_close(m8, m1, f"{what} adam {name}", atol=1e-5 * largest, rtol=2e-5)
    noisy = total = 0
    flat = zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(eight), jax.tree.leaves(one),
               jax.tree.leaves(opt8[0].mu), jax.tree.leaves(opt1[0].mu))
    for (path, p0), p8, p1, m8, m1 in flat:
        p0, p8, p1, m8, m1 = map(np.asarray, (p0, p8, p1, m8, m1))
        decided = (np.abs(m1) > 1e3 * np.abs(m8 - m1)) | (m8 == m1)  # equal moments: equal steps
        diff = np.abs((p8 - p0) - (p1 - p0))[decided]
        assert diff.size == 0 or diff.max() <= 2e-3 * lr + 1e-5 * np.abs(p0).max(), \
            f"{what}{jax.tree_util.keystr(path)}: update differs by {diff.max():.3g} (lr {lr:g})"
        noisy, total = noisy + int((~decided).sum()), total + decided.size
    return noisy / total


def test_eight_device_step_matches_one_device(kl_run):
    """Each of the first SHARD_STEPS steps (2 without, 2 with the GAN terms) taken from the same state on 1 and
    on 8 devices gives the same metrics and the same new state.

    Each step starts from the 8-device run's state, so the comparison stays exact beyond the first step instead
    of compounding the legitimate differences of earlier steps. What may differ is only the order of float32
    reductions over the batch (sums of at most 8*16*16*3 = 6,144 terms, then ratios and square roots of a few
    of them): relative error about log2(6144) * 2**-23 ~ 2e-6 per reduction, so losses, logits, gradient norms,
    the adaptive weight and the BatchNorm statistics agree to ``rtol=1e-5``, and the Adam updates as
    ``assert_adam_steps_agree`` says. Discriminator BatchNorm statistics taken per device (8 sub-batches of 1)
    instead of over the global batch fail this test at the first GAN step (``d_loss`` off by 6e-4, 30x the
    tolerance).
    """
    assert len(jax.devices()) == 8, "tests/conftest.py forces 8 host devices"
    assert kl_run["devices"] == 8
    one_device = parallel.make_mesh(jax.devices()[:1])
    trainer, images, optim = kl_run["trainer"], kl_run["images"], kl_run["config"].autoencoder.optim
    state = jax.device_put(kl_run["init"], parallel.replicated(one_device))
    step, _ = compile_step(trainer.train_step, one_device, state, {"image": images}, {}, name="1dev")
    batch = parallel.global_batch({"image": images}, one_device)
    noisy = []
    for k in range(SHARD_STEPS):
        before = kl_run["init"] if k == 0 else kl_run["states"][k]
        eight, eight_metrics = kl_run["states"][k + 1], kl_run["metrics"][k]
        new, metrics = step(jax.device_put(before, parallel.replicated(one_device)), batch, {})
        one, metrics = host(new), {name: float(v) for name, v in jax.device_get(metrics).items()}
        assert metrics.keys() == eight_metrics.keys()
        for name in metrics:
            np.testing.assert_allclose(metrics[name], eight_metrics[name], rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {k + 1} metric {name}")
        assert_trees_close(eight.disc_batch_stats, one.disc_batch_stats, f"step {k + 1} disc_batch_stats",
                           atol=1e-6, rtol=1e-5)
        noisy.append(assert_adam_steps_agree(before.params, eight.params, one.params, eight.opt_state,
                                             one.opt_state, optim.learning_rate, f"step {k + 1} params"))
        noisy.append(assert_adam_steps_agree(before.disc_params, eight.disc_params, one.disc_params,
                                             eight.disc_opt_state, one.disc_opt_state, optim.disc_learning_rate,
                                             f"step {k + 1} disc_params"))
        assert int(eight.step) == int(one.step) == k + 1
    assert max(noisy) < 0.05, noisy  # the exemption stays small: almost every update is compared
    assert kl_run["metrics"][SHARD_STEPS - 1]["d_weight"] > 0  # the GAN branch ran in the compared steps


# ---------------------------------------------------------------------------------------- end-to-end training


def checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "autoencoder", "checkpoints")) if d.isdigit())


def read_event_scalars(path):
    """(step, tag) pairs of the scalar summaries in a TensorBoard event file, read by TensorBoard's own loader."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return [(event.step, v.tag) for event in LegacyEventFileLoader(path).Load()
            for v in event.summary.value if v.HasField("simple_value")]


def train(config, workdir, cache_dir):
    """``train_autoencoder`` with the persistent cache on: every run after the first loads the compiled init,
    step and reconstruction instead of compiling them."""
    with compilation_cache(cache_dir):
        return train_autoencoder(config, workdir)


def test_resumed_run_equals_uninterrupted_run(tmp_path, cache_dir):
    def config(num_steps, keep):
        return tiny_config("kl", KL_DISC_START, num_steps=num_steps, checkpoint_every=3, keep_checkpoints=keep,
                           image_every=3)

    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    full = train(config(6, keep=1), straight, cache_dir)
    assert checkpoint_steps(straight) == [6]  # keep_checkpoints=1 deleted step 3
    train(config(3, keep=1), interrupted, cache_dir)  # stops after 3 steps (past disc_start: GAN state too)
    assert checkpoint_steps(interrupted) == [3]
    resumed = train(config(6, keep=2), interrupted, cache_dir)
    assert int(resumed.step) == int(full.step) == 6
    assert_trees_close(host(resumed), host(full), "resumed vs uninterrupted state")
    assert checkpoint_steps(interrupted) == [3, 6]

    # The checkpoint on disk is the returned state.
    ckpt = Checkpointer(os.path.join(interrupted, "autoencoder", "checkpoints"))
    try:
        restored, meta = ckpt.restore(resumed)
    finally:
        ckpt.close()
    assert_trees_close(host(restored), host(resumed), "restored checkpoint")
    assert meta["stage"] == "autoencoder" and meta["model"]["kind"] == "kl"

    # Logs: one metrics row per step across both invocations, an event file, image grids at steps 3 and 6.
    logdir = os.path.join(interrupted, "autoencoder")
    rows = read_metrics(logdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and "rec_loss" in r and "d_weight" in r for r in rows)
    straight_rows = read_metrics(os.path.join(straight, "autoencoder"))
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]
    events = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    assert events
    scalars = {pair for path in events for pair in read_event_scalars(path)}
    assert {(s, "loss") for s in range(1, 7)} <= scalars
    for step in (3, 6):
        for name in ("inputs", "reconstructions"):
            with Image.open(os.path.join(logdir, "images", f"{name}_{step:08d}.png")) as im:
                assert im.mode == "RGB" and im.size[1] == RES + 4  # one row of 8 tiles, padding 2


def test_a_finished_stage_is_skipped_without_compiling(tmp_path, cache_dir, monkeypatch):
    config = tiny_config("kl", KL_DISC_START, num_steps=2, checkpoint_every=2)
    workdir = str(tmp_path)
    done = train(config, workdir, cache_dir)

    def no_compiling(*args, **kwargs):
        raise AssertionError("a finished stage compiled its step")

    monkeypatch.setattr(ae_train, "compile_step", no_compiling)
    again = train(config, workdir, cache_dir)
    assert int(again.step) == 2 and checkpoint_steps(workdir) == [2]
    assert_trees_close(host(again), host(done), "the finished run's state")
    assert [r["step"] for r in read_metrics(os.path.join(workdir, "autoencoder"))] == [1, 2]  # nothing re-logged


class NaNFrom:
    """Wraps a DataLoader so that every batch from ``first_bad`` on is NaN (a broken input pipeline)."""

    def __init__(self, loader, first_bad):
        self.loader, self.first_bad = loader, first_bad

    @property
    def num_skipped(self):
        return self.loader.num_skipped

    def batch_at(self, step):
        return self.loader.batch_at(step)

    def iterate(self, start_step=0):
        for step, batch in self.loader.iterate(start_step):
            if step >= self.first_bad:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield step, batch

    def close(self):
        self.loader.close()


def test_non_finite_loss_stops_training_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, cache_dir):
    make_loader = ae_train.make_loader
    # Batch index 5 is the 6th update: metrics of step 6 are NaN. Logging every 4 steps and checkpointing every
    # 2 means the NaN state would reach checkpoint 6 unless the loop checks before saving.
    monkeypatch.setattr(ae_train, "make_loader", lambda *a, **k: NaNFrom(make_loader(*a, **k), first_bad=5))
    workdir = str(tmp_path)
    config = tiny_config("kl", KL_DISC_START, num_steps=8, log_every=4, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match=r"step 6\b"):
        train(config, workdir, cache_dir)
    assert checkpoint_steps(workdir) == [2, 4]
    ckpt = Checkpointer(os.path.join(workdir, "autoencoder", "checkpoints"))
    try:
        for step in (2, 4):
            state, _, _ = ckpt.restore_items(step=step)
            assert int(state["step"]) == step
            assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state["params"]))
    finally:
        ckpt.close()
    assert [r["step"] for r in read_metrics(os.path.join(workdir, "autoencoder"))] == [4]


def test_non_finite_params_are_never_saved_and_older_checkpoints_stay(tmp_path, monkeypatch, cache_dir):
    # A divergent update: the metrics of a step come from the weights before its update, so they are finite
    # while the params it returns are not. Poison the params from the 3rd update on, saving every step, keep 2.
    compile_real = ae_train.compile_step

    def diverging_compile(*args, **kwargs):
        step_fn, seconds = compile_real(*args, **kwargs)

        def step(state, batch, *extra):
            state, metrics = step_fn(state, batch, *extra)
            if int(state.step) >= 3:
                state = state.replace(params=jax.tree.map(lambda x: x * np.float32(np.inf), state.params))
            return state, metrics

        return step, seconds

    monkeypatch.setattr(ae_train, "compile_step", diverging_compile)
    workdir = str(tmp_path)
    config = tiny_config("kl", KL_DISC_START, num_steps=6, log_every=1, checkpoint_every=1, keep_checkpoints=2)
    with pytest.raises(TrainingDiverged, match=r"step 3: the train state holds non-finite values \(params"):
        train(config, workdir, cache_dir)
    assert checkpoint_steps(workdir) == [1, 2]  # step 3 never written, so keep-2 did not rotate step 1 out
    assert all(np.isfinite(r["loss"]) for r in read_metrics(os.path.join(workdir, "autoencoder")))


def test_corrupt_image_is_skipped_and_counted(tmp_path, cache_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg" * 10)
    config = tiny_config("kl", KL_DISC_START, source="folder", num_steps=2, log_every=1, checkpoint_every=2)
    with config.unlocked():
        config.data.path = str(folder)
    workdir = str(tmp_path / "run")
    state = train(config, workdir, cache_dir)  # 9 files, 16 reads: the broken one is met within 2 steps
    assert int(state.step) == 2 and checkpoint_steps(workdir) == [2]
    rows = read_metrics(os.path.join(workdir, "autoencoder"))
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["data/skipped_images"] >= 1
    assert all(np.isfinite(r["loss"]) for r in rows)


# ------------------------------------------------------------------------------------------- shipped configs

# Latent side at 256x256 input per downsampling factor, and the reference latent channels (embed_dim).
LATENT_SIDE = {4: 64, 8: 32, 16: 16, 32: 8}
REFERENCE_CHANNELS = {"kl_f4": 3, "kl_f8": 4, "kl_f16": 16, "kl_f32": 64, "vq_f4": 3, "vq_f4_noattn": 3,
                      "vq_f8": 4, "vq_f16": 8}
# Encoder + decoder parameter counts (millions) of the released first stages, as instantiated by CompVis.
REFERENCE_PARAMS_M = {"kl_f8": (34.2, 49.5), "kl_f32": (42.6, 61.2), "vq_f4": (22.3, 33.0),
                      "vq_f4_noattn": (21.3, 31.9), "vq_f8": (27.4, 40.3), "vq_f16": (28.2, 41.3)}
CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "autoencoder_*.py")))


def test_every_shipped_autoencoder_config_is_covered():
    assert sorted("autoencoder_" + k for k in REFERENCE_CHANNELS) == CONFIG_FILES


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_shipped_autoencoder_config_shapes(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    stage = config.autoencoder
    short = name[len("autoencoder_"):]
    factor = int(short.split("_")[1][1:])
    assert stage.model.kind == short[:2] and stage.model.resolution == 256 == config.data.resolution
    trainer = AutoencoderTrainer(stage, config.seed)
    state = jax.eval_shape(trainer.init_state, jax.random.PRNGKey(0))
    assert trainer.model.downsample_factor == factor
    params = state.params["autoencoder"]
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), np.float32)
    encoded = jax.eval_shape(lambda p, x: trainer.model.apply({"params": p}, x, method="encode"), params, x)
    latent = encoded.mean if stage.model.kind == "kl" else encoded
    side, channels = LATENT_SIDE[factor], REFERENCE_CHANNELS[short]
    assert latent.shape == (2, side, side, channels) and latent.dtype == np.float32
    decoded = jax.eval_shape(lambda p, z: trainer.model.apply({"params": p}, z, method="decode"), params, latent)
    assert decoded.shape == (2, 256, 256, 3)
    count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree)) / 1e6  # noqa: E731
    if short in REFERENCE_PARAMS_M:
        enc, dec = REFERENCE_PARAMS_M[short]
        assert abs(count(params["encoder"]) - enc) < 0.051 and abs(count(params["decoder"]) - dec) < 0.051
    if stage.model.kind == "vq":
        assert params["quantize"]["embedding"]["embedding"].shape == (stage.model.n_embed, channels)
        assert state.code_counts.shape == (stage.model.n_embed,)
    # The PatchGAN sees 256x256 images: 30x30 logits for 3 layers, 62x62 for 2.
    logits = jax.eval_shape(lambda v, x: trainer.disc.apply(v, x, train=False),
                            {"params": state.disc_params, "batch_stats": state.disc_batch_stats}, x)
    side = 256 // 2 ** stage.loss.disc_num_layers - 2
    assert logits.shape == (2, side, side, 1)


def twice_lpips_nll(m, s, x, x_rec, logvar, lpips_params, x_feats):
    """``_nll`` as it was before the real images' LPIPS features were shared: ``LPIPS(x, x_rec)`` from the images,
    so x's VGG features are computed in the loss and again inside the adaptive-weight gradient."""
    assert x_feats is None
    rec = ae_train.ae_losses.reconstruction_loss(x, x_rec, s.reconstruction)
    metrics = {"rec_loss": jax.numpy.mean(rec)}
    p = m.lpips.apply({"params": lpips_params}, x, x_rec)
    rec = ae_train.ae_losses.add_perceptual(rec, p, s.perceptual_weight)
    metrics["perceptual_loss"] = jax.numpy.mean(p)
    if not s.learn_logvar:
        logvar = jax.lax.stop_gradient(logvar)
    return ae_train.ae_losses.nll_loss_sum_per_image(rec, logvar), metrics


def twice_lpips_step(monkeypatch, trainer):
    """``trainer.train_step`` traced with the old ``_nll`` (no shared features); a function like the step."""

    def step(*args):
        with monkeypatch.context() as patch:
            patch.setattr(ae_train, "_lpips_features", lambda m, s, x, lpips_params: None)
            patch.setattr(ae_train, "_nll", twice_lpips_nll)
            return ae_train.train_step(*args, modules=trainer.modules, settings=trainer.settings)

    return step


def count_primitive(jaxpr, name: str) -> int:
    """Occurrences of primitive ``name`` in a jaxpr, including its sub-jaxprs (cond branches, pjit, custom vjp)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns"):
                    n += count_primitive(sub, name)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    n += count_primitive(sub.jaxpr, name)
    return n


def test_shared_lpips_features_keep_the_step_numerics_and_drop_one_vgg_pass(monkeypatch):
    """KL, 16x16, batch 2, LPIPS (random params) on, adversarial terms from step 1: two steps of the step that
    computes the real images' LPIPS features once give the metrics and params of the old step that computed them
    twice, up to float32 rounding; and the traced step holds exactly one VGG16 trunk (13 convs) fewer."""
    from lidiff.models.lpips import VGG16_CONV_INDICES

    model = base.autoencoder_model("kl", ch_mult=(1, 2), z_channels=3, embed_dim=3, ch=32, num_res_blocks=1,
                                   resolution=RES)
    loss = base.autoencoder_loss(perceptual_weight=1.0, disc_start=1, disc_num_layers=2, disc_ndf=16,
                                 kl_weight=1e-3)
    stage = base.autoencoder_stage(model, loss, batch_size=2, learning_rate=1e-3)
    stage.lock()
    new = AutoencoderTrainer(stage, 0)
    steps = {"new": new.train_step, "old": twice_lpips_step(monkeypatch, new)}
    x1 = jax.numpy.zeros((1, RES, RES, 3), jax.numpy.float32)
    lpips_params = jax.jit(lambda k: new.lpips.init(k, x1, x1)["params"])(jax.random.PRNGKey(1))
    # Non-negative heads, as released (the random init's signed heads can make the distance negative).
    lpips_params = {k: {"kernel": abs(v["kernel"])} if k.startswith("lin") else v for k, v in lpips_params.items()}
    init = jax.jit(new.init_state).lower(jax.random.PRNGKey(0)).compile(
        {"xla_backend_optimization_level": 0})(jax.random.PRNGKey(0))
    batch = {"image": jax.numpy.asarray(fixed_batch()[:2])}

    n_conv = [count_primitive(jax.make_jaxpr(steps[k])(init, batch, lpips_params).jaxpr, "conv_general_dilated")
              for k in ("new", "old")]
    assert n_conv[1] - n_conv[0] == len(VGG16_CONV_INDICES), n_conv

    results = []
    for k in ("new", "old"):  # both without XLA's backend optimisations: 4x less compile time, same comparison
        step = jax.jit(steps[k]).lower(init, batch, lpips_params).compile({"xla_backend_optimization_level": 0})
        state, metrics = init, []
        for _ in range(2):
            state, m = step(state, batch, lpips_params)
            metrics.append(host(m))
        results.append((metrics, host(state)))
    (m_new, s_new), (m_old, s_old) = results
    assert m_new[0]["disc_factor"] == 0 and m_new[1]["disc_factor"] == 1
    assert m_new[1]["perceptual_loss"] > 0 and m_new[1]["d_weight"] > 0  # both LPIPS uses are in the compared step
    for step_i, (a, b) in enumerate(zip(m_new, m_old)):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, atol=1e-7, err_msg=f"step {step_i + 1}: {key}")
    assert_trees_close(s_new.params, s_old.params, "params", atol=1e-6, rtol=1e-5)
    assert_trees_close(s_new.disc_params, s_old.disc_params, "disc_params", atol=1e-6, rtol=1e-5)
    assert_trees_close(s_new.opt_state, s_old.opt_state, "opt_state", atol=1e-7, rtol=1e-4)
