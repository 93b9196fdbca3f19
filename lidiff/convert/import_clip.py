"""Stable Diffusion's CLIP text encoder in ``python -m lidiff.convert``: its config fields, its strict conversion,
and the folders written into the run directory (``lidiff.runs.text_encoder_dir`` / ``tokenizer_dir``).

Where each part comes from:

============  ============================================  ===================================================
              diffusers ``StableDiffusionPipeline`` folder  CompVis SD v1 single file
============  ============================================  ===================================================
weights       ``text_encoder/model.safetensors``            ``cond_stage_model.transformer.text_model.*``
architecture  ``text_encoder/config.json``                  tensor shapes; heads = hidden // 64 (CLIP's head
                                                            width, or ``--config.diffusion.conditioning.heads``);
                                                            quick_gelu (OpenAI CLIP ViT-L/14)
tokenizer     ``tokenizer/``                                ``--config.diffusion.conditioning.tokenizer=DIR``
written       a copy of ``text_encoder/``                   ``config.json`` + ``model.safetensors``
                                                            (``text_model.*`` keys): a transformers folder
============  ============================================  ===================================================

The tokenizer folder is copied as it is. ``conditioning.max_length`` is the tokenizer's ``model_max_length`` (77
for Stable Diffusion), or the encoder's position count when the tokenizer sets none. ``clip_output`` is "last":
SD v1 reads CLIP's last hidden state, and diffusers' SD v2 folder stores the penultimate-layer tower as a
23-layer model whose last hidden state is what SD v2 reads (``lidiff.models.clip``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np
from ml_collections import ConfigDict

from lidiff.convert import infer
from lidiff.convert.read_source import Source, SourceMismatch
from lidiff.errors import ConfigError

TOKENIZER_FLAG = "--config.diffusion.conditioning.tokenizer"
HEADS_FLAG = "--config.diffusion.conditioning.heads"
COMPVIS_ACTIVATION = "quick_gelu"  # OpenAI CLIP ViT-L/14, SD v1's text encoder
P_UNCOND = 0.1  # Stable Diffusion's caption dropping: a fine-tune keeps classifier-free guidance working


def conditioning_fields(source: Source) -> dict[str, Any]:
    """``diffusion.conditioning`` fields of a source with a CLIP text encoder, before overrides; ``heads`` is the
    encoder's head count (-1 where CompVis shapes do not give it), ``max_length`` -1 (the tokenizer's, set by
    ``finish_config``)."""
    if source.text_encoder_config:
        hidden, heads = (int(source.text_encoder_config[k]) for k in ("hidden_size", "num_attention_heads"))
    else:
        hidden = infer.infer_clip_text(infer.shapes_of(source.text_encoder))["hidden_size"]
        heads = hidden // infer.CLIP_HEAD_WIDTH if hidden % infer.CLIP_HEAD_WIDTH == 0 else -1
    return dict(kind="text", mode="crossattn", encoder="clip", clip_output="last", embed_dim=hidden, heads=heads,
                text_encoder=source.text_encoder_dir, tokenizer=source.tokenizer_dir, max_length=-1,
                p_uncond=P_UNCOND, build_vocab=False)


def architecture(source: Source, heads: int) -> dict[str, Any]:
    """``lidiff.models.clip.CLIPTextTransformer`` kwargs: from config.json (diffusers), else from the shapes with
    ``heads`` heads and quick_gelu (CompVis SD v1)."""
    from lidiff.convert.clip import clip_config_from_hf

    if source.text_encoder_config:
        return clip_config_from_hf(source.text_encoder_config)
    fields = infer.infer_clip_text(infer.shapes_of(source.text_encoder))
    return dict(vocab_size=fields["vocab_size"], hidden_size=fields["hidden_size"],
                intermediate_size=fields["intermediate_size"], num_layers=fields["num_hidden_layers"],
                num_heads=heads, max_position_embeddings=fields["max_position_embeddings"],
                activation=COMPVIS_ACTIVATION, layer_norm_eps=1e-5)


def load_tokenizer(folder: str, what: str):
    """The CLIP tokenizer in ``folder``; a folder that is not one raises ``ConfigError`` naming ``what`` (the
    flag or the pipeline component that gave it)."""
    from lidiff.data.text import load_clip_tokenizer

    try:
        return load_clip_tokenizer(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: {e}") from None


def _heads(config: ConfigDict, source: Source, overrides: Mapping[str, str]) -> tuple[int, str]:
    """The text encoder's heads and where they come from."""
    c = config.diffusion.conditioning
    if source.text_encoder_config:
        return int(source.text_encoder_config["num_attention_heads"]), "text_encoder/config.json"
    hidden = infer.infer_clip_text(infer.shapes_of(source.text_encoder))["hidden_size"]
    if "diffusion.conditioning.heads" in overrides:
        heads, origin = int(c.heads), HEADS_FLAG
    elif hidden % infer.CLIP_HEAD_WIDTH == 0:
        heads = hidden // infer.CLIP_HEAD_WIDTH
        origin = f"hidden {hidden} // {infer.CLIP_HEAD_WIDTH}, CLIP's head width"
    else:
        raise ConfigError(f"{source.path}: the CLIP text encoder is {hidden} wide, not a multiple of CLIP's head "
                          f"width {infer.CLIP_HEAD_WIDTH}: give its head count with {HEADS_FLAG}=<heads>")
    if heads <= 0 or hidden % heads:
        raise ConfigError(f"{HEADS_FLAG}={heads} does not divide the CLIP text encoder's width {hidden}")
    return heads, origin


