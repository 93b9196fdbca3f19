"""Semantic synthesis LDM-4 (CompVis ``models/ldm/semantic_synthesis256``; paper Sec. 4.3.2, Fig. 8): a
segmentation map -> a landscape image, trained on 256x256 crops and sampled at 512 and far larger (the UNet is
convolutional; ``sample.py --segmentation=map.png`` renders the map's size, ``--tile`` bounds memory).

- First stage: VQ-f4 (8192 codes), latents 64x64x3, scale_factor 1.0.
- Conditioning (``concat``): the one-hot map over 182 classes (COCO-Stuff labels, as the landscapes data) through
  a ``SpatialRescaler`` (2 bilinear halvings 256 -> 64, then a bias-free 1x1 map 182 -> 3, trained with the UNet):
  UNet in_channels 3 + 3 = 6.
- UNet 215.2M params (reference §1.3): 128 ch, mult 1,4,8, 2 res blocks, attention with 8 heads at downsampling
  factors 32, 16, 8 (no level reaches them below 64/4 = 16: CompVis's config lists them; only the middle block's
  attention is built). T=1000, CompVis "linear" betas 0.0015 -> 0.0205, eps, **l1** loss.

Values we had to choose (the landscapes data and optimiser settings are not published): AdamW (wd 0.01) at lr
1e-4, batch 48, 500k steps, EMA 0.9999; fp32.

Data (the user provides it): paired folders, images in ``--config.data.path`` and class-id PNGs named like them
in ``--config.data.maps_path`` (``a.jpg`` <-> ``a.png``; greyscale, palette or 16-bit).
"""

from configs import base

NUM_CLASSES = 182


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/semantic_f4.py: unknown variant {arg!r}; it has none (set data.path and "
                         "data.maps_path)")
    data = base.data_config("segmentation_folder", resolution=256)
    unet = base.unet_model(in_channels=3 + 3, out_channels=3, model_channels=128, channel_mult=(1, 4, 8),
                           num_res_blocks=2, attention_resolutions=(32, 16, 8), num_heads=8, num_head_channels=-1,
                           legacy=True)
    diffusion = base.diffusion_stage(unet, batch_size=48, learning_rate=1e-4, linear_start=0.0015,
                                     linear_end=0.0205, loss_type="l1")
    diffusion.conditioning = base.conditioning("semantic", mode="concat", num_classes=NUM_CLASSES, map_channels=3)
    diffusion.first_stage.scale_factor = 1.0
    diffusion.train.num_steps = 500_000
    diffusion.sample.steps = 200
    return base.experiment(("diffusion",), data, base.vq_f4_first_stage(), diffusion)
