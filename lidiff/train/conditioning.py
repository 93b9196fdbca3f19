"""``config.diffusion.conditioning`` -> the conditioning encoder, its tokenizer, and the inputs samples use.

    kind    none | class | text | layout   (which raw input: nothing, labels, captions -> tokens, boxes)
            superres | inpainting | semantic (a low-res image, a masked image + mask, a segmentation map)
    mode    crossattn | adm | hybrid       (class: context of length 1, or the UNet's label_emb; layout: the
            | concat                       tokens' context, or that plus a box map concatenated to x_t;
                                           the spatial kinds: a map concatenated to x_t)

Super-resolution and inpainting derive their inputs from the training images on the device, inside the train
step (``input_deriver``: a degraded low-res copy; a random mask and the masked image), so they train from images,
not from the latent cache. Semantic maps come from the data, like labels.

Text models keep their tokenizer in the run directory (``lidiff.runs.tokenizer_dir``): copied there from
``conditioning.tokenizer`` at the start of training, or trained from the training captions when
``conditioning.build_vocab`` is set. Sampling and evaluation read it from there, so a run directory is
self-contained. ``conditioning.encoder`` picks the text encoder: ``transformer`` (trained jointly, CompVis's
BERTEmbedder) or ``clip`` (Stable Diffusion's pretrained CLIP text tower, frozen: a Hugging Face
``CLIPTextModel`` folder ``conditioning.text_encoder``, copied to ``lidiff.runs.text_encoder_dir`` like the
tokenizer, its weights never in the train state).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from lidiff import runs
from lidiff.errors import ConfigError, MissingInputError

KINDS = ("none", "class", "text", "layout", "superres", "inpainting", "semantic")
SPATIAL_KINDS = ("superres", "inpainting", "semantic")
DERIVED_KINDS = ("superres", "inpainting")  # inputs made from the training images inside the step
DEGRADATIONS = ("bicubic", "bsr_light")
TEXT_ENCODERS = ("transformer", "clip")
MASK_KINDS = ("box", "freeform", "mixed")
# Training masks as large as the paper's LaMa-style ones: boxes of 30-70% of each side, strokes 10-30% of the side
# thick; "mixed" masks then cover 34% of the image on average (5th-95th percentile 13-64%, measured at 32x32).
LARGE_MASKS = dict(min_frac=0.3, max_frac=0.7, width_range=(0.1, 0.3), length_range=(0.2, 0.5))


def text_encoder_kind(cond: ConfigDict) -> str:
    """``conditioning.encoder`` (``transformer`` in configs saved before the field existed)."""
    return cond.get("encoder", "transformer")


def check_conditioning(cond: ConfigDict, model: ConfigDict) -> None:
    """Refuses inconsistent conditioning / UNet settings, naming the fields and the values that fit."""
    if cond.kind not in KINDS:
        raise ConfigError(f"unknown config.diffusion.conditioning.kind {cond.kind!r}; choose one of {KINDS}")
    modes = {"none": ("crossattn",), "class": ("crossattn", "adm"), "text": ("crossattn",),
             "layout": ("crossattn", "hybrid"), "superres": ("concat",), "inpainting": ("concat",),
             "semantic": ("concat",)}[cond.kind]
    if cond.mode not in modes:
        raise ConfigError(f"config.diffusion.conditioning.mode={cond.mode!r} does not fit kind={cond.kind!r}; "
                          f"choose one of {modes}")
    if not 0.0 <= cond.p_uncond <= 1.0:
        raise ConfigError(f"config.diffusion.conditioning.p_uncond={cond.p_uncond} must lie in [0, 1]")
    if cond.kind in ("class", "layout", "semantic") and cond.num_classes <= 0:
        what = {"class": "classes", "layout": "box classes", "semantic": "class ids of the maps"}[cond.kind]
        raise ConfigError(f"config.diffusion.conditioning.num_classes must be > 0 for kind={cond.kind!r} ({what})")
    if cond.kind == "superres":
        if cond.sr_factor < 1:
            raise ConfigError(f"config.diffusion.conditioning.sr_factor={cond.sr_factor} must be >= 1")
        if cond.degradation not in DEGRADATIONS:
            raise ConfigError(f"config.diffusion.conditioning.degradation={cond.degradation!r}: choose one of "
                              f"{DEGRADATIONS}")
    if cond.kind == "text" and text_encoder_kind(cond) not in TEXT_ENCODERS:
        raise ConfigError(f"config.diffusion.conditioning.encoder={text_encoder_kind(cond)!r}: choose one of "
                          f"{TEXT_ENCODERS}")
    if cond.kind == "text" and text_encoder_kind(cond) == "clip":
        from lidiff.models.clip import OUTPUTS

        if cond.clip_output not in OUTPUTS:
            raise ConfigError(f"config.diffusion.conditioning.clip_output={cond.clip_output!r}: choose one of "
                              f"{OUTPUTS}")
        if cond.build_vocab:
            raise ConfigError("config.diffusion.conditioning.build_vocab trains a BERT vocabulary, but a CLIP text "
                              "encoder reads the CLIP tokenizer it was trained with: set conditioning.tokenizer to "
                              "that folder and build_vocab=False")
    if cond.kind == "inpainting" and cond.mask_kind not in MASK_KINDS:
        raise ConfigError(f"config.diffusion.conditioning.mask_kind={cond.mask_kind!r}: choose one of {MASK_KINDS}")
    cross = cond.kind in ("text", "layout") or (cond.kind == "class" and cond.mode == "crossattn")
    if cross:
        if not model.use_spatial_transformer:
            raise ConfigError(f"config.diffusion.conditioning.kind={cond.kind!r} feeds its encoder through "
                              "cross-attention: set config.diffusion.model.use_spatial_transformer=True")
        if model.context_dim != cond.embed_dim:
            raise ConfigError(f"config.diffusion.model.context_dim ({model.context_dim}) must equal "
                              f"config.diffusion.conditioning.embed_dim ({cond.embed_dim}), the encoder's width")
    elif model.context_dim:
        raise ConfigError(f"config.diffusion.model.context_dim={model.context_dim} but nothing feeds cross-attention "
                          f"(conditioning.kind={cond.kind!r}, mode={cond.mode!r}); set it to 0")
    if cond.kind == "layout" and cond.max_boxes <= 0:
        raise ConfigError("config.diffusion.conditioning.max_boxes must be > 0 for kind='layout'")


def check_unet_channels(model: ConfigDict, latent_channels: int, conditioner: Any) -> None:
    """The UNet takes the latent plus the conditioning's ``concat`` channels and predicts the latent's channels;
    refuses other ``in_channels`` / ``out_channels``, giving the numbers that fit."""
    want_in = latent_channels + conditioner.concat_channels
    if model.in_channels != want_in:
        extra = (f" + {conditioner.concat_channels} concatenated conditioning channels "
                 f"(kind={conditioner.kind!r}, mode={conditioner.mode!r})" if conditioner.concat_channels else "")
        raise ConfigError(f"config.diffusion.model.in_channels={model.in_channels}, but the UNet's input is "
                          f"{latent_channels} latent channels{extra}: set in_channels={want_in}")
    if model.out_channels != latent_channels:
        raise ConfigError(f"config.diffusion.model.out_channels={model.out_channels}, but the UNet predicts the "
                          f"first stage's {latent_channels} latent channels: set out_channels={latent_channels}")


def input_deriver(cond: ConfigDict):
    """For super-resolution and inpainting, ``derive(images, rng) -> inputs``: the conditioning made from a batch
    of training images [B, H, W, 3] in [-1, 1] on the device (jit-able); None for every other kind.

    superres: ``{"lowres": [B, H/s, W/s, 3]}`` by ``cond.degradation``; inpainting: ``{"mask": [B, H, W, 1]}``
    (``cond.mask_kind``, 1 = to fill) and ``{"masked_image"}`` (the unknown pixels set to -1, as CompVis).
    """
    if cond.kind == "superres":
        from lidiff.data import degradations

        factor, how = int(cond.sr_factor), str(cond.degradation)
        return lambda images, rng: {"lowres": degradations.lowres_for(images, rng, factor, how)}
    if cond.kind == "inpainting":
        from lidiff.data import masks

        kind = str(cond.mask_kind)

        def derive(images, rng):
            m = masks.random_masks(rng, images.shape[0], images.shape[1], images.shape[2], kind=kind, **LARGE_MASKS)
            return {"masked_image": masks.mask_images(images, m), "mask": m}

        return derive
    return None


def unet_num_classes(cond: ConfigDict) -> int | None:
    """Rows of the UNet's ``label_emb`` (``adm`` mode: the classes + the null class), else None."""
    return cond.num_classes + 1 if cond.kind == "class" and cond.mode == "adm" else None


