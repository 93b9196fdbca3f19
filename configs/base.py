"""Shared defaults for lidiff experiment configs.

A config is plain data (``ml_collections.ConfigDict``): no device queries, no I/O. Field names follow the
CompVis YAML (``ch_mult``, ``z_channels``, ``attention_resolutions``, ``num_head_channels``, ``linear_start``,
``scale_factor``) so a lidiff config reads side by side with the paper's. Everything that changes numerics is
a field here: the learning rate is the learning rate (never scaled by batch size or device count), and
``scale_factor``, EMA decay, dtype and the attention kernel are explicit.

Layout of a full config::

    seed, stages                    which stages ``train.py`` runs, in order: ("autoencoder",), ("diffusion",)...
    data.*                          image source shared by both stages
    autoencoder.model.*             stage 1 architecture (also read by stage 2 to load the frozen first stage)
    autoencoder.loss.* / .optim.* / .train.*
    diffusion.model.*               UNet
    diffusion.process.*             beta schedule, parameterization, loss
    diffusion.conditioning.*        none | class | text | layout, and the encoder's settings
    diffusion.first_stage.*         where the frozen autoencoder comes from, scale_factor
    diffusion.latent_cache.* / .optim.* / .train.* / .sample.*
    parallel.fsdp                   devices each trained tensor is sharded over (1 = replicated, -1 = all)
"""

from __future__ import annotations

from ml_collections import ConfigDict


def data_config(source: str = "folder", resolution: int = 256, **overrides) -> ConfigDict:
    c = ConfigDict()
    # folder | tfds | digits | synthetic; captions: captioned_folder | caption_manifest | tfds_captions |
    # digits_captions; layouts: coco_layout | digits_layout; maps: segmentation_folder | digits_segmentation;
    # photos: photo_crops
    c.source = source
    c.path = ""  # (captioned_)folder: image root, recursive; caption_manifest: .jsonl/.csv; coco_layout: images
    c.maps_path = ""  # segmentation_folder: class-id PNGs named like the images (a.jpg <-> a.png)
    c.held_out = "chelsea"  # photo_crops: the photo kept out of training (split="held_out" reads only it)
    c.class_from_subdir = False  # folder: label = index of the first-level sub-folder
    c.tfds_name = ""  # tfds: dataset name, e.g. "celeb_a_hq/256"
    c.split = "train"  # tfds split; photo_crops: train | held_out
    c.data_dir = ""  # tfds data_dir ("" = tfds default)
    c.manual_dir = ""  # tfds manual_dir for datasets that need files placed by hand
    c.image_key = "image"
    c.label_key = ""  # tfds feature holding the class label ("" = unconditional)
    c.caption_key = ""  # tfds_captions: the text feature path, e.g. "captions/text"
    c.annotation_json = ""  # coco_layout: COCO instances JSON (images under path)
    c.max_boxes = 0  # layouts: boxes kept per image (0 = the source's default: all for COCO, 3 digits)
    c.num_examples = 1024  # synthetic, digits_layout and photo_crops
    c.num_classes = 0  # synthetic only (0 = no labels)
    c.resolution = resolution  # images are resized (smaller side) and center-cropped to this
    c.random_flip = False
    c.num_threads = 8
    c.update(overrides)
    return c


def autoencoder_model(
    kind: str,
    ch_mult: tuple[int, ...],
    z_channels: int,
    embed_dim: int,
    attn_resolutions: tuple[int, ...] = (),
    n_embed: int = 0,
    ch: int = 128,
    num_res_blocks: int = 2,
    resolution: int = 256,
    attn_type: str = "vanilla",
) -> ConfigDict:
    c = ConfigDict()
    c.kind = kind  # kl | vq
    c.ch = ch
    c.ch_mult = ch_mult  # f = 2 ** (len(ch_mult) - 1)
    c.num_res_blocks = num_res_blocks
    c.attn_resolutions = attn_resolutions  # pixel resolutions (the mid block always has attention)
    c.attn_type = attn_type  # vanilla | none (no attention anywhere, incl. the mid block)
    c.resolution = resolution
    c.z_channels = z_channels
    c.double_z = kind == "kl"
    c.embed_dim = embed_dim
    c.dropout = 0.0
    c.n_embed = n_embed  # vq: codebook size
    c.beta = 0.25  # vq: commitment weight
    c.legacy = True  # vq: beta on the codebook term, as the released VQ models
    c.l2_normalized_codes = False  # vq: cosine-similarity lookup (a fix for dead codes), off as in the paper
    c.dead_code_restart = False  # vq: move rarely used codes onto encoder outputs, off as in the paper
    c.dead_code_threshold = 1.0  # vq: dead = used fewer times per batch than this (moving average)
    c.dead_code_restart_every = 200  # vq: steps between restarts
    c.attention_kernel = "auto"  # auto | xla | cudnn | reference
    return c


