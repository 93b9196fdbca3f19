"""Sharded training state (``config.parallel.fsdp``) on 8 forced CPU devices: the sharding rule, the same
numerics as the replicated run, per-device memory divided by the fsdp factor, state built already sharded, and
checkpoints that restore onto another mesh. (``tests/test_multiprocess.py`` trains through ``train.py`` with the
state sharded across two processes.)

The model is an unconditional one-level stage-2 UNet of 64 channels whose kernels are mostly above
``parallel.MIN_SHARDED_SIZE`` elements, so sharding them shows in the memory figures; its batches are cached
encodings (mean, logvar).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from lidiff import parallel
from lidiff.checkpoint import Checkpointer
from lidiff.errors import ConfigError
from lidiff.runs import load_first_stage
from lidiff.train.common import compile_step, init_sharded
from lidiff.train.diffusion import DiffusionTrainer
from tests.train.stage2_support import randomized_kernels, write_random_first_stage

RES, BATCH, LATENT_CH = 16, 8, 4
LATENT_SHAPE = (RES // 2, RES // 2, LATENT_CH)
STEPS = 3


def test_param_spec_shards_the_largest_divisible_dimension_and_keeps_small_tensors_whole():
    assert parallel.param_spec((3, 3, 320, 640), 8) == P(None, None, None, "fsdp")
    assert parallel.param_spec((1280, 320), 8) == P("fsdp")
    assert parallel.param_spec((3, 3, 8, 320), 8) == P(None, None, None, "fsdp")
    assert parallel.param_spec((3, 3, 64, 64), 8) == P(None, None, "fsdp")  # the first of equal dimensions
    assert parallel.param_spec((3, 3, 4, 320), 8) == P()  # 11,520 elements: below MIN_SHARDED_SIZE
    assert parallel.param_spec((1000, 77), 8) == P("fsdp")  # 77 does not divide; the largest that does
    assert parallel.param_spec((3, 3, 321, 63), 8) == P()  # no dimension divides
    assert parallel.param_spec((320,), 8) == P()  # small: replicated
    assert parallel.param_spec((), 8) == P()
    assert parallel.param_spec((3, 3, 320, 640), 1) == P()  # fsdp=1: everything replicated


def test_mesh_axes_and_a_fsdp_size_that_does_not_divide_the_devices():
    mesh = parallel.make_mesh(fsdp=2)
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert dict(parallel.make_mesh(fsdp=-1).shape) == {"data": 1, "fsdp": 8}
    with pytest.raises(ConfigError, match=r"fsdp=3 does not divide the 8 devices: use a divisor of 8"):
        parallel.make_mesh(fsdp=3)


def tiny_config(fs_workdir: str = "", fsdp: int = 1, num_steps: int = STEPS):
    unet = base.unet_model(in_channels=LATENT_CH, out_channels=LATENT_CH, model_channels=64, channel_mult=(1,),
                           num_res_blocks=1, attention_resolutions=(), num_heads=2, num_head_channels=-1,
                           legacy=False, use_spatial_transformer=False, context_dim=0)
    d = base.diffusion_stage(unet, batch_size=BATCH, learning_rate=1e-4)  # see assert_relative_close
    d.first_stage.workdir = fs_workdir
    d.first_stage.scale_factor = 0.5
    d.latent_cache.enabled = True
    d.train.update(dict(num_steps=num_steps, ema_decay=0.9, log_every=1, sample_every=0, checkpoint_every=2))
    d.sample.update(dict(steps=2, num_images=8, final_samples_per_class=0))
    ae_model = base.autoencoder_model("kl", ch_mult=(1, 2), z_channels=LATENT_CH, embed_dim=LATENT_CH, ch=32,
                                      num_res_blocks=1, resolution=RES)
    ae = base.autoencoder_stage(ae_model, base.autoencoder_loss(perceptual_weight=0.0), batch_size=BATCH,
                                learning_rate=1e-3)
    data = base.data_config("synthetic", resolution=RES, num_examples=4 * BATCH, num_threads=0)
    config = base.experiment(("diffusion",), data, ae, d)
    config.parallel.fsdp = fsdp
    config.lock()
    return config


@pytest.fixture(scope="module")
def fs_workdir(tmp_path_factory):
    return write_random_first_stage(str(tmp_path_factory.mktemp("stage1")), tiny_config(), RES)


@pytest.fixture(scope="module")
def setup(fs_workdir):
    """(trainer, frozen first stage params, a host initial state whose zero kernels are random, the batches)."""
    config = tiny_config(fs_workdir)
    first_stage, fs_params = load_first_stage(config, fs_workdir)
    trainer = DiffusionTrainer(config.diffusion, first_stage, seed=0)
    init = functools.partial(trainer.init_state, latent_shape=LATENT_SHAPE)
    state = jax.device_get(jax.jit(init)(jax.random.PRNGKey(0), jnp.float32(0.5)))
    params = randomized_kernels(state.params)
    state = state.replace(params=params, ema_params=jax.tree.map(np.copy, params))
    rng = np.random.default_rng(0)
    batches = [{"mean": rng.standard_normal((BATCH,) + LATENT_SHAPE).astype(np.float32),
                "logvar": np.full((BATCH,) + LATENT_SHAPE, -4.0, np.float32)} for _ in range(STEPS)]
    return trainer, fs_params, state, batches


def run_steps(setup, fsdp: int):
    """STEPS train steps on the (8 // fsdp, fsdp) mesh -> (final state on the device, compiled step)."""
    trainer, fs_params, state, batches = setup
    mesh = parallel.make_mesh(fsdp=fsdp)
    fs_params = parallel.put_replicated(fs_params, mesh)
    step, _ = compile_step(trainer.train_step, mesh, state, batches[0], fs_params, name=f"fsdp={fsdp}")
    state = jax.device_put(state, parallel.state_shardings(state, mesh))
    for batch in batches:
        state, _ = step(state, parallel.global_batch(batch, mesh), fs_params)
    return state, step


@pytest.fixture(scope="module")
def stepped(setup):
    return {fsdp: run_steps(setup, fsdp) for fsdp in (1, 2, 8)}


@pytest.mark.parametrize("fsdp", [8, 2])
def test_sharded_steps_give_the_replicated_params(setup, stepped, fsdp):
    """fsdp=8 and data=4 x fsdp=2 end where the replicated run does: params, EMA and Adam moments."""
    want, got = jax.device_get(stepped[1][0]), jax.device_get(stepped[fsdp][0])
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(want.params),
                                                        jax.tree.leaves(setup[2].params)))
    assert moved > 1e-4  # the steps changed the params, so equal results mean something
    for name in ("params", "ema_params", "opt_state"):
        assert_relative_close(getattr(got, name), getattr(want, name))