def build_conditioner(cond: ConfigDict, dtype: Any = jnp.float32, tokenizer: Any = None, first_stage: Any = None,
                      text_encoder: Any = None):
    """The encoder of ``cond.kind`` (``lidiff.models.conditioning``, ``lidiff.models.spatial_conditioning``); text
    needs the tokenizer, and with ``encoder="clip"`` the CLIP module (``prepare_text_encoder``); the spatial kinds
    need the first stage (``lidiff.ldm.FirstStage``: its factor; inpainting encodes with it)."""
    from lidiff.models import conditioning as enc

    if cond.kind == "none":
        return enc.Unconditional()
    if cond.kind in SPATIAL_KINDS:
        from lidiff.models import spatial_conditioning as spatial

        if first_stage is None:
            raise ValueError(f"conditioning kind {cond.kind!r} needs the first stage")
        f = first_stage.downsample_factor
        if cond.kind == "superres":
            return spatial.SuperResolutionConditioning(cond.sr_factor, f)
        if cond.kind == "inpainting":
            return spatial.InpaintingConditioning(first_stage)
        return spatial.SemanticConditioning(cond.num_classes, f, cond.map_channels, dtype)
    if cond.kind == "class":
        return enc.ClassConditioning(cond.num_classes, cond.embed_dim, cond.mode, dtype)
    from lidiff.models.text_transformer import TransformerEmbedder

    transformer = dict(n_embed=cond.embed_dim, n_layer=cond.n_layer, heads=cond.heads, dim_head=cond.dim_head,
                       dtype=dtype, attention_kernel=cond.attention_kernel)
    if cond.kind == "text":
        from lidiff.data.text import null_tokens

        if tokenizer is None:
            raise MissingInputError("a text-conditioned model needs its tokenizer (config.diffusion.conditioning."
                                    "tokenizer, or the run directory's diffusion/tokenizer)")
        if text_encoder_kind(cond) == "clip":
            return frozen_text_conditioner(cond, tokenizer, text_encoder)
        vocab = cond.vocab_size or len(tokenizer)
        if vocab < len(tokenizer):
            raise ConfigError(f"config.diffusion.conditioning.vocab_size={cond.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({len(tokenizer)}); set it to {len(tokenizer)} or 0")
        return enc.TextConditioning(
            TransformerEmbedder(vocab_size=vocab, max_seq_len=cond.max_length, **transformer),
            tuple(int(t) for t in null_tokens(tokenizer, cond.max_length)))
    if cond.kind == "layout":
        from lidiff.models.layout import check_layout_vocab

        try:
            check_layout_vocab(cond.num_classes, cond.vocab_size)
        except ValueError as e:
            raise ConfigError(f"config.diffusion.conditioning (num_classes={cond.num_classes}, "
                              f"vocab_size={cond.vocab_size}): {e}") from None
        return enc.LayoutConditioning(
            TransformerEmbedder(vocab_size=cond.vocab_size, max_seq_len=3 * cond.max_boxes, **transformer),
            cond.num_classes, cond.max_boxes, cond.vocab_size, cond.mode)
    raise ConfigError(f"unknown config.diffusion.conditioning.kind {cond.kind!r}; choose one of {KINDS}")


