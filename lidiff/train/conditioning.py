"""``config.diffusion.conditioning`` -> the conditioning encoder, its tokenizer, and the inputs samples use.

    kind    none | class | text | layout   (which raw input: nothing, labels, captions -> tokens, boxes)
    mode    crossattn | adm                (class only: context of length 1, or the UNet's label_emb)

Text models keep their tokenizer in the run directory (``lidiff.runs.tokenizer_dir``): copied there from
``conditioning.tokenizer`` at the start of training, or trained from the training captions when
``conditioning.build_vocab`` is set. Sampling and evaluation read it from there, so a run directory is
self-contained.
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

KINDS = ("none", "class", "text", "layout")


def check_conditioning(cond: ConfigDict, model: ConfigDict) -> None:
    """Refuses inconsistent conditioning / UNet settings, naming the fields and the values that fit."""
    if cond.kind not in KINDS:
        raise ConfigError(f"unknown config.diffusion.conditioning.kind {cond.kind!r}; choose one of {KINDS}")
    modes = {"none": ("crossattn",), "class": ("crossattn", "adm"), "text": ("crossattn",),
             "layout": ("crossattn",)}[cond.kind]
    if cond.mode not in modes:
        raise ConfigError(f"config.diffusion.conditioning.mode={cond.mode!r} does not fit kind={cond.kind!r}; "
                          f"choose one of {modes}")
    if not 0.0 <= cond.p_uncond <= 1.0:
        raise ConfigError(f"config.diffusion.conditioning.p_uncond={cond.p_uncond} must lie in [0, 1]")
    if cond.kind in ("class", "layout") and cond.num_classes <= 0:
        raise ConfigError(f"config.diffusion.conditioning.num_classes must be > 0 for kind={cond.kind!r} "
                          f"({'classes' if cond.kind == 'class' else 'box classes'})")
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


def unet_num_classes(cond: ConfigDict) -> int | None:
    """Rows of the UNet's ``label_emb`` (``adm`` mode: the classes + the null class), else None."""
    return cond.num_classes + 1 if cond.kind == "class" and cond.mode == "adm" else None


def build_conditioner(cond: ConfigDict, dtype: Any = jnp.float32, tokenizer: Any = None):
    """The encoder of ``cond.kind`` (``lidiff.models.conditioning``); text needs the tokenizer."""
    from lidiff.models import conditioning as enc

    if cond.kind == "none":
        return enc.Unconditional()
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
            cond.num_classes, cond.max_boxes, cond.vocab_size)
    raise ConfigError(f"unknown config.diffusion.conditioning.kind {cond.kind!r}; choose one of {KINDS}")


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
    from lidiff.data.text import build_wordpiece_tokenizer, load_tokenizer

    target = runs.tokenizer_dir(workdir)
    if os.path.isdir(target):
        return load_tokenizer(target)
    if cond.tokenizer:
        if not os.path.isdir(cond.tokenizer):
            raise MissingInputError(f"config.diffusion.conditioning.tokenizer={cond.tokenizer!r} is not a directory; "
                                    "point it at a saved BERT tokenizer (vocab.txt or tokenizer.json), or set "
                                    "conditioning.build_vocab=True to train one on the captions")
        tokenizer = load_tokenizer(cond.tokenizer)  # refuse a bad directory before copying it
        shutil.copytree(cond.tokenizer, target + ".tmp", dirs_exist_ok=True)
        os.replace(target + ".tmp", target)
        logging.info("text conditioning: tokenizer %s (vocabulary %d) copied to %s", cond.tokenizer,
                     len(tokenizer), target)
        return load_tokenizer(target)
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
