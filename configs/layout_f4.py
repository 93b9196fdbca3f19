"""Layout-to-image LDM-4 (CompVis ``layout2img-openimages256``; paper Tab. 9/15/17): boxes with class ids ->
256x256 images. Published: OpenImages FID 32.02, IS 15.92 (200 DDIM steps, eta 0, no guidance); the paper's COCO
number (40.91) is a different model (VQ-f8, 345M, fine-tuned from the OpenImages one), not reproduced here.

- First stage: VQ-f4 (8192 codes), latents 64x64x3 taken before quantisation, scale_factor 1.0. Train it with
  ``configs/autoencoder_vq_f4.py`` or point ``--config.diffusion.first_stage.workdir`` at a stage-1 workdir.
- UNet 246.3M params: 128 ch, mult 1,2,3,4, 2 res blocks, spatial transformers of depth 3 (32 channels per head,
  legacy) at downsampling factors 8, 4, 2 and in the middle block, cross-attending to a context of width 512.
  T=1000, CompVis "linear" betas 0.0015 -> 0.0205 (``scaled_linear`` here), eps, **l1** loss.
- Layout encoder (trained jointly): each box is 3 tokens [class, coord(x0, y0), coord(x1, y1)] of a shared
  8192-token vocabulary (a 90x90 coordinate grid), 30 boxes -> 90 tokens (CompVis has 92: it appends 2 crop
  tokens that lidiff's deterministic center crop does not need) -> a 16-layer 512-wide transformer (8 heads x
  64): 54.65M params.
- AdamW (wd 0.01) at lr 4.8e-5, batch 24: paper Tab. 15 (OpenImages column; = CompVis base_lr 2e-6 x 24),
  used as given. OpenImages: 4.4M steps (Tab. 15). EMA 0.9999 with warm-up, fp32.

Values we had to choose (not in the paper or the CompVis config):

- ``p_uncond`` 0.0: the published numbers use no guidance and the released code has no conditioning dropout.
  Set ``--config.diffusion.conditioning.p_uncond=0.1`` (and ``sample.guidance_scale`` > 1) to use CFG.
- COCO (the default data): the OpenImages architecture and optimiser settings above, 500k steps (4.4M would be
  ~900 epochs of COCO train2017's 118k images).
- Boxes per image: lidiff keeps the 30 largest that survive the center crop (CompVis's box selection and its
  random crop are not reproduced).

Data (the user provides it; boxes come from a COCO-style instances JSON, crowd boxes skipped):

- default: COCO 2017, 80 classes (category ids in sorted order -> 0..79):
  ``--config.data.annotation_json=/data/coco/annotations/instances_train2017.json``
  ``--config.data.path=/data/coco/train2017``.
- ``:openimages``: 601 box classes. lidiff has no OpenImages reader: convert its box CSVs
  (``oidv6-train-annotations-bbox.csv`` + class descriptions) into one COCO-style JSON with 601 categories
  (``annotation_json``, images under ``path``; OpenImages boxes are fractions of the image: multiply by each
  image's width and height to get COCO's pixel ``[x, y, w, h]``).

Periodic and final samples use ``sample.layout_file`` (a ``sample.py --layout`` JSON); when it is empty they use
random digit layouts, i.e. boxes of classes 0..9 (COCO: person, bicycle, car, ...).

    python train.py --config=configs/layout_f4.py --workdir=runs/layout_coco \\
        --config.data.annotation_json=/data/coco/annotations/instances_train2017.json \\
        --config.data.path=/data/coco/train2017 --config.diffusion.first_stage.workdir=runs/vq_f4
"""

from configs import base

VARIANTS = ("coco", "openimages")
NUM_BOX_CLASSES = {"coco": 80, "openimages": 601}
NUM_STEPS = {"coco": 500_000, "openimages": 4_400_000}


def get_config(arg=None):
    variant = arg or "coco"
    if variant not in VARIANTS:
        raise ValueError(f"configs/layout_f4.py: unknown variant {variant!r}; choose one of {VARIANTS}")
    # data.max_boxes 0: the source keeps every box; the loader keeps the conditioning.max_boxes largest after the
    # center crop.
    data = base.data_config("coco_layout", resolution=256, max_boxes=0)
    unet = base.unet_model(in_channels=3, out_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4),
                           num_res_blocks=2, attention_resolutions=(8, 4, 2), num_heads=-1, num_head_channels=32,
                           legacy=True, use_spatial_transformer=True, transformer_depth=3, context_dim=512)
    diffusion = base.diffusion_stage(unet, batch_size=24, learning_rate=4.8e-5, linear_start=0.0015,
                                     linear_end=0.0205, loss_type="l1")
    diffusion.conditioning = base.conditioning("layout", num_classes=NUM_BOX_CLASSES[variant], max_boxes=30,
                                               vocab_size=8192, embed_dim=512, n_layer=16, heads=8, dim_head=64,
                                               p_uncond=0.0)
    diffusion.first_stage.scale_factor = 1.0
    diffusion.first_stage.scale_by_std = False
    diffusion.train.num_steps = NUM_STEPS[variant]
    diffusion.sample.steps = 200
    diffusion.sample.eta = 0.0
    diffusion.sample.guidance_scale = 1.0
    return base.experiment(("diffusion",), data, base.vq_f4_first_stage(), diffusion)