def frozen_text_conditioner(cond: ConfigDict, tokenizer: Any, text_encoder: Any):
    """``FrozenTextConditioning`` over the CLIP module ``text_encoder``, checked against the config: the context
    width is the encoder's, and prompts fit its position table."""
    from lidiff.data.text import null_tokens
    from lidiff.models.conditioning import FrozenTextConditioning

    if text_encoder is None:
        raise MissingInputError("config.diffusion.conditioning.encoder='clip' needs the CLIP text encoder: set "
                                "conditioning.text_encoder to a Hugging Face CLIPTextModel folder")
    if cond.embed_dim != text_encoder.hidden_size:
        raise ConfigError(f"config.diffusion.conditioning.embed_dim={cond.embed_dim}, but the CLIP text encoder is "
                          f"{text_encoder.hidden_size} wide: set embed_dim and diffusion.model.context_dim to "
                          f"{text_encoder.hidden_size}")
    if cond.max_length > text_encoder.max_position_embeddings:
        raise ConfigError(f"config.diffusion.conditioning.max_length={cond.max_length} exceeds the CLIP text "
                          f"encoder's {text_encoder.max_position_embeddings} positions")
    if len(tokenizer) > text_encoder.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the CLIP text encoder only "
                          f"{text_encoder.vocab_size}: they do not belong together")
    return FrozenTextConditioning(text_encoder, tuple(int(t) for t in null_tokens(tokenizer, cond.max_length)),
                                  cond.clip_output)