def assert_relative_close(got, want, rtol: float = 1e-5, tensor_rtol: float = 1e-3):
    """``got`` within ``rtol`` of ``want`` in relative L2 norm over the whole tree, and each tensor within
    ``tensor_rtol`` (a wrong shard anywhere gives errors of order 1). Adam turns the float32 rounding of
    gradient sums reduced in another order into parameter differences of order lr (its first steps are about
    lr * sign(g)), hence the small learning rate: measured 5e-7 (fsdp=8) and 1.1e-6 (fsdp=2) over the tree.
    Tensors that start at 0 and move by steps on gradients that nearly cancel (biases) differ by up to ~5e-4
    of their norm.

    Attention key biases are left out: softmax ignores a shift shared by all keys, so their gradient is 0 up to
    rounding and Adam's steps on them (lr * rounding / (|rounding| + eps)) are rounding noise in any two runs.
    """
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)]
    assert len(paths) == len(jax.tree.leaves(got)) > 0
    pairs = [(path, np.asarray(a, np.float64), np.asarray(b, np.float64))
             for path, a, b in zip(paths, jax.tree.leaves(want), jax.tree.leaves(got))
             if not path.endswith("['k']['bias']")]
    total = np.sqrt(sum(np.sum((b - a) ** 2) for _, a, b in pairs) / sum(np.sum(a ** 2) for _, a, _ in pairs))
    assert total < rtol, f"relative error {total:.2e} over the tree"
    for path, a, b in pairs:
        error = np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12)
        assert error < tensor_rtol, f"{path}: relative error {error:.2e}"