def autoencoder_loss(**overrides) -> ConfigDict:
    c = ConfigDict()
    c.reconstruction = "l1"  # l1 | l2
    c.perceptual_weight = 1.0  # LPIPS; needs lpips_weights
    c.lpips_weights = ""  # converted LPIPS file (python -m lidiff.convert.lpips_weights)
    c.kl_weight = 1e-6  # kl models
    c.codebook_weight = 1.0  # vq models
    c.disc_start = 50001  # step at which the adversarial terms switch on
    c.disc_weight = 0.5
    c.disc_factor = 1.0
    c.disc_loss = "hinge"  # hinge | vanilla
    c.disc_num_layers = 3
    c.disc_ndf = 64
    c.disc_norm = "batch"  # batch (statistics over the global batch) | none
    c.learn_logvar = False  # kl models: a learned scalar logvar on the reconstruction term
    c.logvar_init = 0.0
    c.update(overrides)
    return c


def autoencoder_stage(model: ConfigDict, loss: ConfigDict, batch_size: int, learning_rate: float) -> ConfigDict:
    c = ConfigDict()
    c.model = model
    c.loss = loss
    c.optim = ConfigDict()
    c.optim.learning_rate = learning_rate  # generator Adam lr, used as given
    c.optim.disc_learning_rate = learning_rate  # discriminator Adam lr
    c.optim.b1 = 0.5
    c.optim.b2 = 0.9
    c.train = ConfigDict()
    c.train.batch_size = batch_size  # global batch, over all devices and processes
    c.train.num_steps = 500_000
    c.train.ema_decay = 0.0  # 0 = no EMA of the autoencoder params
    c.train.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.train.log_every = 100
    c.train.image_every = 5000
    c.train.checkpoint_every = 5000
    c.train.keep_checkpoints = 3
    return c


def unet_model(**overrides) -> ConfigDict:
    c = ConfigDict()
    c.in_channels = 3
    c.out_channels = 3
    c.model_channels = 224
    c.channel_mult = (1, 2, 3, 4)
    c.num_res_blocks = 2
    c.attention_resolutions = (8, 4, 2)  # downsampling factors, as in the CompVis YAML
    c.num_heads = -1
    c.num_head_channels = 32
    c.legacy = True
    c.use_scale_shift_norm = False
    c.resblock_updown = False
    c.use_spatial_transformer = False
    c.transformer_depth = 1
    c.context_dim = 0  # 0 = no cross-attention context
    c.use_linear_in_transformer = False
    c.dropout = 0.0
    c.attention_kernel = "auto"
    c.remat = False  # rematerialise blocks in the backward pass (less memory, more compute)
    c.update(overrides)
    return c