def prepare_text_encoder(config: ConfigDict, workdir: str, dtype: Any = jnp.float32):
    """A frozen CLIP text encoder ``(module, params)``, placed in the run directory if it is not there yet; None
    unless ``conditioning.kind="text"`` with ``encoder="clip"``.

    Order: the run directory's copy (``lidiff.runs.text_encoder_dir``: a resumed run, sampling); else
    ``conditioning.text_encoder`` (a ``CLIPTextModel`` folder: config.json + model.safetensors), copied there.
    ``params`` are float32 host arrays; ``dtype`` is the module's compute dtype.
    """
    cond = config.diffusion.conditioning
    if cond.kind != "text" or text_encoder_kind(cond) != "clip":
        return None
    from lidiff.convert.clip import load_clip_text_encoder

    kernel = cond.attention_kernel
    target = runs.text_encoder_dir(workdir)
    if os.path.isdir(target):
        return load_clip_text_encoder(target, dtype=dtype, attention_kernel=kernel)
    if not cond.text_encoder:
        raise ConfigError(f"{workdir} has no CLIP text encoder ({target}) and config.diffusion.conditioning."
                          "text_encoder is empty: set it to a Hugging Face CLIPTextModel folder (e.g. a Stable "
                          "Diffusion repository's text_encoder/, holding config.json and model.safetensors)")
    loaded = load_clip_text_encoder(cond.text_encoder, dtype=dtype, attention_kernel=kernel)  # refuse a bad folder
    shutil.copytree(cond.text_encoder, target + ".tmp", dirs_exist_ok=True)
    os.replace(target + ".tmp", target)
    logging.info("text conditioning: frozen CLIP text encoder %s (%d layers, width %d) copied to %s",
                 cond.text_encoder, loaded[0].num_layers, loaded[0].hidden_size, target)
    return loaded


# ------------------------------------------------------------------------------------------------ tokenizer