@pytest.mark.parametrize("fsdp", [8, 2])
def test_large_params_optimizer_moments_and_ema_are_sharded(stepped, fsdp):
    state = stepped[fsdp][0]
    kernel = state.params["unet"]["middle_block_0"]["in_layers_2"]["kernel"]  # [3, 3, 64, 64]: split on the first 64
    assert kernel.sharding.spec == P(None, None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 64 // fsdp, 64)
    assert state.ema_params["unet"]["middle_block_0"]["in_layers_2"]["kernel"].sharding.spec == P(None, None, "fsdp")
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == kernel.shape]
    assert moments and all(m.sharding.spec == P(None, None, "fsdp") for m in moments)
    bias = state.params["unet"]["middle_block_0"]["in_layers_2"]["bias"]
    assert bias.sharding.is_fully_replicated


def test_per_device_state_memory_shrinks_by_about_the_fsdp_factor(stepped):
    """The compiled step's per-device argument bytes (state + batch + frozen first stage)."""
    args = {f: stepped[f][1].memory_analysis().argument_size_in_bytes for f in (1, 2, 8)}
    assert 1.8 < args[1] / args[2] <= 2.0
    assert 5.5 < args[1] / args[8] <= 8.0


def test_init_builds_the_state_already_sharded(setup):
    trainer = setup[0]
    mesh = parallel.make_mesh(fsdp=8)
    init = functools.partial(trainer.init_state, latent_shape=LATENT_SHAPE)
    state = init_sharded(init, mesh, jax.random.PRNGKey(0), jnp.float32(0.5))
    kernel = state.params["unet"]["middle_block_0"]["in_layers_2"]["kernel"]
    assert kernel.sharding.spec == P(None, None, "fsdp")
    reference = jax.jit(init)(jax.random.PRNGKey(0), jnp.float32(0.5))
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(reference.params["unet"]["middle_block_0"]["in_layers_2"]
                                                              ["kernel"]), rtol=1e-6, atol=1e-7)


def test_checkpoints_restore_onto_another_mesh(stepped, tmp_path):
    """Saved with fsdp=8, restored onto one device (and its values equal), saved there, restored onto fsdp=8."""
    sharded = stepped[8][0]
    one = parallel.make_mesh(jax.devices()[:1])
    eight = parallel.make_mesh(fsdp=8)
    first = Checkpointer(str(tmp_path / "a"))
    first.save(3, sharded, {"note": "fsdp=8"})
    first.close()
    on_one = jax.device_put(jax.device_get(sharded), parallel.state_shardings(sharded, one))
    restored, _ = Checkpointer(str(tmp_path / "a")).restore(jax.tree.map(jnp.zeros_like, on_one))
    for a, b in zip(jax.tree.leaves(jax.device_get(sharded)), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(b), a)
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(restored))
    second = Checkpointer(str(tmp_path / "b"))
    second.save(3, restored, {"note": "one device"})
    second.close()
    target = jax.device_put(jax.tree.map(np.zeros_like, jax.device_get(sharded)),
                            parallel.state_shardings(sharded, eight))
    back, _ = Checkpointer(str(tmp_path / "b")).restore(target)
    kernel = back.params["unet"]["middle_block_0"]["in_layers_2"]["kernel"]
    assert kernel.sharding.spec == P(None, None, "fsdp") and len(kernel.sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(jax.device_get(sharded)), jax.tree.leaves(jax.device_get(back))):
        np.testing.assert_array_equal(b, a)
