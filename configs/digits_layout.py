"""Layout-to-image on scikit-learn's digits: 1-3 digits placed in given boxes of a 64x64 canvas.

Training data: ``DigitsLayoutSource`` (``data.source = "digits_layout"``), NUM_EXAMPLES fixed layouts, each 1-3
of the bundled 8x8 digits upscaled into non-overlapping boxes of 16..32 px. Stage 1 is the quickstart's KL-f4
autoencoder at 64x64 (latents 16x16x3). Stage 2 conditions on the boxes: each box is three tokens
``[digit, coord(x0, y0), coord(x1, y1)]`` (``lidiff.models.layout``) of a 290-token vocabulary, i.e. a 17x17
coordinate grid with 4 px cells, the last token meaning "no box"; a 2-layer transformer tau_theta (width 64,
4 heads x 16) trained jointly with the UNet turns the 9 tokens into the cross-attention context. 10% of the
layouts are replaced by "no boxes" in training, for classifier-free guidance at sampling.

The final samples use NUM_LAYOUTS random layouts that were never trained on (``random_layouts``: a seed stream
apart from the training data's), SAMPLES_PER_LAYOUT each, into ``<workdir>/samples.npz`` (``images`` uint8
[N, 64, 64, 3], ``boxes`` [N, 3, 4] fractions, ``box_labels`` [N, 3], -1 = no box) and
``<workdir>/samples_grid.png`` (one row per layout).

    python train.py --config=configs/digits_layout.py --workdir=runs/digits_layout
    python benchmarks/conditioning_accuracy.py runs/digits_layout   # crops each box, reads the digit in it

Measured on a 2-core CPU shared with other jobs (a run of this demo's first setting): only about 0.2 of the
boxes read as the requested digit (the same reading of real layouts: 0.99). The model places digit-like strokes
in the boxes, but on this budget it does not yet draw the requested digit reliably.
"""

from configs import base

NUM_EXAMPLES = 4000
NUM_LAYOUTS, SAMPLES_PER_LAYOUT = 32, 4


def get_config():
    ae_model = base.autoencoder_model("kl", ch_mult=(1, 1, 2), z_channels=3, embed_dim=3, ch=32, num_res_blocks=1,
                                      resolution=64)
    ae_loss = base.autoencoder_loss(perceptual_weight=0.0, kl_weight=1e-6, disc_factor=0.0, disc_start=0,
                                    disc_num_layers=2, disc_ndf=32)
    ae = base.autoencoder_stage(ae_model, ae_loss, batch_size=8, learning_rate=1e-3)
    ae.train.num_steps = 300
    ae.train.log_every = 50
    ae.train.image_every = 300
    ae.train.checkpoint_every = 300

    unet = base.unet_model(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(2,), num_heads=4, num_head_channels=-1, legacy=False,
                           use_spatial_transformer=True, context_dim=64)
    diffusion = base.diffusion_stage(unet, batch_size=32, learning_rate=1e-3)
    diffusion.conditioning = base.conditioning("layout", num_classes=10, max_boxes=3, vocab_size=290, n_layer=2,
                                               embed_dim=64, heads=4, dim_head=16, p_uncond=0.1)
    diffusion.first_stage.scale_by_std = True
    diffusion.latent_cache.enabled = True
    diffusion.train.num_steps = 1000
    diffusion.train.ema_decay = 0.995
    diffusion.train.log_every = 100
    diffusion.train.sample_every = 0  # the final grid is <workdir>/samples_grid.png
    diffusion.train.checkpoint_every = 500
    diffusion.sample.steps = 50
    diffusion.sample.guidance_scale = 4.0
    diffusion.sample.num_images = NUM_LAYOUTS  # random layouts (final samples: a seed apart from the grids')
    diffusion.sample.final_samples_per_class = SAMPLES_PER_LAYOUT  # per layout: 32 x 4 = 128 samples
    data = base.data_config("digits_layout", resolution=64, num_examples=NUM_EXAMPLES, max_boxes=3)
    return base.experiment(("autoencoder", "diffusion"), data, ae, diffusion)