def prepare_tokenizer(config: ConfigDict, workdir: str, captions=None):
    """The tokenizer of a text model, placed in the run directory if it is not there yet.

    Order: the run directory's copy (a resumed run, or sampling); else ``conditioning.tokenizer`` (copied into
    the run directory); else, with ``conditioning.build_vocab``, a WordPiece vocabulary of ``vocab_size`` (or
    1000) trained on ``captions()`` (a callable returning the training captions). None for non-text models.
    """
    cond = config.diffusion.conditioning
    if cond.kind != "text":
        return None
    from lidiff.data.text import build_wordpiece_tokenizer, load_clip_tokenizer
    from lidiff.data.text import load_tokenizer as load_bert_tokenizer

    load_tokenizer = load_clip_tokenizer if text_encoder_kind(cond) == "clip" else load_bert_tokenizer
    target = runs.tokenizer_dir(workdir)
    if os.path.isdir(target):
        return load_tokenizer(target)
    clip = text_encoder_kind(cond) == "clip"
    if cond.tokenizer:
        if not os.path.isdir(cond.tokenizer):
            raise MissingInputError(
                f"config.diffusion.conditioning.tokenizer={cond.tokenizer!r} is not a directory; point it at " + (
                    "the CLIP text encoder's tokenizer folder (vocab.json + merges.txt, or tokenizer.json)" if clip
                    else "a saved BERT tokenizer (vocab.txt or tokenizer.json), or set conditioning.build_vocab="
                         "True to train one on the captions"))
        tokenizer = load_tokenizer(cond.tokenizer)  # refuse a bad directory before copying it
        shutil.copytree(cond.tokenizer, target + ".tmp", dirs_exist_ok=True)
        os.replace(target + ".tmp", target)
        logging.info("text conditioning: tokenizer %s (vocabulary %d) copied to %s", cond.tokenizer,
                     len(tokenizer), target)
        return load_tokenizer(target)
    if clip:
        raise ConfigError("a CLIP text encoder needs its tokenizer: set config.diffusion.conditioning.tokenizer to "
                          "its folder (a Stable Diffusion repository's tokenizer/)")
    if not cond.build_vocab:
        raise ConfigError("a text-conditioned model needs a tokenizer: set config.diffusion.conditioning.tokenizer "
                          "to a BERT tokenizer directory, or conditioning.build_vocab=True to train a WordPiece "
                          "vocabulary on the training captions")
    if captions is None:
        raise MissingInputError(f"{workdir}: no tokenizer in {target}; this run was never trained")
    texts = captions()
    build_wordpiece_tokenizer(texts, target + ".tmp", vocab_size=cond.vocab_size or 1000)
    os.replace(target + ".tmp", target)
    tokenizer = load_tokenizer(target)
    logging.info("text conditioning: WordPiece vocabulary of %d tokens trained on %d captions, saved in %s",
                 len(tokenizer), len(texts), target)
    return tokenizer


# ------------------------------------------------------------------------------------ inputs for sampling


def num_groups(config: ConfigDict) -> int:
    """How many distinct conditionings the final samples show: the classes, the prompts, the layouts (of
    ``sample.layout_file``, else ``sample.num_images`` random ones), or 1 for unconditional models."""
    cond, s = config.diffusion.conditioning, config.diffusion.sample
    if cond.kind == "class":
        return cond.num_classes
    if cond.kind == "text":
        return max(len(s.prompts), 1)
    if cond.kind in SPATIAL_KINDS:
        return s.num_images
    if cond.kind == "layout":
        if s.layout_file:
            from lidiff.data.layouts import read_layout_file

            return len(read_layout_file(s.layout_file, num_classes=cond.num_classes, max_boxes=cond.max_boxes)[0])
        return s.num_images
    return 1


