"""Class-conditional ImageNet 256 LDM-4 (CompVis ``cin256-v2``; paper Tab. 3/15/18): FID 3.60, IS 247.67 with
classifier-free guidance s=1.5 and 250 DDIM steps (10.56 without guidance).

- First stage: VQ-f4 (8192 codes), latents 64x64x3 taken before quantisation, scale_factor 1.0. Train it with
  ``configs/autoencoder_vq_f4.py`` (or ``--config.stages='("autoencoder","diffusion")'``) in the same workdir, or
  point ``--config.diffusion.first_stage.workdir`` at a stage-1 workdir.
- UNet 400.92M params: 192 ch, mult 1,2,3,5, 2 res blocks, spatial transformers (depth 1, one head as wide as the
  block: ``legacy`` with ``num_heads=1``) at downsampling factors 8, 4, 2 (latent 8^2, 16^2, 32^2) and in the
  middle block, cross-attending to a context of width 512. T=1000, CompVis "linear" betas 0.0015 -> 0.0195
  (``scaled_linear`` here), eps, l2.
- Conditioning: ``ClassEmbedder`` 1001 x 512 (classes 0..999 and the null class 1000 that lidiff adds for
  guidance) -> a length-1 context [B, 1, 512], trained jointly with the UNet.
- ``p_uncond`` 0.1 is OUR CHOICE: the released CompVis code has no conditioning-dropout path and the paper does
  not give the rate it used (CompVis issues #116/#139), yet CFG needs a trained null class. 0.1 is the
  classifier-free-guidance paper's usual value.
- AdamW (wd 0.01) at lr 1e-4 (paper Tab. 15, the config's base_lr), batch 1200 (Tab. 15), 178k steps, EMA
  0.9999 with warm-up, fp32. Batch 1200 is the paper's global batch; use what fits and keep lr or rescale it
  yourself (lidiff never scales the lr).
- Samples: DDIM 250 steps, eta 0, guidance 1.5 (the published FID setting; eta is our choice).

Data: ImageNet-1k train at 256 (smaller side resized, center crop 256, no flip), labels 0..999.

- default: ``tfds`` ``imagenet2012`` with ``label_key="label"``. tfds cannot download ImageNet: place
  ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` in ``--config.data.manual_dir`` (or point
  ``--config.data.data_dir`` at an already prepared tfds directory).
- ``:folder``: a folder with one sub-folder per class (``n01440764/...``); labels are the sub-folders' indices in
  sorted order (``class_from_subdir``), which for the synset folders is the tfds / torchvision label order.

    python train.py --config=configs/cin256_f4.py --workdir=runs/cin256 \\
        --config.data.manual_dir=/data/imagenet_tars --config.diffusion.first_stage.workdir=runs/vq_f4
    python train.py --config=configs/cin256_f4.py:folder --workdir=runs/cin256 \\
        --config.data.path=/data/imagenet/train --config.diffusion.first_stage.workdir=runs/vq_f4
"""

from configs import base

VARIANTS = ("tfds", "folder")


def data(variant: str):
    if variant == "tfds":
        return base.data_config("tfds", resolution=256, tfds_name="imagenet2012", label_key="label")
    if variant == "folder":
        return base.data_config("folder", resolution=256, class_from_subdir=True)
    raise ValueError(f"configs/cin256_f4.py: unknown variant {variant!r}; choose one of {VARIANTS}")


def get_config(arg=None):
    variant = arg or "tfds"
    d = data(variant)  # refuses an unknown variant first
    unet = base.unet_model(in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5),
                           num_res_blocks=2, attention_resolutions=(8, 4, 2), num_heads=1, num_head_channels=-1,
                           legacy=True, use_spatial_transformer=True, transformer_depth=1, context_dim=512)
    diffusion = base.diffusion_stage(unet, batch_size=1200, learning_rate=1e-4, linear_start=0.0015,
                                     linear_end=0.0195)
    diffusion.conditioning = base.conditioning("class", mode="crossattn", num_classes=1000, embed_dim=512,
                                               p_uncond=0.1)
    diffusion.first_stage.scale_factor = 1.0
    diffusion.first_stage.scale_by_std = False
    diffusion.train.num_steps = 178_000
    diffusion.sample.steps = 250
    diffusion.sample.eta = 0.0
    diffusion.sample.guidance_scale = 1.5
    diffusion.eval.guidance_scale = 1.5
    return base.experiment(("diffusion",), d, base.vq_f4_first_stage(), diffusion)
