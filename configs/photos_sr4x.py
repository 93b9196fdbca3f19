"""x4 super-resolution on real photos bundled with scikit-learn and scikit-image: 16x16 -> 64x64.

Training data: ``photo_crops``, random 64x64 crops of china, flower (``sklearn.datasets.load_sample_images``),
astronaut, coffee, rocket, immunohistochemistry and hubble_deep_field (``skimage.data``); the photo ``chelsea`` is
held out. Stage 1 is the quickstart's KL-f4 recipe at 64x64 (latents 16x16x3), trained longer on the photos. Stage
2 is LDM-SR: each crop is downsampled x4 (bicubic, antialiased) on the device in the train step and the 16x16
low-res image, latent-sized, is concatenated to the latent (in_channels 3 + 3 = 6).

The final samples upscale NUM_EVAL crops of the held-out photo (DDIM 50 steps): ``<workdir>/samples.npz`` holds
``images`` (the x4 outputs), ``inputs`` (the 16x16 low-res inputs) and ``targets`` (the ground truth), and
``<workdir>/samples_grid.png`` rows of input | output | target. At the end it logs PSNR / SSIM of the model and of
bicubic upsampling on those crops (also ``benchmarks/conditioning_accuracy.py``). The model's outputs cannot be
sharper than the first stage's reconstructions, which on this budget are blurry.

    python train.py --config=configs/photos_sr4x.py --workdir=runs/photos_sr4x

Measured on a 2-core CPU shared with other jobs: 15.5 min wall for the whole command (stage 1 600 steps 4:40, stage
2 2000 steps at ~4 steps/s 8:30, final samples 10 s). **The model does not work yet**: on 48 held-out crops
PSNR 11.67 dB / SSIM 0.259, against 31.03 dB / 0.770 for bicubic upsampling; the samples are coloured noise. What
was checked: the first stage reconstructs the held-out crops at 20.75 dB (the ceiling of any LDM on it); the
denoiser is sound where training put it (on noised true latents its eps error is 0.004-0.015 from t=300 to 999,
and dropping the low-res input raises it 8-10x at t <= 500, so the conditioning is used); but from pure noise every
sampler (DDIM 50 and 200 steps, DDIM eta 1, DDPM 1000 steps, DPM-Solver++ 20) drifts to latents 4-5x their real
scale, with or without the conditioning. The photo latents have per-channel means far from 0 relative to their
spread (scaled: 0.85 / -0.78 / 0.13 vs std 0.76 / 0.32 / 0.79), which the digit latents of the other demos do not.
"""

from configs import base, quickstart

NUM_EXAMPLES, NUM_EVAL = 4000, 48


def get_config():
    config = quickstart.get_config()
    ae = config.autoencoder
    ae.model.resolution = 64
    ae.train.update(dict(batch_size=8, num_steps=600, image_every=600, checkpoint_every=600))
    d = config.diffusion
    d.model.in_channels = 3 + 3
    d.model.use_spatial_transformer = False
    d.model.context_dim = 0
    d.model.use_scale_shift_norm = True
    d.model.channel_mult = (1, 2, 2)
    d.conditioning = base.conditioning("superres", mode="concat", sr_factor=4, degradation="bicubic")
    d.latent_cache.enabled = False  # the low-res images are made from the training crops in each step
    d.train.batch_size = 16
    d.train.num_steps = 2000
    d.train.checkpoint_every = 1000
    d.sample.guidance_scale = 1.0
    d.sample.num_images = NUM_EVAL
    d.sample.final_samples_per_class = 1
    d.sample.cond_data = base.data_config("photo_crops", resolution=64, num_examples=NUM_EVAL, split="held_out")
    config.data = base.data_config("photo_crops", resolution=64, num_examples=NUM_EXAMPLES, random_flip=True)
    return config
