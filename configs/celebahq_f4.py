"""CelebA-HQ 256 LDM-4 (paper Tab. 1/12; CompVis ``celebahq-ldm-vq-4``): FID 5.11 with 500 DDIM steps, eta 0.

- First stage: VQ-f4 (8192 codes), latents 64x64x3 taken before quantisation, scale_factor 1.0. Train it with
  ``configs/autoencoder_vq_f4.py`` (or ``--config.stages='("autoencoder","diffusion")'``) in the same workdir, or
  point ``--config.diffusion.first_stage.workdir`` at a stage-1 workdir.
- UNet 274.06M params; T=1000, CompVis "linear" betas 0.0015 -> 0.0195 (``scaled_linear`` here), eps, l2.
- AdamW (wd 0.01) at lr 9.6e-5 = CompVis's 2e-6 x batch 48 (its --scale_lr, one GPU), batch 48, EMA 0.9999
  with warm-up, 410k steps, fp32.
- Data: CelebA-HQ 256 (25k train images, SmallestMaxSize + CenterCrop 256, no flip). Either an image folder,
  ``--config.data.path=/data/celebahq256``, or ``--config.data.source=tfds --config.data.tfds_name=celeb_a_hq/256
  --config.data.manual_dir=...`` (tfds needs the CelebA-HQ files placed by hand).
"""

from configs import base


def get_config():
    diffusion = base.diffusion_stage(base.ldm_f4_unet(), batch_size=48, learning_rate=9.6e-5,
                                     linear_start=0.0015, linear_end=0.0195)
    diffusion.train.num_steps = 410_000
    diffusion.sample.steps = 200
    return base.experiment(("diffusion",), base.data_config("folder", resolution=256), base.vq_f4_first_stage(),
                           diffusion)