def finish_config(config: ConfigDict, source: Source, overrides: Mapping[str, str], from_file: bool):
    """Completes ``diffusion.conditioning`` for the source's CLIP text encoder once the overrides are applied:
    the pipeline's folders (diffusers), the tokenizer (``--config.diffusion.conditioning.tokenizer`` for a
    CompVis file), heads, ``max_length``; checks the UNet's context width.

    Returns report lines. Raises ``ConfigError`` for a missing or bad tokenizer, ``SourceMismatch`` when
    ``--config`` (``from_file``) describes another text model or a UNet of another context width.
    """
    from lidiff.train.conditioning import text_encoder_kind

    c = config.diffusion.conditioning
    if c.kind != "text" or text_encoder_kind(c) != "clip":
        raise SourceMismatch(f"{source.path} holds a CLIP text encoder, but --config has conditioning.kind="
                             f"{c.kind!r}, encoder={text_encoder_kind(c)!r}: set kind='text', encoder='clip'")
    lines = []
    if source.text_encoder_dir:
        for field, value in (("text_encoder", source.text_encoder_dir), ("tokenizer", source.tokenizer_dir)):
            if from_file and c[field] and os.path.abspath(c[field]) != value:
                lines.append(f"  conditioning.{field}: the pipeline's {value} replaces the config's {c[field]}")
            c[field] = value
    elif from_file and c.text_encoder:
        lines.append(f"  conditioning.text_encoder: the file's CLIP weights (written into the run directory) replace "
                     f"the config's {c.text_encoder}")
    if not source.text_encoder_dir and not c.tokenizer:
        raise ConfigError(f"{source.path} holds SD v1's CLIP text encoder but no tokenizer: give the CLIP tokenizer "
                          f"folder it was trained with, {TOKENIZER_FLAG}=<folder> (e.g. a Stable Diffusion v1 "
                          "repository's tokenizer/, holding vocab.json + merges.txt or tokenizer.json)")
    heads, heads_from = _heads(config, source, overrides)
    c.heads = heads
    kwargs = architecture(source, heads)
    given = f"the pipeline's tokenizer/ ({c.tokenizer})" if source.tokenizer_dir else f"{TOKENIZER_FLAG}={c.tokenizer}"
    tokenizer = load_tokenizer(c.tokenizer, given)
    if len(tokenizer) > kwargs["vocab_size"]:
        raise ConfigError(f"{given}: the tokenizer has {len(tokenizer)} tokens, the CLIP text encoder's table "
                          f"{kwargs['vocab_size']}: give the tokenizer this encoder was trained with")
    positions = kwargs["max_position_embeddings"]
    if c.max_length == -1:  # inferred: the tokenizer's, as the pipeline pads prompts
        limit = int(tokenizer.model_max_length)
        c.max_length = limit if 0 < limit <= positions else positions
        length_from = "the tokenizer's model_max_length" if c.max_length == limit else \
            f"the encoder's positions; the tokenizer's model_max_length {limit} is not a usable length"
    else:
        length_from = "--config / --config.diffusion.conditioning.max_length"
    hidden, context = kwargs["hidden_size"], config.diffusion.model.context_dim
    if context != hidden or c.embed_dim != hidden:
        raise SourceMismatch(f"{source.path}: the UNet's cross-attention width (context_dim {context}) and "
                             f"conditioning.embed_dim ({c.embed_dim}) must both be the CLIP text encoder's hidden "
                             f"size {hidden}")
    where = source.text_encoder_dir or f"{source.path} (cond_stage_model.transformer.text_model.*)"
    lines += [f"text encoder: frozen CLIPTextModel from {where}: {kwargs['num_layers']} layers, width {hidden}, "
              f"{heads} heads ({heads_from}), {kwargs['activation']}, {positions} positions, vocabulary "
              f"{kwargs['vocab_size']}; clip_output {c.clip_output}"
              + (" (Stable Diffusion reads last_hidden_state)" if c.clip_output == "last" else
                 " (not Stable Diffusion's: its pipelines read last_hidden_state)"),
              f"tokenizer: {c.tokenizer} ({type(tokenizer).__name__}, {len(tokenizer)} tokens); max_length "
              f"{c.max_length} (from {length_from})"]
    return lines


