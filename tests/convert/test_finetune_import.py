"""An imported checkpoint fine-tunes: ``train.py --config=<out>/config.py --workdir=<out>`` continues from the
converted weights.

The source is a tiny random CompVis file (raw UNet, a different EMA UNet, KL autoencoder, class labels "adm")
imported by ``python -m lidiff.convert``'s ``run``; ``train.py`` then runs as a subprocess with the command line a
user types. The test restores the step-0 state from the run directory and steps it on the loader's first batches
with the train step compiled as ``train_diffusion`` compiles it (the same mesh; XLA's persistent cache, shared with
the subprocess, saves compiling it twice). Step ``s`` draws its noise from ``fold_in(PRNGKey(seed), s)`` in both,
so the losses ``train.py`` logged must be the ones computed here.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import AutoencoderKL as TorchKL
from diffusers import UNet2DModel
from PIL import Image
from safetensors.numpy import save_file

from lidiff import parallel, runs
from lidiff.checkpoint import Checkpointer
from lidiff.convert import __main__ as command
from lidiff.convert import run_import
from lidiff.convert.diffusers_unet import diffusers_unet_to_compvis, unet_params_from_diffusers
from lidiff.convert.diffusers_vae import diffusers_vae_to_compvis
from lidiff.models.unet import UNetModel
from lidiff.train.common import compile_step, init_sharded, make_loader
from lidiff.train import diffusion
from lidiff.train.diffusion import DiffusionTrainer, data_fields
from tests.compilation_cache import compilation_cache
from tests.convert.test_convert_command import HEADS, LIDIFF_UNET, SCALE, UNET_KW, VAE_KW, compvis_buffers
from tests.convert.test_diffusers_vae import randomize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESOLUTION, STEPS = 32, 2
# test_convert_command's reference UNet with one level and no attention outside the middle block (the step
# compiles in about half the time); its autoencoder as it is.
UNET = dict(UNET_KW, block_out_channels=(32,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
LIDIFF = dict(LIDIFF_UNET, channel_mult=(1,), attention_resolutions=(), num_classes=5)
# The fine-tune: an image folder with two class subfolders (labels 0 and 1 of the model's 4 classes), batch 8 (one
# row per CPU device of tests/conftest.py), two steps, every step logged, no sample grid (train.py would otherwise
# draw one at the last step).
OVERRIDES = {"data.class_from_subdir": "True", "diffusion.train.batch_size": "8",
             "diffusion.train.num_steps": str(STEPS), "diffusion.train.log_every": "1",
             "diffusion.train.sample_every": "0", "diffusion.optim.learning_rate": "1e-3"}
# The same executable on the same inputs gives the same numbers (measured: bitwise equal); the tolerance only
# allows float32 rounding. A loss from other weights differs by far more (asserted below).
RTOL = 1e-5


def write_images(root) -> str:
    """Two class subfolders of four random 32x32 PNGs each -> the folder."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        os.makedirs(root / name)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), np.uint8)).save(root / name / f"{i}.png")
    return str(root)


def compvis_file(path: str, raw, ema, vae) -> None:
    """A CompVis single file: raw and EMA UNets (diffusers models), first stage, schedule buffers, scale_factor."""
    unet = UNetModel(**LIDIFF)
    sd = {"model.diffusion_model." + k: v for k, v in diffusers_unet_to_compvis(raw.state_dict(), unet).items()}
    sd.update({"model_ema.diffusion_model" + k.replace(".", ""): v
               for k, v in diffusers_unet_to_compvis(ema.state_dict(), unet).items()})
    sd.update({"first_stage_model." + k: v.numpy() for k, v in diffusers_vae_to_compvis(vae.state_dict()).items()})
    sd.update(compvis_buffers())
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in sd.items()}, path)


