"""x4 super-resolution LDM-4 (CompVis ``models/ldm/bsr_sr``; paper Sec. 4.4, Tab. 5): a 64x64 low-res image ->
a 256x256 image. Published (ImageNet, bicubic x4, 100 DDIM steps): FID 2.8 / 4.8, IS 166.3 (169M model).

- First stage: VQ-f4 (8192 codes), latents 64x64x3 before quantisation, scale_factor 1.0. Train it with
  ``configs/autoencoder_vq_f4.py`` or point ``--config.diffusion.first_stage.workdir`` at a stage-1 workdir.
- Conditioning (``concat``): the 64x64 low-res image is already latent-sized, so it is concatenated to x_t as it is
  (CompVis's Identity cond stage): UNet in_channels 3 + 3 = 6.
- UNet 113.6M params (reference §1.3): 160 ch, mult 1,2,2,4, 2 res blocks, attention (32 channels per head) at
  downsampling factors 16 and 8. T=1000, CompVis "linear" betas 0.0015 -> 0.0155, eps, l2.
- Training inputs: each 256x256 crop is downsampled x4 on the device in the train step (``degradation``:
  ``bicubic``, the paper's Tab. 5 setting; the ``:bsr`` variant uses ``bsr_light``, a blur + random-kernel
  downsampling + noise approximation of the BSR degradation of the released OpenImages model, without its JPEG
  step).

Values we had to choose (the reference gives no optimiser settings for SR): AdamW (wd 0.01) at lr 1e-4, batch
64, 1M steps, EMA 0.9999 with warm-up; fp32.

Data (the user provides it): ImageNet from tfds ``imagenet2012`` (labels unused), or ``:folder``, a folder of
images (``--config.data.path``). Sampling: ``python sample.py --workdir=DIR --cond_image=low_res.png`` upscales an
image of any size whose sides are whole pixels (a 128x128 input gives 512x512); add ``--tile=64`` for inputs whose
latents do not fit in memory at once.
"""

from configs import base

VARIANTS = ("folder", "bsr")


def get_config(arg=None):
    variant = arg or "imagenet"
    if variant not in ("imagenet",) + VARIANTS:
        raise ValueError(f"configs/sr4x_f4.py: unknown variant {variant!r}; choose one of {VARIANTS}")
    data = base.data_config("tfds", resolution=256, tfds_name="imagenet2012", random_flip=True)
    if variant == "folder":
        data = base.data_config("folder", resolution=256, random_flip=True)
    unet = base.unet_model(in_channels=3 + 3, out_channels=3, model_channels=160, channel_mult=(1, 2, 2, 4),
                           num_res_blocks=2, attention_resolutions=(16, 8), num_heads=-1, num_head_channels=32,
                           legacy=True)
    diffusion = base.diffusion_stage(unet, batch_size=64, learning_rate=1e-4, linear_start=0.0015,
                                     linear_end=0.0155)
    diffusion.conditioning = base.conditioning("superres", mode="concat", sr_factor=4,
                                               degradation="bsr_light" if variant == "bsr" else "bicubic")
    diffusion.first_stage.scale_factor = 1.0
    diffusion.train.num_steps = 1_000_000
    diffusion.sample.steps = 100
    diffusion.sample.eta = 1.0
    return base.experiment(("diffusion",), data, base.vq_f4_first_stage(), diffusion)