def convert(source: Source, kwargs: Mapping[str, Any]):
    """The CLIP weights, strictly -> ``(CLIPTextTransformer, params)``; raises ``ConversionError`` naming every
    missing, unexpected and mis-shaped tensor."""
    from lidiff.convert.clip import clip_params_from_state_dict, load_clip_text_encoder
    from lidiff.models.clip import CLIPTextTransformer

    if source.text_encoder_dir:
        return load_clip_text_encoder(source.text_encoder_dir)
    module = CLIPTextTransformer(**kwargs)
    return module, clip_params_from_state_dict(source.text_encoder, module)


def hf_config(kwargs: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``CLIPTextTransformer`` kwargs -> a transformers ``CLIPTextModel`` ``config.json`` (special token ids from
    the tokenizer)."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": kwargs["vocab_size"], "hidden_size": kwargs["hidden_size"],
            "intermediate_size": kwargs["intermediate_size"], "num_hidden_layers": kwargs["num_layers"],
            "num_attention_heads": kwargs["num_heads"], "max_position_embeddings": kwargs["max_position_embeddings"],
            "hidden_act": kwargs["activation"], "layer_norm_eps": kwargs["layer_norm_eps"],
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def write_text_encoder(source: Source, kwargs: Mapping[str, Any], tokenizer: Any, target: str) -> None:
    """``target`` (``runs.text_encoder_dir``): a copy of the pipeline's ``text_encoder/``, or for a CompVis file a
    transformers folder written from its tensors (``text_model.*`` keys, as Stable Diffusion repositories ship)."""
    from safetensors.numpy import save_file

    tmp = target + ".tmp"
    if source.text_encoder_dir:
        shutil.copytree(source.text_encoder_dir, tmp, dirs_exist_ok=True)
    else:
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(kwargs, tokenizer), f, indent=2)
        save_file({"text_model." + k: np.ascontiguousarray(v) for k, v in source.text_encoder.items()},
                  os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    os.replace(tmp, target)


def component(source: Source) -> str:
    """Where the source keeps its text encoder, for messages."""
    return "text_encoder/" if source.text_encoder_dir else "cond_stage_model.transformer.text_model.*"