def train_py_env(cache_dir: str) -> dict:
    """This process's environment (the same devices and XLA options, so the same compiled programs) with the
    persistent compilation cache in ``cache_dir``."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def logged_losses(workdir) -> dict[int, float]:
    """{step: loss} of ``<workdir>/diffusion/metrics.jsonl``."""
    with open(os.path.join(workdir, runs.DIFFUSION, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The imported run directory after ``train.py`` fine-tuned it; the overrides; the reference UNets' weights
    as lidiff params; the compilation cache train.py filled."""
    tmp = tmp_path_factory.mktemp("finetune")
    raw, ema = randomize(UNet2DModel(**UNET), 1), randomize(UNet2DModel(**UNET), 2)
    src = str(tmp / "ldm.safetensors")
    compvis_file(src, raw, ema, randomize(TorchKL(**VAE_KW), 3))
    workdir, cache = str(tmp / "run"), str(tmp / "xla_cache")
    command.run(["--src", src, "--out", workdir, "--resolution", str(RESOLUTION), HEADS])
    overrides = {"data.path": write_images(tmp / "images"), **OVERRIDES}
    cmd = [sys.executable, "train.py", f"--config={os.path.join(workdir, run_import.CONFIG_FILE)}",
           f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]
    result = subprocess.run(cmd, cwd=REPO, env=train_py_env(cache), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    unet = UNetModel(**LIDIFF)
    return dict(workdir=workdir, overrides=overrides, cache=cache,
                raw=unet_params_from_diffusers(raw.state_dict(), unet),
                ema=unet_params_from_diffusers(ema.state_dict(), unet))


def restore_state(workdir, target, tx, step):
    """The diffusion train state saved at ``step`` onto ``target``'s shapes and shardings, as ``train.py`` restores
    it (the import's step 0 holds no optimizer state: a fresh one is made)."""
    checkpointer = Checkpointer(runs.checkpoint_dir(workdir, runs.DIFFUSION), create=False)
    try:
        return diffusion.restore_state(checkpointer, target, tx, step)
    finally:
        checkpointer.close()


def saved_items(workdir, step):
    checkpointer = Checkpointer(runs.checkpoint_dir(workdir, runs.DIFFUSION), create=False)
    try:
        return checkpointer.saved_items(step)
    finally:
        checkpointer.close()


def on_host(tree):
    return jax.tree.map(np.asarray, tree)


def leaves_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_py_fine_tunes_the_imported_weights(finetuned):
    workdir = finetuned["workdir"]
    config = runs.saved_config(workdir, step=0)  # the import's config, plus the command line's overrides
    run_import.apply_overrides(config, finetuned["overrides"])
    assert runs.saved_config(workdir).to_json() == config.to_json()  # what train.py saved with its last step

    with compilation_cache(finetuned["cache"]):
        mesh = parallel.mesh_from_config(config)  # train.py's mesh
        first_stage, fs_params = runs.load_first_stage(config, workdir)
        fs_params = parallel.put_replicated(fs_params, mesh)
        trainer = DiffusionTrainer(config.diffusion, first_stage, config.seed, runs.load_tokenizer(workdir, config))
        init = functools.partial(init_sharded, functools.partial(
            trainer.init_state, latent_shape=trainer.latent_shape(config.data.resolution)), mesh,
            jax.random.PRNGKey(config.seed))
        target = init(jnp.float32(1.0))
        assert "opt_state" not in saved_items(workdir, 0) and "opt_state" in saved_items(workdir, STEPS)
        start = on_host(restore_state(workdir, target, trainer.tx, 0))
        assert int(start.step) == 0 and float(start.scale_factor) == pytest.approx(SCALE)
        assert leaves_equal(start.params["unet"], finetuned["raw"])  # fine-tuning starts from the raw weights
        assert leaves_equal(start.ema_params["unet"], finetuned["ema"])  # and continues the imported EMA

        loader = make_loader(config.data, config.diffusion.train.batch_size, config.seed,
                             fields=data_fields(config, trainer.tokenizer))
        try:
            batches = [loader.batch_at(step) for step in range(STEPS)]  # what loader.iterate(0) yields
        finally:
            loader.close()
        keys = ("image",) + trainer.batch_inputs
        batches = [parallel.global_batch({k: b[k] for k in keys}, mesh) for b in batches]
        step_fn, _ = compile_step(trainer.train_step, mesh, target, batches[0], fs_params, name="diffusion")
        state, losses = restore_state(workdir, target, trainer.tx, 0), {}  # (the step donates its input state)
        for step, batch in enumerate(batches):
            state, metrics = step_fn(state, batch, fs_params)
            losses[step + 1] = float(metrics["loss"])
        # The same batch and key from freshly initialised weights (a zero output conv: the loss is the mean square
        # of the noise) give another loss, so the comparison tells the weights apart.
        _, fresh_metrics = step_fn(init(start.scale_factor), batches[0], fs_params)

    logged = logged_losses(workdir)
    assert sorted(logged) == [1, 2]
    np.testing.assert_allclose(logged[1], losses[1], rtol=RTOL)
    np.testing.assert_allclose(logged[2], losses[2], rtol=RTOL)
    assert abs(float(fresh_metrics["loss"]) - logged[1]) > 100 * RTOL * abs(logged[1])

    end = on_host(restore_state(workdir, target, trainer.tx, STEPS))
    assert int(end.step) == STEPS
    moved = max_abs_diff(end.params, start.params)
    assert moved > 0.5 * config.diffusion.optim.learning_rate  # AdamW moves weights by about lr per step
    # train.py's two updates (params, and the EMA continued from the imported one) are the ones made here. (Only the
    # same program gives this: weights whose gradient is zero up to rounding, such as biases followed by a
    # one-channel-per-group GroupNorm, take lr-sized AdamW steps in the direction of that rounding.)
    params_diff = max_abs_diff(end.params, state.params)
    ema_diff = max_abs_diff(end.ema_params, state.ema_params)
    assert params_diff < 1e-2 * moved and ema_diff < 1e-2 * moved, (params_diff, ema_diff, moved)
