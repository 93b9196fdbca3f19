"""Semantic synthesis on scikit-learn's digits: trained on 32x32 single digits and their maps, sampled from 96x96
maps holding three digit-shaped regions, a size and a composition never seen in training.

Training data: ``digits_segmentation`` (the ``train`` split: 4 of every 5 digits), each 32x32 digit with its map
(0 = background, 1 + d on the ink of digit d). Stage 2 takes the one-hot map (11 classes) through a
``SpatialRescaler`` (2 bilinear halvings 32 -> 8: the fraction of each latent cell every class covers) concatenated
to the latent (in_channels 3 + 11 = 14). Stage 1 and the UNet body are the quickstart's (``configs/quickstart.py``).

The final samples come from NUM_MAPS maps of 96x96 (``digit_region_maps``, regions drawn from the ``held_out``
digits), i.e. 24x24 latents, DDIM 50 steps: ``<workdir>/samples.npz`` holds ``images`` [N, 96, 96, 3],
``segmentations`` [N, 96, 96], and each region's ``boxes`` [N, 3, 4] / ``box_labels`` [N, 3], and
``<workdir>/samples_grid.png`` rows of map | sample.

    python train.py --config=configs/digits_semantic.py --workdir=runs/digits_semantic
    python benchmarks/conditioning_accuracy.py runs/digits_semantic  # each region cropped and read as a digit

Measured on a 2-core CPU shared with other jobs: 6.5 min wall for the whole command (stage 1 1:20, latent cache
10 s, stage 2 1500 steps at 3-8 steps/s, final samples 8 s). 43 of the 48 regions (0.896) read as their digit
with the classifier of ``benchmarks/quickstart_accuracy.py``, against 0.958 for the same reading of the maps' own
ink (white on black) and 0.11 chance.
"""

from configs import base, quickstart

NUM_MAPS, SIZE = 16, 96


def get_config():
    config = quickstart.get_config()
    d = config.diffusion
    d.model.in_channels = 3 + 11
    d.model.use_spatial_transformer = False
    d.model.context_dim = 0
    d.model.use_scale_shift_norm = True
    d.conditioning = base.conditioning("semantic", mode="concat", num_classes=11, map_channels=0)
    d.latent_cache.enabled = True
    d.train.num_steps = 1500
    d.train.checkpoint_every = 500
    d.sample.guidance_scale = 1.0
    d.sample.num_images = NUM_MAPS
    d.sample.final_samples_per_class = 1
    d.sample.cond_data = base.data_config("digit_region_maps", resolution=SIZE, num_examples=NUM_MAPS,
                                          split="held_out")
    d.sample.cond_resolution = SIZE
    config.data = base.data_config("digits_segmentation", resolution=32, split="train")
    return config
