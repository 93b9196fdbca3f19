"""Quickstart: both LDM stages on scikit-learn's bundled digits, on a laptop CPU in minutes.

Stage 1 trains a small KL-f4 autoencoder (32x32x3 -> 8x8x3) with the L1 loss only: no LPIPS (its weights are not
bundled) and no PatchGAN (``disc_factor=0``: on 8x8-pixel digits it would cost 2.5x per step and add nothing the
digit classifier can see; ``configs/digits_kl.py`` trains the full L1 + GAN loss). Stage 2 trains a small
class-conditional LDM on cached latents (ClassEmbedder -> cross-attention, 10% null-label dropout for
classifier-free guidance), then writes ``<workdir>/samples.npz`` (``images``, ``labels``) and
``<workdir>/samples_grid.png``: one row per digit 0-9, DDIM with guidance scale 5.

    python train.py --config=configs/quickstart.py --workdir=runs/quickstart
    python benchmarks/quickstart_accuracy.py runs/quickstart      # how often the samples show the asked digit

Sized for 2 CPU cores: about 5 minutes on an idle machine, 10-12 with other jobs competing (1.0M + 1.0M
params). Tuned on that budget: the learning rate 1e-3 (3e-4 learns 2x slower), one 32-channel UNet level per
resolution, EMA decay 0.995 (0.9999 would still remember the first steps), guidance 5 (samples read as the asked
digit ~95% of the time vs ~80% without guidance).
"""

from configs import base


def get_config():
    ae_model = base.autoencoder_model("kl", ch_mult=(1, 1, 2), z_channels=3, embed_dim=3, ch=32, num_res_blocks=1,
                                      resolution=32)
    ae_loss = base.autoencoder_loss(perceptual_weight=0.0, kl_weight=1e-6, disc_factor=0.0, disc_start=0,
                                    disc_num_layers=2, disc_ndf=32)
    ae = base.autoencoder_stage(ae_model, ae_loss, batch_size=16, learning_rate=1e-3)
    ae.train.num_steps = 400
    ae.train.log_every = 50
    ae.train.image_every = 400
    ae.train.checkpoint_every = 400

    unet = base.unet_model(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(2,), num_heads=4, num_head_channels=-1, legacy=False,
                           use_spatial_transformer=True, context_dim=64)
    diffusion = base.diffusion_stage(unet, batch_size=64, learning_rate=1e-3)
    diffusion.conditioning.kind = "class"
    diffusion.conditioning.num_classes = 10
    diffusion.conditioning.embed_dim = 64
    diffusion.conditioning.p_uncond = 0.1
    diffusion.first_stage.scale_by_std = True
    diffusion.latent_cache.enabled = True
    diffusion.train.num_steps = 1500
    diffusion.train.ema_decay = 0.995
    diffusion.train.log_every = 100
    diffusion.train.sample_every = 0  # the final grid is <workdir>/samples_grid.png
    diffusion.train.checkpoint_every = 500
    diffusion.sample.steps = 50
    diffusion.sample.guidance_scale = 5.0
    diffusion.sample.num_images = 20
    diffusion.sample.final_samples_per_class = 10
    return base.experiment(("autoencoder", "diffusion"), base.data_config("digits", resolution=32), ae, diffusion)
