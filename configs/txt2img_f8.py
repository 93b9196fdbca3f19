"""Text-to-image LDM-KL-8-G (CompVis ``txt2img-1p4B``, "LDM-1.45B"; paper Tab. 2/15/17): MS-COCO 256 (30k
val prompts) FID 12.63, IS 30.29 with classifier-free guidance s=1.5 and 250 DDIM steps (23.31 without).

- First stage: KL-f8 (``configs/autoencoder_kl_f8.py``, the Stable Diffusion first stage), latents 32x32x4,
  a fixed scale_factor 0.18215 (not ``scale_by_std``). Point ``--config.diffusion.first_stage.workdir`` at a
  stage-1 workdir trained with that config (or convert the CompVis ``kl-f8`` checkpoint into one).
- UNet 872.30M params: 320 ch, mult 1,2,4,4, 2 res blocks, spatial transformers (depth 1, 8 heads of ch/8, not
  legacy) at downsampling factors 4, 2, 1 and in the middle block, cross-attending to a context of width 1280;
  ``remat`` (CompVis ``use_checkpoint``). T=1000, CompVis "linear" betas 0.00085 -> 0.012 (``scaled_linear``
  here), eps, l2.
- Text encoder (trained jointly): BERT tokenizer (bert-base-uncased, 30522 tokens, 77 per prompt) -> a 32-layer
  1280-wide transformer (8 heads x 64, the x-transformers encoder of CompVis ``BERTEmbedder``): 542.90M params.
  CompVis counts 582M because its checkpoint also holds an unused 39M ``to_logits`` head, which lidiff omits.
- ``p_uncond`` 0.1 is OUR CHOICE: the released code has no conditioning-dropout path and the paper gives no
  rate, yet CFG needs the model to know the empty prompt (the null input is the encoding of "").
- AdamW (wd 0.01) at lr 1e-4, batch 680, 390k steps (paper Tab. 15; the CompVis eval YAML's base_lr is 5e-5,
  which says nothing about training), EMA 0.9999 with warm-up, fp32. Use the batch that fits; lidiff never
  rescales the lr.
- Samples: DDIM 200 steps, eta 0, guidance 5.0 (the CompVis ``scripts/txt2img.py`` defaults).

What you must provide:

- ``--config.diffusion.conditioning.tokenizer``: a directory holding the bert-base-uncased tokenizer
  (``vocab.txt`` or ``tokenizer.json``); it is copied into the run. (Or ``conditioning.build_vocab=True`` to train a
  WordPiece vocabulary of up to ``vocab_size`` tokens on the training captions instead: not the paper's, and on
  tfds it reads the whole split once.)
- Captioned images. The paper trained on LAION-400M, which no loader here downloads; the default is tfds
  ``coco_captions`` (MS-COCO 2014 images in the Karpathy splits, split ``train``; one fixed caption of the ~5
  per image). The paper's FID is measured on COCO val, so this is a far smaller, in-domain
  substitute for LAION. Variants:
  ``:folder`` (``captioned_folder``: images with a ``<stem>.txt`` caption next to each) and ``:manifest``
  (``caption_manifest``: a .jsonl of {"image", "caption"} lines or a .csv, e.g. a LAION subset you downloaded).

    python train.py --config=configs/txt2img_f8.py --workdir=runs/txt2img \\
        --config.diffusion.conditioning.tokenizer=/models/bert-base-uncased \\
        --config.diffusion.first_stage.workdir=runs/kl_f8
    python train.py --config=configs/txt2img_f8.py:manifest --workdir=runs/txt2img \\
        --config.data.path=/data/laion_subset.jsonl --config.diffusion.conditioning.tokenizer=... \\
        --config.diffusion.first_stage.workdir=runs/kl_f8
"""

from configs import autoencoder_kl_f8, base

VARIANTS = ("tfds", "folder", "manifest")


def data(variant: str):
    if variant == "tfds":
        return base.data_config("tfds_captions", resolution=256, tfds_name="coco_captions",
                                caption_key="captions/text")
    if variant == "folder":
        return base.data_config("captioned_folder", resolution=256)
    if variant == "manifest":
        return base.data_config("caption_manifest", resolution=256)
    raise ValueError(f"configs/txt2img_f8.py: unknown variant {variant!r}; choose one of {VARIANTS}")


def unet(context_dim: int):
    """The txt2img-1p4B UNet (also Stable Diffusion v1's): 320 ch, mult 1,2,4,4, 2 res blocks, spatial transformers
    of 8 heads at factors 4, 2, 1, cross-attending to a context of width ``context_dim``."""
    return base.unet_model(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                           num_res_blocks=2, attention_resolutions=(4, 2, 1), num_heads=8, num_head_channels=-1,
                           legacy=False, use_spatial_transformer=True, transformer_depth=1, context_dim=context_dim,
                           remat=True)


def get_config(arg=None):
    variant = arg or "tfds"
    d = data(variant)  # refuses an unknown variant first
    diffusion = base.diffusion_stage(unet(context_dim=1280), batch_size=680, learning_rate=1e-4, schedule="scaled_linear",
                                     linear_start=0.00085, linear_end=0.012)
    diffusion.conditioning = base.conditioning("text", embed_dim=1280, n_layer=32, heads=8, dim_head=64,
                                               vocab_size=30522, max_length=77, tokenizer="", build_vocab=False,
                                               p_uncond=0.1)
    diffusion.first_stage.scale_factor = 0.18215
    diffusion.first_stage.scale_by_std = False
    diffusion.train.num_steps = 390_000
    diffusion.sample.steps = 200
    diffusion.sample.eta = 0.0
    diffusion.sample.guidance_scale = 5.0
    diffusion.sample.prompts = (
        "a painting of a virus monster playing guitar",
        "a photograph of a red bus parked on a city street",
        "a plate of food with broccoli and rice",
        "a cat sitting on a wooden bench",
    )
    diffusion.eval.guidance_scale = 1.5  # the published FID setting
    first_stage = autoencoder_kl_f8.get_config().autoencoder
    return base.experiment(("diffusion",), d, first_stage, diffusion)
