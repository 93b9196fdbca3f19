"""Inpainting on scikit-learn's digits: the quickstart's stage 1, stage 2 fills large masked regions of 32x32 digits.

Training: the digits of the ``train`` split (4 of every 5, ``lidiff.data.spatial.digit_split``); in every step
each digit gets a random large mask on the device (``mask_kind="mixed"``: LaMa-style thick strokes or a box of
20-60% of each side), and the UNet sees the first stage's encoding of the masked digit plus the mask at the latent
size (CompVis ``inpainting_big``'s conditioning: in_channels 3 + 3 + 1 = 7). Stage 1 and the UNet body are the
quickstart's (``configs/quickstart.py``).

The final samples inpaint NUM_HELD_OUT digits of the ``held_out`` split (never trained on), each with its own
mask (DDIM 50 steps, known pixels pasted back exactly): ``<workdir>/samples.npz`` holds ``images`` (the results),
``targets`` (the originals), ``masks`` [N, 32, 32] (1 = known) and ``labels`` (the true digit), and
``<workdir>/samples_grid.png`` rows of masked input | result | original.

    python train.py --config=configs/digits_inpaint.py --workdir=runs/digits_inpaint
    python benchmarks/conditioning_accuracy.py runs/digits_inpaint  # results vs the masked inputs vs originals

Measured on a 2-core CPU shared with other jobs (load average 3-5): 11.5 min wall for the whole command (stage 1
1:30, stage 2 1500 steps at ~3 steps/s, final samples 10 s). The masks hide 37% of the pixels on average. The
digit classifier of ``benchmarks/quickstart_accuracy.py`` reads 81 of the 120 inpainted held-out digits (0.675) as
their true digit, against 0.483 for the masked inputs themselves (unknown pixels black) and 0.975 for the
originals; chance 0.11.
"""

from configs import base, quickstart

NUM_HELD_OUT = 120


def get_config():
    config = quickstart.get_config()
    d = config.diffusion
    d.model.in_channels = 3 + 3 + 1  # latent + the masked digit's latent + the mask
    d.model.use_spatial_transformer = False
    d.model.context_dim = 0
    d.model.use_scale_shift_norm = True  # 32-channel GroupNorm(32) groups would normalise an added embedding away
    d.conditioning = base.conditioning("inpainting", mode="concat", mask_kind="mixed")
    d.latent_cache.enabled = False  # the masked images are made from the training images in each step
    d.train.num_steps = 1500
    d.train.checkpoint_every = 500
    d.sample.guidance_scale = 1.0
    d.sample.num_images = NUM_HELD_OUT
    d.sample.final_samples_per_class = 1
    d.sample.cond_data = base.data_config("digits_segmentation", resolution=32, split="held_out")
    config.data = base.data_config("digits_segmentation", resolution=32, split="train")
    return config
