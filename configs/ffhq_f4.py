"""FFHQ 256 LDM-4 (paper Tab. 1/12): FID 4.98 with 200 DDIM steps, eta 1. As CelebA-HQ but batch 42,
lr 8.4e-5 (= 2e-6 x 42), 635k steps. Point ``data.path`` at the FFHQ 256 images."""

from configs import base


def get_config():
    diffusion = base.diffusion_stage(base.ldm_f4_unet(), batch_size=42, learning_rate=8.4e-5,
                                     linear_start=0.0015, linear_end=0.0195)
    diffusion.train.num_steps = 635_000
    diffusion.sample.steps = 200
    diffusion.sample.eta = 1.0
    return base.experiment(("diffusion",), base.data_config("folder", resolution=256), base.vq_f4_first_stage(),
                           diffusion)