def conditioning(kind: str = "none", **overrides) -> ConfigDict:
    """``diffusion.conditioning``: which encoder tau_theta turns which raw input into the UNet's conditioning."""
    c = ConfigDict()
    # none | class (labels) | text (captions -> tokens) | layout (boxes with class ids) |
    # superres (low-res image) | inpainting (masked image + mask) | semantic (segmentation map)
    c.kind = kind
    # crossattn (context [B, L, D]) | adm (class: label_emb added to the time embedding) |
    # hybrid (layout: the context, plus a box map per class concatenated to x_t) |
    # concat (superres / inpainting / semantic: a map at the latent's size concatenated to x_t)
    c.mode = "crossattn"
    c.num_classes = 0  # class: real classes, index num_classes is the null class; layout: box classes;
    #                    semantic: class ids of the maps (one-hot channels)
    c.embed_dim = 512  # context width D of the encoder (= model.context_dim for crossattn)
    c.p_uncond = 0.0  # probability of replacing a row's conditioning by the null input in training (for CFG)
    c.n_layer = 0  # text / layout: transformer blocks
    c.heads = 8  # text / layout: attention heads (x-transformers default)
    c.dim_head = 64  # text / layout: width per head
    c.attention_kernel = "auto"  # text / layout transformer: auto | xla | cudnn | reference
    c.vocab_size = 0  # text: token table size (0 = the tokenizer's); layout: 8192 as CompVis
    c.max_length = 77  # text: tokens per prompt ([CLS] ... [SEP] [PAD]...)
    c.encoder = "transformer"  # text: transformer (trained jointly, CompVis BERTEmbedder) | clip (frozen, pretrained)
    c.text_encoder = ""  # text, encoder=clip: a Hugging Face CLIPTextModel folder (config.json, model.safetensors),
    #                      copied into the run; never trained
    c.clip_output = "last"  # encoder=clip: last (SD v1, diffusers' SD v2 folder) | penultimate (a full OpenCLIP tower)
    c.tokenizer = ""  # text: a tokenizer directory (BERT: vocab.txt or tokenizer.json; clip: a CLIPTokenizer's),
    #                   copied into the run
    c.build_vocab = False  # text: no tokenizer given -> train a WordPiece vocabulary on the training captions
    c.max_boxes = 0  # layout: boxes per image K (the sequence is 3K tokens)
    c.sr_factor = 4  # superres: high-res side / low-res side
    c.degradation = "bicubic"  # superres, training inputs: bicubic | bsr_light (blur + downsample + noise)
    c.mask_kind = "mixed"  # inpainting, training masks: box | freeform | mixed (LaMa-style large masks)
    c.map_channels = 0  # semantic: width of the SpatialRescaler's 1x1 map (0 = the one-hot map as it is)
    c.update(overrides)
    return c


