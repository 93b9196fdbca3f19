"""Generate images from a trained LDM with its EMA params.

    python sample.py --workdir=runs/celebahq --num_samples=64 --batch_size=16 \
        --sampler=ddim --steps=200 --eta=0 --seed=0 --outdir=runs/celebahq/samples

The model is rebuilt from the config saved with the run's checkpoints; ``--config`` overrides it (e.g. to point
``diffusion.first_stage.workdir`` at a moved first stage). Writes one PNG per image (``<outdir>/images``),
``<outdir>/samples.npz`` (``images`` uint8 [N,H,W,3]; ``labels`` [N] for class-conditional models; the sampler
settings and checkpoint ``step``) and ``<outdir>/samples_grid.png``. ``--height``/``--width`` larger than the
training resolution run the UNet convolutionally on larger latents. Class-conditional models sample the classes
round-robin unless ``--labels`` lists them; ``--guidance_scale`` > 1 turns on classifier-free guidance.
"""

import os

import numpy as np
import jax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from lidiff import cli
from lidiff.errors import ConfigError
from lidiff.metrics.writers import save_samples
from lidiff.runs import load_latent_diffusion
from lidiff.train.generate import to_uint8

config_flags.DEFINE_config_file("config", None, "Optional: the experiment config (default: the one saved with "
                                "the run's checkpoint).", lock_config=True)
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
flags.mark_flags_as_required(["workdir"])


def class_labels(given: list[str], num_classes: int, num: int) -> np.ndarray:
    """``num`` labels cycling over ``given`` (default: every class), refusing what is not a class id."""
    try:
        pool = [int(x) for x in given] or list(range(num_classes))
    except ValueError:
        raise ConfigError(f"--labels={','.join(given)}: labels are class ids (integers)") from None
    bad = [x for x in pool if not 0 <= x < num_classes]
    if bad:
        raise ConfigError(f"--labels: {bad} outside [0, {num_classes}); the model has {num_classes} classes")
    return np.resize(np.asarray(pool, np.int32), num)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    if FLAGS.num_samples < 1 or FLAGS.batch_size < 1:
        raise ConfigError("--num_samples and --batch_size must be at least 1")
    model = load_latent_diffusion(FLAGS.workdir, FLAGS.step or None, FLAGS.config)
    config, trainer = model.config, model.trainer
    f = trainer.first_stage.downsample_factor
    height = FLAGS.height or config.data.resolution
    width = FLAGS.width or config.data.resolution
    if height % f or width % f:
        raise ConfigError(f"--height/--width must be multiples of the first stage's factor {f}")
    latent_shape = (height // f, width // f, trainer.first_stage.latent_channels)
    labels = None
    if trainer.conditional:
        labels = class_labels(FLAGS.labels, config.diffusion.conditioning.num_classes, FLAGS.num_samples)
    elif FLAGS.labels:
        raise ConfigError("--labels given, but this model is unconditional")
    logging.info("sampling %d images of %dx%d with %s (%d steps, eta %g, guidance %g) from step %d",
                 FLAGS.num_samples, height, width, FLAGS.sampler, FLAGS.steps, FLAGS.eta, FLAGS.guidance_scale,
                 model.step)
    steps = None if FLAGS.sampler == "ddpm" else FLAGS.steps
    with tqdm(total=FLAGS.num_samples, desc="sampling", unit="img") as bar:
        images = model.ldm.generate(model.params, model.first_stage_params, model.scale_factor,
                                    jax.random.PRNGKey(FLAGS.seed), num=FLAGS.num_samples,
                                    latent_shape=latent_shape, labels=labels, sampler=FLAGS.sampler, steps=steps,
                                    eta=FLAGS.eta, guidance_scale=FLAGS.guidance_scale,
                                    batch_size=min(FLAGS.batch_size, FLAGS.num_samples), progress=bar.update)
    outdir = FLAGS.outdir or os.path.join(FLAGS.workdir, "samples")
    settings = {"sampler": FLAGS.sampler, "steps": steps or 0, "eta": FLAGS.eta,
                "guidance_scale": FLAGS.guidance_scale, "seed": FLAGS.seed, "step": model.step}
    path = save_samples(outdir, to_uint8(images), labels, settings=settings)
    logging.info("wrote %s, %s and %d PNGs", path, os.path.join(outdir, "samples_grid.png"), len(images))


if __name__ == "__main__":
    cli.run(main)
