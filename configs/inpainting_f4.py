"""Inpainting LDM-4 "big" (CompVis ``models/ldm/inpainting_big``; paper Sec. 4.5, Tab. 7): an image with a
region to fill -> the completed image, at 256x256. Published (Places, 512x512 after fine-tuning): FID 9.39 on
40-50% masked images, 1.50 over all masks.

- First stage: VQ-f4 without attention (``vq-f4-noattn``: ``attn_type="none"``), latents 64x64x3, scale_factor 1.0.
- Conditioning (``concat``, CompVis ``__is_first_stage__``): the first stage's encoding of the masked image
  (unknown pixels -1, as ``scripts/inpaint.py``) and the mask resized to the latent (nearest) in [-1, 1]
  (1 = to fill): UNet in_channels 3 + 3 + 1 = 7. Samples keep the known pixels exactly (paste-back).
- UNet 387.25M params (reference §1.3): 256 ch, mult 1,2,3,4, 2 res blocks, ``resblock_updown``, attention with
  8 heads at downsampling factors 8, 4, 2. T=1000, CompVis "linear" betas 0.0015 -> 0.0205, eps, **l1** loss.
- Training masks are made on the device in the train step: ``mixed`` = LaMa-style large masks (thick random
  strokes, or large boxes), as in the paper.

Values we had to choose: the released model's warm-up-cosine lr schedule has no published constants; lidiff uses a
1000-step linear warm-up to a constant AdamW (wd 0.01) lr of 1e-4, batch 48, 1M steps, EMA 0.9999; fp32.

Data (the user provides it): Places365 from tfds ``places365_small`` (labels unused), or ``:folder``
(``--config.data.path``). Sampling: ``python sample.py --workdir=DIR --cond_image=photo.png --mask=mask.png``
(white mask pixels are filled).
"""

from configs import base

VARIANTS = ("folder",)


def get_config(arg=None):
    variant = arg or "places"
    if variant not in ("places",) + VARIANTS:
        raise ValueError(f"configs/inpainting_f4.py: unknown variant {variant!r}; choose one of {VARIANTS}")
    data = base.data_config("tfds", resolution=256, tfds_name="places365_small", random_flip=True)
    if variant == "folder":
        data = base.data_config("folder", resolution=256, random_flip=True)
    unet = base.unet_model(in_channels=3 + 3 + 1, out_channels=3, model_channels=256, channel_mult=(1, 2, 3, 4),
                           num_res_blocks=2, attention_resolutions=(8, 4, 2), num_heads=8, num_head_channels=-1,
                           legacy=True, resblock_updown=True)
    diffusion = base.diffusion_stage(unet, batch_size=48, learning_rate=1e-4, linear_start=0.0015,
                                     linear_end=0.0205, loss_type="l1")
    diffusion.conditioning = base.conditioning("inpainting", mode="concat", mask_kind="mixed")
    diffusion.optim.warmup_steps = 1000
    diffusion.first_stage.scale_factor = 1.0
    diffusion.train.num_steps = 1_000_000
    diffusion.sample.steps = 50
    first = base.vq_f4_first_stage()
    first.model.attn_type = "none"
    return base.experiment(("diffusion",), data, first, diffusion)
