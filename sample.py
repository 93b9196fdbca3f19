"""Generate images from a trained LDM with its EMA params.

    python sample.py --workdir=runs/celebahq --num_samples=64 --batch_size=16 \
        --sampler=ddim --steps=200 --eta=0 --seed=0 --outdir=runs/celebahq/samples

The model is rebuilt from the config saved with the run's checkpoints; ``--config`` overrides it (e.g. to point
``diffusion.first_stage.workdir`` at a moved first stage). Writes one PNG per image (``<outdir>/images``),
``<outdir>/samples.npz`` (``images`` uint8 [N,H,W,3]; ``labels`` [N] for class-conditional models; the sampler
settings and checkpoint ``step``) and ``<outdir>/samples_grid.png``. ``--height``/``--width`` larger than the
training resolution run the UNet convolutionally on larger latents.

Conditioning, cycled over the samples; the unconditional branch of ``--guidance_scale`` > 1 uses the encoder's
null input (null class, empty prompt, no boxes):

    --class_label=3 --class_label=7       class-conditional models (default: every class round-robin)
    --prompt="a photo of a cat" ...       text models (repeatable), or --prompts_file=FILE (one prompt per line)
    --layout=FILE.json                    layout models: [[{"bbox": [x0, y0, x1, y1], "label": 3}, ...], ...]

``samples.npz`` records the conditioning next to the images: ``labels``, ``prompts``, ``boxes``/``box_labels``.
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
from lidiff.data.transforms import to_uint8

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
flags.DEFINE_multi_string("class_label", [], "A class id to sample (repeatable, cycled; class-conditional models).")
flags.DEFINE_list("labels", [], "Class ids to sample, comma-separated (same as repeating --class_label).")
flags.DEFINE_multi_string("prompt", [], "A prompt to sample (repeatable, cycled; text models).")
flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line (text models).")
flags.DEFINE_string("layout", None, "A layout JSON file (layout models): a list of layouts, each a list of "
                    "{\"bbox\": [x0, y0, x1, y1] fractions, \"label\": class id}.")
flags.DEFINE_integer("step", 0, "Checkpoint step to load (default: the latest).")
flags.mark_flags_as_required(["workdir"])


def class_labels(given: list[str], num_classes: int, num: int) -> np.ndarray:
    """``num`` labels cycling over ``given`` (default: every class), refusing what is not a class id."""
    try:
        pool = [int(x) for x in given] or list(range(num_classes))
    except ValueError:
        raise ConfigError(f"--class_label={','.join(given)}: class labels are class ids (integers)") from None
    bad = [x for x in pool if not 0 <= x < num_classes]
    if bad:
        raise ConfigError(f"--class_label: {bad} outside [0, {num_classes}); the model has {num_classes} classes")
    return np.resize(np.asarray(pool, np.int32), num)


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """``--prompt`` values followed by the non-empty lines of ``--prompts_file``."""
    prompts = list(prompts)
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise ConfigError(f"--prompts_file={prompts_file}: no such file")
        with open(prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


GIVEN_FOR = {"class": "--class_label/--labels", "text": "--prompt/--prompts_file", "layout": "--layout"}


def conditioning(model, num: int) -> tuple[dict, dict]:
    """The raw conditioning inputs of ``num`` samples from the flags, and what samples.npz records of them.

    Refuses conditioning the model does not take, and a text or layout model without its input."""
    FLAGS = flags.FLAGS
    cond = model.config.diffusion.conditioning
    given = {"class": bool(FLAGS.class_label or FLAGS.labels), "text": bool(FLAGS.prompt or FLAGS.prompts_file),
             "layout": bool(FLAGS.layout)}
    wrong = [GIVEN_FOR[k] for k, v in given.items() if v and k != cond.kind]
    if wrong:
        takes = f"takes {GIVEN_FOR[cond.kind]}" if cond.kind in GIVEN_FOR else "is unconditional"
        raise ConfigError(f"{', '.join(wrong)} given, but this model ({FLAGS.workdir}) {takes}")
    if cond.kind == "class":
        labels = class_labels(FLAGS.class_label + FLAGS.labels, cond.num_classes, num)
        return {"label": labels}, {"labels": labels}
    if cond.kind == "text":
        from lidiff.data.text import tokenize

        prompts = read_prompts(FLAGS.prompt, FLAGS.prompts_file)
        if not prompts:
            raise ConfigError("this is a text-conditioned model: give --prompt=\"...\" (repeatable) or "
                              "--prompts_file=FILE with one prompt per line")
        prompts = [prompts[i % len(prompts)] for i in range(num)]
        return {"tokens": tokenize(model.tokenizer, prompts, cond.max_length)}, {"prompts": np.asarray(prompts)}
    if cond.kind == "layout":
        from lidiff.data.layouts import read_layout_file

        if not FLAGS.layout:
            raise ConfigError("this is a layout-conditioned model: give --layout=FILE.json, a list of layouts, each "
                              "a list of {\"bbox\": [x0, y0, x1, y1] (fractions of the image), \"label\": class id}")
        try:
            boxes, labels = read_layout_file(FLAGS.layout, num_classes=cond.num_classes, max_boxes=cond.max_boxes)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--layout: {e}") from None
        index = np.arange(num) % len(boxes)
        return ({"boxes": boxes[index], "box_labels": labels[index]},
                {"boxes": boxes[index], "box_labels": labels[index]})
    return {}, {}


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
    inputs, record = conditioning(model, FLAGS.num_samples)
    logging.info("sampling %d images of %dx%d with %s (%d steps, eta %g, guidance %g) from step %d",
                 FLAGS.num_samples, height, width, FLAGS.sampler, FLAGS.steps, FLAGS.eta, FLAGS.guidance_scale,
                 model.step)
    steps = None if FLAGS.sampler == "ddpm" else FLAGS.steps
    with tqdm(total=FLAGS.num_samples, desc="sampling", unit="img") as bar:
        images = model.ldm.generate(model.params, model.first_stage_params, model.scale_factor,
                                    jax.random.PRNGKey(FLAGS.seed), num=FLAGS.num_samples,
                                    latent_shape=latent_shape, inputs=inputs, sampler=FLAGS.sampler, steps=steps,
                                    eta=FLAGS.eta, guidance_scale=FLAGS.guidance_scale,
                                    batch_size=min(FLAGS.batch_size, FLAGS.num_samples), progress=bar.update)
    outdir = FLAGS.outdir or os.path.join(FLAGS.workdir, "samples")
    settings = {"sampler": FLAGS.sampler, "steps": steps or 0, "eta": FLAGS.eta,
                "guidance_scale": FLAGS.guidance_scale, "seed": FLAGS.seed, "step": model.step}
    labels = record.pop("labels", None)
    path = save_samples(outdir, to_uint8(images), labels, settings=settings, conditioning=record)
    logging.info("wrote %s, %s and %d PNGs", path, os.path.join(outdir, "samples_grid.png"), len(images))


if __name__ == "__main__":
    cli.run(main)