def diffusion_stage(unet: ConfigDict, batch_size: int, learning_rate: float, **process) -> ConfigDict:
    c = ConfigDict()
    c.model = unet
    c.process = ConfigDict()
    c.process.schedule = "scaled_linear"  # CompVis "linear" (linear in sqrt(beta)) | linear | cosine | sqrt
    c.process.num_timesteps = 1000
    c.process.linear_start = 0.0015
    c.process.linear_end = 0.0195
    c.process.parameterization = "eps"  # eps | x0 | v
    c.process.loss_type = "l2"  # l2 | l1
    c.process.min_snr_gamma = 0.0  # 0 = plain loss (the paper); e.g. 5.0 for min-SNR-gamma weighting
    c.process.update(process)
    c.conditioning = conditioning()
    c.first_stage = ConfigDict()
    c.first_stage.workdir = ""  # a stage-1 workdir ("" = the autoencoder stage of this run)
    c.first_stage.use_ema = True  # use the autoencoder's EMA params when it has them
    c.first_stage.scale_factor = 1.0  # latents are multiplied by this
    c.first_stage.scale_by_std = False  # True: scale_factor = 1/std of the first batch's latents, saved once
    c.latent_cache = ConfigDict()
    c.latent_cache.enabled = False  # encode the dataset once and train from the cached latents
    c.latent_cache.path = ""  # "" = <workdir>/diffusion/latents.npz
    c.latent_cache.text_embeddings = False  # frozen text encoders: cache each caption's embedding beside its latent
    c.optim = ConfigDict()
    c.optim.learning_rate = learning_rate  # AdamW lr, used as given
    c.optim.warmup_steps = 0  # linear warm-up from 0
    c.optim.grad_clip_norm = 0.0  # 0 = no clipping (the paper)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01  # torch AdamW default, as CompVis
    c.train = ConfigDict()
    c.train.batch_size = batch_size
    c.train.num_steps = 500_000
    c.train.ema_decay = 0.9999
    c.train.ema_warmup = True  # decay min(ema_decay, (1 + n) / (10 + n)), as CompVis LitEma
    c.train.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.train.log_every = 100
    c.train.sample_every = 5000
    c.train.checkpoint_every = 5000
    c.train.keep_checkpoints = 3
    c.sample = ConfigDict()
    c.sample.sampler = "ddim"  # ddim | ddpm | plms | dpm_solver++
    c.sample.steps = 200
    c.sample.eta = 0.0
    c.sample.guidance_scale = 1.0
    c.sample.num_images = 16  # periodic sample grids
    c.sample.final_samples_per_class = 0  # >0: this many per class / prompt / layout into <workdir>/samples.npz
    c.sample.prompts = ()  # text models: prompts of the sample grids, final samples and in-training FID
    c.sample.prompt_labels = ()  # optional: the class each prompt names, recorded as labels in samples.npz
    c.sample.layout_file = ""  # layout models: a layout JSON (sample.py --layout format); "" = random digit layouts
    # superres / inpainting / semantic: the data whose images (or maps) condition the grids and final samples,
    # e.g. a held-out split ("" source = config.data), read at cond_resolution (0 = data.resolution)
    c.sample.cond_data = data_config("")
    c.sample.cond_resolution = 0
    c.eval = ConfigDict()  # in-training FID of EMA samples (lidiff.train.evaluator)
    c.eval.every = 0  # steps between evaluations (0 = off)
    c.eval.num_samples = 2048  # EMA samples per evaluation (FID is biased below ~2048; papers use 50k)
    c.eval.reference_stats = ""  # .npz with mu, sigma: python -m lidiff.eval --samples <config> --save_stats F
    c.eval.inception_weights = ""  # python -m lidiff.convert.inception_weights --pth ... --out F
    c.eval.allow_random_inception = False  # tests only: a random Inception, logged as eval/fid_random_inception
    c.eval.batch_size = 64
    c.eval.sampler = "ddim"
    c.eval.steps = 50
    c.eval.eta = 0.0
    c.eval.guidance_scale = 1.0
    return c


def experiment(stages: tuple[str, ...], data: ConfigDict, autoencoder: ConfigDict, diffusion: ConfigDict | None = None,
               seed: int = 0) -> ConfigDict:
    c = ConfigDict()
    c.seed = seed
    c.stages = stages
    c.data = data
    c.autoencoder = autoencoder
    if diffusion is not None:
        c.diffusion = diffusion
    c.parallel = ConfigDict()
    # Params, optimizer state and EMA are sharded over this many devices (lidiff.parallel.param_spec) and
    # replicated over the rest; 1 = plain data parallelism, -1 = all devices. Numerics do not change.
    c.parallel.fsdp = 1
    return c


def reference_autoencoder_experiment(model: ConfigDict, loss: ConfigDict, batch_size: int,
                                     learning_rate: float) -> ConfigDict:
    """A stage-1-only experiment at 256^2 on an image folder (the user points ``data.path`` at it)."""
    return experiment(("autoencoder",), data_config("folder", resolution=model.resolution),
                      autoencoder_stage(model, loss, batch_size, learning_rate))


def ldm_f4_unet() -> ConfigDict:
    """The CelebA-HQ / FFHQ / LSUN-bedrooms LDM-4 UNet (274.06M params): 224 ch, mult 1,2,3,4, attention at
    downsampling factors 8, 4, 2 (latent 8^2, 16^2, 32^2) and in the middle block, 32 channels per head."""
    return unet_model(in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4),
                      num_res_blocks=2, attention_resolutions=(8, 4, 2), num_head_channels=32)


def vq_f4_first_stage() -> ConfigDict:
    """Stage-1 section of an LDM-4 experiment: the VQ-f4 autoencoder (also trainable with stages=('autoencoder',...))."""
    model = autoencoder_model("vq", ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192)
    loss = autoencoder_loss(disc_start=0, disc_weight=0.75, codebook_weight=1.0)
    return autoencoder_stage(model, loss, batch_size=8, learning_rate=3.6e-5)
