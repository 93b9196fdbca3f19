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

Spatial conditioning, a file or a folder (folders pair files by name); one sample per input unless
``--num_samples`` is given, at the size the input implies (a 2x larger input gives a 2x larger image):

    --cond_image=low.png                  super-resolution: the low-res image(s)
    --cond_image=photo.png --mask=m.png   inpainting: white mask pixels are filled, the rest is kept exactly
    --segmentation=map.png                semantic synthesis: a PNG of class ids (greyscale, palette or 16-bit)
    --tile=64 --tile_overlap=16           denoise and decode latents larger than 64x64 tile by tile

``--init_latents=x_T.npy`` starts from the given noise [N, h, w, c] (the model's scaled latent space) instead of
drawing it, so another implementation's sample can be reproduced exactly.

``samples.npz`` records the conditioning next to the images: ``labels``, ``prompts``, ``boxes``/``box_labels``,
``inputs`` (low-res images), ``masks`` (1 = known) and ``masked_images``, or ``segmentations``.
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
flags.DEFINE_string("cond_image", None, "Super-resolution: low-res image file or folder; inpainting: the images "
                    "to inpaint (with --mask).")
flags.DEFINE_string("mask", None, "Inpainting: mask file or folder (white = the region to fill), sized like "
                    "--cond_image.")
flags.DEFINE_string("segmentation", None, "Semantic synthesis: class-id PNG file or folder.")
flags.DEFINE_integer("tile", 0, "Latent tile side for tiled denoising and decoding (0 = untiled).")
flags.DEFINE_integer("tile_overlap", 16, "Overlap of neighbouring latent tiles (with --tile).")
flags.DEFINE_string("init_latents", None, "A .npy of starting noise x_T [N, h, w, c] float32 in the model's scaled "
                    "latent space, used instead of drawing it (N samples, unless --num_samples is given).")
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


GIVEN_FOR = {"class": "--class_label/--labels", "text": "--prompt/--prompts_file", "layout": "--layout",
             "superres": "--cond_image", "inpainting": "--cond_image and --mask", "semantic": "--segmentation"}
ACCEPTS = {"class": ("--class_label/--labels",), "text": ("--prompt/--prompts_file",), "layout": ("--layout",),
           "superres": ("--cond_image",), "inpainting": ("--cond_image", "--mask"), "semantic": ("--segmentation",)}
SPATIAL_FLAGS = {"superres": ("cond_image",), "inpainting": ("cond_image", "mask"), "semantic": ("segmentation",)}


def spatial_conditioning(kind: str, num_classes: int) -> tuple[dict, dict]:
    """The spatial inputs the flags name (one row per file) and what samples.npz records of them."""
    from lidiff.data import cond_images
    from lidiff.data.transforms import to_uint8 as uint8

    FLAGS = flags.FLAGS
    if kind == "superres":
        if not FLAGS.cond_image:
            raise ConfigError("this is a super-resolution model: give --cond_image=FILE_OR_FOLDER (low-res images)")
        inputs = cond_images.read_lowres(FLAGS.cond_image)
        return inputs, {"inputs": uint8(inputs["lowres"])}
    if kind == "inpainting":
        if not FLAGS.cond_image:
            raise ConfigError("this is an inpainting model: give --cond_image=FILE_OR_FOLDER and --mask=... "
                              "(white = the region to fill)")
        inputs = cond_images.read_inpainting(FLAGS.cond_image, FLAGS.mask)
        return inputs, {"masks": (inputs["mask"][..., 0] < 0.5).astype(np.uint8),
                        "masked_images": uint8(inputs["masked_image"])}
    if not FLAGS.segmentation:
        raise ConfigError("this is a semantic-synthesis model: give --segmentation=FILE_OR_FOLDER (class-id PNGs)")
    inputs = cond_images.read_segmentation(FLAGS.segmentation, num_classes)
    return inputs, {"segmentations": inputs["segmentation"]}


def conditioning(model, num: int | None) -> tuple[dict, dict]:
    """The raw conditioning inputs of ``num`` samples from the flags (None: one per spatial input file), and what
    samples.npz records of them.

    Refuses conditioning the model does not take, and a text or layout model without its input."""
    FLAGS = flags.FLAGS
    cond = model.config.diffusion.conditioning
    given = {"--class_label/--labels": bool(FLAGS.class_label or FLAGS.labels),
             "--prompt/--prompts_file": bool(FLAGS.prompt or FLAGS.prompts_file), "--layout": bool(FLAGS.layout),
             "--cond_image": bool(FLAGS.cond_image), "--mask": bool(FLAGS.mask),
             "--segmentation": bool(FLAGS.segmentation)}
    wrong = [k for k, v in given.items() if v and k not in ACCEPTS.get(cond.kind, ())]
    if wrong:
        takes = f"takes {GIVEN_FOR[cond.kind]}" if cond.kind in GIVEN_FOR else "is unconditional"
        raise ConfigError(f"{', '.join(wrong)} given, but this model ({FLAGS.workdir}) {takes}")
    if cond.kind in SPATIAL_FLAGS:
        inputs, record = spatial_conditioning(cond.kind, cond.num_classes)
        rows = len(next(iter(inputs.values())))
        index = np.arange(rows if num is None else num) % rows
        return ({k: v[index] for k, v in inputs.items()}, {k: v[index] for k, v in record.items()})
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


def read_init_latents(path: str) -> np.ndarray:
    """``--init_latents``: a .npy of float x_T [N, h, w, c]."""
    if not os.path.isfile(path):
        raise ConfigError(f"--init_latents={path}: no such file")
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--init_latents={path}: not a .npy array ({e})") from None
    if x.ndim != 4 or x.dtype.kind != "f":
        raise ConfigError(f"--init_latents={path}: expected float x_T [N, h, w, c], got {x.dtype} {x.shape}")
    return x.astype(np.float32)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    if FLAGS.num_samples < 1 or FLAGS.batch_size < 1:
        raise ConfigError("--num_samples and --batch_size must be at least 1")
    model = load_latent_diffusion(FLAGS.workdir, FLAGS.step or None, FLAGS.config)
    config, trainer = model.config, model.trainer
    f = trainer.first_stage.downsample_factor
    num = FLAGS.num_samples
    if config.diffusion.conditioning.kind in SPATIAL_FLAGS:
        if FLAGS.height or FLAGS.width:
            raise ConfigError("--height/--width: a spatially conditioned model samples at the size of its input")
        if not FLAGS["num_samples"].present:
            num = None  # one sample per input file
    height = FLAGS.height or config.data.resolution
    width = FLAGS.width or config.data.resolution
    if height % f or width % f:
        raise ConfigError(f"--height/--width must be multiples of the first stage's factor {f}")
    latent_shape = (height // f, width // f, trainer.first_stage.latent_channels)
    x_T = read_init_latents(FLAGS.init_latents) if FLAGS.init_latents else None
    if x_T is not None and not FLAGS["num_samples"].present:
        num = len(x_T)
    inputs, record = conditioning(model, num)
    num = len(next(iter(inputs.values()))) if num is None else num
    try:
        implied = model.ldm.latent_hw(inputs)
    except ValueError as e:
        flag = "--segmentation" if FLAGS.segmentation else "--cond_image"
        raise ConfigError(f"{flag}: {e}") from None
    if implied is not None:
        latent_shape = (implied[0], implied[1], latent_shape[2])
        height, width = implied[0] * f, implied[1] * f
    if x_T is not None and x_T.shape != (num,) + latent_shape:
        raise ConfigError(f"--init_latents={FLAGS.init_latents} holds {x_T.shape}; this run needs ({num}, "
                          f"{', '.join(map(str, latent_shape))}): num samples x the latent shape of "
                          f"{height}x{width} images")
    logging.info("sampling %d images of %dx%d with %s (%d steps, eta %g, guidance %g) from step %d",
                 num, height, width, FLAGS.sampler, FLAGS.steps, FLAGS.eta, FLAGS.guidance_scale,
                 model.step)
    steps = None if FLAGS.sampler == "ddpm" else FLAGS.steps
    with tqdm(total=num, desc="sampling", unit="img") as bar:
        images = model.ldm.generate(model.params, model.first_stage_params, model.scale_factor,
                                    jax.random.PRNGKey(FLAGS.seed), num=num,
                                    latent_shape=latent_shape, inputs=inputs, sampler=FLAGS.sampler, steps=steps,
                                    eta=FLAGS.eta, guidance_scale=FLAGS.guidance_scale,
                                    batch_size=min(FLAGS.batch_size, num), progress=bar.update,
                                    tile=FLAGS.tile or None, tile_overlap=FLAGS.tile_overlap, x_T=x_T)
    outdir = FLAGS.outdir or os.path.join(FLAGS.workdir, "samples")
    settings = {"sampler": FLAGS.sampler, "steps": steps or 0, "eta": FLAGS.eta,
                "guidance_scale": FLAGS.guidance_scale, "seed": FLAGS.seed, "step": model.step}
    labels = record.pop("labels", None)
    path = save_samples(outdir, to_uint8(images), labels, settings=settings, conditioning=record)
    logging.info("wrote %s, %s and %d PNGs", path, os.path.join(outdir, "samples_grid.png"), len(images))


if __name__ == "__main__":
    cli.run(main)