def sample_inputs(config: ConfigDict, n: int, tokenizer: Any = None, seed: int = 0
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Conditioning for ``n`` samples drawn during or after training: ``(inputs, record)``.

    class: labels cycling over the classes; text: ``sample.prompts`` cycled (labels from ``sample.prompt_labels``
    when given); layout: ``sample.layout_file`` cycled, else random digit layouts (``random_layouts``).
    ``inputs`` go to ``LatentDiffusion.generate``; ``record`` is what ``samples.npz`` keeps beside the images
    (``labels``, ``prompts``, ``boxes``, ``box_labels``).
    """
    cond, s = config.diffusion.conditioning, config.diffusion.sample
    if cond.kind == "none":
        return {}, {}
    if cond.kind in SPATIAL_KINDS:
        return spatial_sample_inputs(config, n, seed)
    if cond.kind == "class":
        labels = (np.arange(n) % cond.num_classes).astype(np.int32)
        return {"label": labels}, {"labels": labels}
    if cond.kind == "text":
        from lidiff.data.text import tokenize

        if not s.prompts:
            raise ConfigError("a text-conditioned model samples from config.diffusion.sample.prompts: list some")
        index = np.arange(n) % len(s.prompts)
        prompts = [s.prompts[i] for i in index]
        record = {"prompts": np.asarray(prompts)}
        if s.prompt_labels:
            if len(s.prompt_labels) != len(s.prompts):
                raise ConfigError("config.diffusion.sample.prompt_labels must give one label per prompt")
            record["labels"] = np.asarray([s.prompt_labels[i] for i in index], np.int32)
        return {"tokens": tokenize(tokenizer, prompts, cond.max_length)}, record
    from lidiff.data.layouts import random_layouts, read_layout_file

    if s.layout_file:
        boxes, labels = read_layout_file(s.layout_file, num_classes=cond.num_classes, max_boxes=cond.max_boxes)
        index = np.arange(n) % len(boxes)
        boxes, labels = boxes[index], labels[index]
    else:
        boxes, labels = random_layouts(n, seed=seed, max_boxes=cond.max_boxes, canvas=config.data.resolution,
                                       max_digits=cond.max_boxes)
    return {"boxes": boxes, "box_labels": labels}, {"boxes": boxes, "box_labels": labels}


def spatial_sample_inputs(config: ConfigDict, n: int, seed: int = 0) -> tuple[dict[str, np.ndarray],
                                                                             dict[str, np.ndarray]]:
    """Spatial conditioning for ``n`` samples from the first ``n`` usable examples of ``sample.cond_data`` (else
    ``config.data``) at ``sample.cond_resolution`` (else ``data.resolution``).

    superres / inpainting: the inputs are derived from those images as in training (``input_deriver``, with
    ``PRNGKey(seed)``); ``record`` keeps ``targets`` (the images, uint8 [N, R, R, 3]) and ``inputs`` (the low-res
    images, uint8) or ``masks`` (uint8 [N, R, R], **1 = known**). semantic: the maps, recorded as
    ``segmentations`` [N, R, R]. The examples' ``label`` (if any) becomes ``labels``; a source that gives regions'
    ``boxes`` and ``box_labels`` has them recorded too (so each region can be scored like a layout box).
    """
    import jax

    from lidiff.data.pipeline import prepare_example
    from lidiff.data.transforms import to_uint8
    from lidiff.train.common import make_source_from_config

    cond, s = config.diffusion.conditioning, config.diffusion.sample
    data = s.cond_data if s.cond_data.source else config.data
    resolution = int(s.cond_resolution or config.data.resolution)
    source = make_source_from_config(data, seed)
    fields = []
    if cond.kind == "semantic":
        from lidiff.data.spatial import SegmentationField

        fields = [SegmentationField(cond.num_classes, resolution)]
    images, values, extras = [], [], {}
    for index in range(min(len(source), 64 * n)):
        example = source[index]
        prepared = prepare_example(example, fields, resolution)
        if isinstance(prepared, str):
            continue
        images.append(prepared[0])
        values.append(prepared[1])
        for key in ("label", "boxes", "box_labels"):
            if example.get(key) is not None:
                extras.setdefault(key, []).append(np.asarray(example[key]))
        if len(images) == n:
            break
    if len(images) < n:
        raise ConfigError(f"config.diffusion.sample.cond_data ({data.source!r}) gives only {len(images)} usable "
                          f"examples; the samples need {n}")
    record = {{"label": "labels"}.get(k, k): np.stack(v) for k, v in extras.items() if len(v) == n}
    if cond.kind == "semantic":
        segmentation = np.stack([v["segmentation"] for v in values]).astype(np.int32)
        return {"segmentation": segmentation}, {**record, "segmentations": segmentation}
    images = np.stack(images)
    inputs = jax.device_get(jax.jit(input_deriver(cond))(images, jax.random.PRNGKey(seed)))
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    record["targets"] = to_uint8(images)
    if cond.kind == "superres":
        record["inputs"] = to_uint8(inputs["lowres"])
    else:
        record["masks"] = (inputs["mask"][..., 0] < 0.5).astype(np.uint8)
    return inputs, record
