"""Text-to-image with a frozen CLIP text encoder, Stable Diffusion v1's model (``v1-inference.yaml``).

- First stage: KL-f8 (``configs/autoencoder_kl_f8.py``, the SD first stage), images 512x512 -> latents 64x64x4,
  a fixed scale_factor 0.18215. Point ``--config.diffusion.first_stage.workdir`` at a stage-1 workdir (or import
  SD's ``vae/`` with ``python -m lidiff.convert``).
- UNet 859.52M params: the txt2img-1p4B UNet (320 ch, mult 1,2,4,4, 2 res blocks, spatial transformers of 8 heads
  at factors 4, 2, 1 and the middle) with ``context_dim`` 768, the CLIP width; conv ``proj_in``; ``remat``.
  T=1000, betas 0.00085 -> 0.012 (``scaled_linear``), eps, l2.
- Text encoder: CLIP ViT-L/14's text tower (123.06M params), **frozen**: never in the optimizer or the train
  state, ``last_hidden_state`` [77, 768] (``clip_output="last"``). Its weights are a Hugging Face
  ``CLIPTextModel`` folder (``conditioning.text_encoder``) and its BPE tokenizer a ``CLIPTokenizer`` folder
  (``conditioning.tokenizer``); both are copied into the run directory. ``latent_cache.text_embeddings`` (with the
  latent cache) computes each caption's CLIP output once instead of in every step.
- ``p_uncond`` 0.1: SD v1.5 drops 10% of the text conditioning for classifier-free guidance.
- AdamW (wd 0.01) at lr 1e-4 after a 10k-step linear warm-up (SD v1), EMA 0.9999, fp32. SD v1 trained with batch
  2048; use the batch that fits: lidiff never rescales the lr.
- Samples: PLMS 50 steps, guidance 7.5 (SD's ``scripts/txt2img.py`` defaults).

What you must provide: the CLIP folders (e.g. the ``text_encoder/`` and ``tokenizer/`` of a Stable Diffusion
repository downloaded elsewhere), captioned images (variants as ``configs/txt2img_f8.py``: ``tfds`` COCO captions,
``:folder``, ``:manifest``), and the first stage:

    python train.py --config=configs/txt2img_clip_f8.py:folder --workdir=runs/sd \\
        --config.data.path=/data/captioned --config.diffusion.first_stage.workdir=runs/sd_vae \\
        --config.diffusion.conditioning.text_encoder=/models/sd-v1-5/text_encoder \\
        --config.diffusion.conditioning.tokenizer=/models/sd-v1-5/tokenizer

To fine-tune released Stable Diffusion weights instead, import them (``python -m lidiff.convert --src
/models/sd-v1-5 --out runs/sd``) and train with the config the import writes.
"""

from configs import autoencoder_kl_f8, base, txt2img_f8

VARIANTS = txt2img_f8.VARIANTS
RESOLUTION = 512


def get_config(arg=None):
    d = txt2img_f8.data(arg or "tfds")  # refuses an unknown variant first
    d.resolution = RESOLUTION
    diffusion = base.diffusion_stage(txt2img_f8.unet(context_dim=768), batch_size=2048, learning_rate=1e-4, schedule="scaled_linear",
                                     linear_start=0.00085, linear_end=0.012)
    diffusion.optim.warmup_steps = 10_000
    diffusion.conditioning = base.conditioning("text", encoder="clip", clip_output="last", embed_dim=768,
                                               max_length=77, text_encoder="", tokenizer="", p_uncond=0.1)
    diffusion.first_stage.scale_factor = 0.18215
    diffusion.first_stage.scale_by_std = False
    diffusion.sample.sampler = "plms"
    diffusion.sample.steps = 50
    diffusion.sample.guidance_scale = 7.5
    diffusion.sample.prompts = (
        "a photograph of an astronaut riding a horse",
        "a painting of a virus monster playing guitar",
        "a cat sitting on a wooden bench",
        "a red bus parked on a city street",
    )
    diffusion.eval.guidance_scale = 7.5
    first_stage = autoencoder_kl_f8.get_config().autoencoder
    first_stage.model.resolution = RESOLUTION
    return base.experiment(("diffusion",), d, first_stage, diffusion)
