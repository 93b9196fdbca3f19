"""LSUN-Churches 256 LDM-8 (paper Tab. 1/12; CompVis ``lsun_churches-ldm-kl-8``): FID 4.02.

- First stage: KL-f8, latents 32x32x4, ``scale_by_std``: scale_factor = 1/std of the first batch's latents,
  computed once and stored in the checkpoint.
- UNet 294M: 192 ch, mult 1,2,2,4,4, attention at 8,4,2,1... as CompVis (downsampling factors 1,2,4,8), 8 heads,
  scale-shift norm, resblock up/down. Betas 0.0015 -> 0.0155, **l1** loss.
- lr 5e-5 used as is (no scaling) with a 10k-step linear warm-up, batch 96, 500k steps.
"""

from configs import base


def get_config():
    unet = base.unet_model(in_channels=4, out_channels=4, model_channels=192, channel_mult=(1, 2, 2, 4, 4),
                           num_res_blocks=2, attention_resolutions=(1, 2, 4, 8), num_heads=8, num_head_channels=-1,
                           use_scale_shift_norm=True, resblock_updown=True)
    diffusion = base.diffusion_stage(unet, batch_size=96, learning_rate=5e-5, linear_start=0.0015,
                                     linear_end=0.0155, loss_type="l1")
    diffusion.optim.warmup_steps = 10_000
    diffusion.first_stage.scale_by_std = True
    diffusion.train.num_steps = 500_000
    diffusion.sample.steps = 200
    first = base.autoencoder_model("kl", ch_mult=(1, 2, 4, 4), z_channels=4, embed_dim=4)
    loss = base.autoencoder_loss(disc_start=50001, kl_weight=1e-6, disc_weight=0.5)
    return base.experiment(("diffusion",), base.data_config("folder", resolution=256),
                           base.autoencoder_stage(first, loss, batch_size=24, learning_rate=1.08e-4), diffusion)
