"""Generate images from a trained LDM with its EMA params.

    python sample.py --config=configs/celebahq_f4.py --workdir=runs/celebahq --num_samples=64 --batch_size=16 \
        --sampler=ddim --steps=200 --eta=0 --seed=0 --outdir=runs/celebahq/samples

Writes one PNG per image (``<outdir>/images``), ``<outdir>/samples.npz`` (``images`` uint8 [N,H,W,3]; ``labels``
[N] for class-conditional models) and ``<outdir>/samples_grid.png``. ``--height``/``--width`` larger than the
training resolution run the UNet convolutionally on larger latents. Class-conditional models sample the classes
round-robin unless ``--labels`` lists them; ``--guidance_scale`` > 1 turns on classifier-free guidance.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from lidiff.checkpoint import Checkpointer, quiet_orbax_logs
from lidiff.metrics.writers import save_samples
from lidiff.train.diffusion import DiffusionTrainer
from lidiff.train.first_stage import load_first_stage
from lidiff.train.generate import to_uint8

config_flags.DEFINE_config_file("config", None, "The experiment config the model was trained with.", lock_config=True)
flags.DEFINE_string("workdir", None, "The training workdir (its diffusion/ checkpoints are read).")
flags.DEFINE_integer("num_samples", 16, "How many images.")
flags.DEFINE_integer("batch_size", 16, "Images per sampler call.")
flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm", "plms", "dpm_solver++"], "Sampler.")
flags.DEFINE_integer("steps", 200, "Sampler steps (ddpm always runs all T).")
flags.DEFINE_float("eta", 0.0, "DDIM noise scale (0 = deterministic).")
flags.DEFINE_float("guidance_scale", 1.0, "Classifier-free guidance scale (1 = off).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("outdir", None, "Output directory (default: <workdir>/samples).")
flags.DEFINE_integer("height", 0, "Image height (default: the training resolution); a multiple of 8*f.")
flags.DEFINE_integer("width", 0, "Image width (default: the training resolution).")
flags.DEFINE_list("labels", [], "Class labels to sample, cycled (class-conditional models).")
flags.DEFINE_integer("step", 0, "Checkpoint step to load (default: the latest).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    quiet_orbax_logs()
    FLAGS = flags.FLAGS
    config = FLAGS.config
    first_stage, fs_params = load_first_stage(config, FLAGS.workdir)
    trainer = DiffusionTrainer(config.diffusion, first_stage, config.seed)
    directory = os.path.join(FLAGS.workdir, "diffusion", "checkpoints")
    checkpointer = Checkpointer(directory) if os.path.isdir(directory) else None
    if checkpointer is None or checkpointer.latest_step() is None:
        raise FileNotFoundError(f"no diffusion checkpoint in {directory}: train stage 2 first (train.py)")
    # Restore onto this machine's first device whatever mesh the run was trained on: the target is the train
    # state's structure (params do not depend on the latent size) with a single-device sharding.
    f = first_stage.downsample_factor
    train_latent = trainer.latent_shape(config.data.resolution)
    abstract = jax.eval_shape(lambda rng: trainer.init_state(rng, jnp.float32(1.0), train_latent),
                              jax.random.PRNGKey(0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    state, _ = checkpointer.restore(target, FLAGS.step or None)
    checkpointer.close()
    height = FLAGS.height or config.data.resolution
    width = FLAGS.width or config.data.resolution
    if height % f or width % f:
        raise ValueError(f"--height/--width must be multiples of the first stage's factor {f}")
    latent_shape = (height // f, width // f, first_stage.latent_channels)
    labels = None
    if trainer.conditional:
        pool = [int(x) for x in FLAGS.labels] or list(range(config.diffusion.conditioning.num_classes))
        labels = np.resize(np.asarray(pool, np.int32), FLAGS.num_samples)
    logging.info("sampling %d images of %dx%d with %s (%d steps, eta %g, guidance %g) from step %d",
                 FLAGS.num_samples, height, width, FLAGS.sampler, FLAGS.steps, FLAGS.eta, FLAGS.guidance_scale,
                 int(state.step))
    steps = None if FLAGS.sampler == "ddpm" else FLAGS.steps
    with tqdm(total=FLAGS.num_samples, desc="sampling", unit="img") as bar:
        images = trainer.ldm.generate(state.ema_params, fs_params, state.scale_factor,
                                      jax.random.PRNGKey(FLAGS.seed), num=FLAGS.num_samples,
                                      latent_shape=latent_shape, labels=labels, sampler=FLAGS.sampler, steps=steps,
                                      eta=FLAGS.eta, guidance_scale=FLAGS.guidance_scale,
                                      batch_size=min(FLAGS.batch_size, FLAGS.num_samples), progress=bar.update)
    outdir = FLAGS.outdir or os.path.join(FLAGS.workdir, "samples")
    path = save_samples(outdir, to_uint8(images), labels)
    logging.info("wrote %s, %s and %d PNGs", path, os.path.join(outdir, "samples_grid.png"), len(images))


if __name__ == "__main__":
    app.run(main)
