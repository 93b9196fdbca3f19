"""Reading a released LDM checkpoint into its parts (``Source``) for ``python -m lidiff.convert``.

Two layouts:

- a CompVis / Stable Diffusion single file: ``.safetensors`` (read with the safetensors package) or ``.ckpt`` /
  ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused). The
  state dict may sit under ``"state_dict"``. Its keys are split by prefix::

      model.diffusion_model.*        the UNet (raw weights)                    -> Source.unet
      model_ema.diffusion_model*     the UNet's EMA (dots removed from names)  -> Source.ema
      model_ema.decay / num_updates  EMA bookkeeping                           ignored
      first_stage_model.*            the autoencoder (``loss.*`` ignored)      -> Source.first_stage
      cond_stage_model.transformer.text_model.*   SD v1's CLIP text encoder    -> Source.text_encoder
      cond_stage_model.*             class embedder / BERT-style transformer / -> Source.cond
                                     semantic SpatialRescaler channel_mapper
      betas, alphas_cumprod, ...     schedule buffers                          -> Source.buffers
      scale_factor                   latent scale                              -> Source.buffers

  SD v2 files in Stability's layout (``cond_stage_model.model.*``, OpenCLIP names) are refused: the diffusers
  folder of the same model holds its text encoder as a ``CLIPTextModel``, which is read.

- a diffusers pipeline folder: ``model_index.json``, ``unet/``, ``vae/`` or ``vqvae/``,
  ``scheduler/scheduler_config.json``, and for a ``StableDiffusionPipeline`` ``text_encoder/`` (a transformers
  ``CLIPTextModel``: config.json + model.safetensors) and ``tokenizer/`` (a ``CLIPTokenizer``). Components that
  are not part of the model (``safety_checker``, ``feature_extractor``, ``image_encoder``) are ignored; any other
  component (SDXL's ``text_encoder_2``, ``LDMTextToImagePipeline``'s ``bert``) is refused by name.

Nothing is converted here; ``lidiff.convert.run_import`` does that, strictly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import Any, Mapping

import numpy as np

from lidiff.convert.common import ConversionError, to_numpy_state_dict, torch_state_dict
from lidiff.errors import ConfigError, MissingInputError, UserError

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
EMA_UNET_PREFIX = "model_ema.diffusion_model"
FIRST_STAGE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
CLIP_COND_PREFIX = "transformer.text_model."  # under COND_PREFIX: CompVis FrozenCLIPEmbedder (SD v1)
OPENCLIP_COND_PREFIX = "model."  # under COND_PREFIX: Stability's FrozenOpenCLIPEmbedder (SD v2)
CLIP_POSITION_IDS = "embeddings.position_ids"  # a buffer (0..L-1) older CLIP checkpoints store
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar")
FORMATS = ("compvis", "diffusers")

# diffusers pipeline components: those read, and those ignored (not part of the model) with the reason.
MODEL_COMPONENTS = ("unet", "vae", "vqvae", "scheduler", "text_encoder", "tokenizer")
IGNORED_COMPONENTS = {
    "safety_checker": "an image filter run after sampling, not part of the model; lidiff does not filter samples",
    "feature_extractor": "the safety checker's image preprocessing",
    "image_encoder": "an IP-Adapter image encoder, not part of the text-to-image model",
}
CLIP_TEXT_CLASSES = ("CLIPTextModel",)
CLIP_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


class SourceMismatch(ConversionError, UserError):
    """The source's tensors do not map one to one onto the lidiff model (a ``ConversionError`` and a
    ``UserError``: the commands print its message without a traceback)."""


class UnsafeCheckpointError(UserError, ValueError):
    """A ``.ckpt`` that ``torch.load(weights_only=True)`` refuses: loading it would run arbitrary code."""


@dataclasses.dataclass
class Source:
    """A checkpoint split into its parts; every array is numpy (float32 where floating).

    unet: UNet tensors, CompVis keys without prefix (``compvis``) or diffusers keys (``diffusers``).
    ema: ``{model_ema.diffusion_model<key without dots>: array}`` (empty: no EMA weights).
    first_stage: autoencoder tensors, CompVis keys without prefix (diffusers keys renamed).
    cond: ``cond_stage_model.*`` without prefix, except a CLIP text encoder. buffers: ``betas``, ``scale_factor``, ...
    ignored: ``(key or group, reason)`` of what is dropped on purpose. unet_config / scheduler_config /
    vae_config: the diffusers JSON files (empty for CompVis files).
    text_encoder: a CompVis file's CLIP text encoder, transformers ``CLIPTextModel`` keys without ``text_model.``
    (``embeddings.token_embedding.weight`` ...; empty otherwise). text_encoder_dir / text_encoder_config: a
    diffusers pipeline's ``text_encoder/`` folder and its config.json ("" / {} otherwise). tokenizer_dir: its
    ``tokenizer/`` folder ("" otherwise).
    """

    format: str
    path: str
    unet: dict[str, np.ndarray]
    ema: dict[str, np.ndarray]
    first_stage: dict[str, np.ndarray]
    cond: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    ignored: list[tuple[str, str]]
    unet_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    scheduler_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    vae_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    text_encoder: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    text_encoder_dir: str = ""
    text_encoder_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer_dir: str = ""

    @property
    def has_clip(self) -> bool:
        """Whether the source holds a CLIP text encoder (Stable Diffusion)."""
        return bool(self.text_encoder or self.text_encoder_dir)


# ---------------------------------------------------------------------------------------------------- files


def detect_format(src: str, fmt: str | None) -> str:
    """``--format`` or, when omitted, ``diffusers`` for a folder and ``compvis`` for a file."""
    if not os.path.exists(src):
        raise MissingInputError(f"--src={src}: no such file or folder")
    if fmt is None:
        return "diffusers" if os.path.isdir(src) else "compvis"
    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r}: choose one of {FORMATS}")
    if (fmt == "diffusers") != os.path.isdir(src):
        raise ConfigError(f"--format={fmt} expects a {'folder' if fmt == 'diffusers' else 'single file'}; "
                          f"{src} is a {'folder' if os.path.isdir(src) else 'file'}")
    return fmt


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file -> ``{key: numpy array}`` (bfloat16 / float16 widened to float32)."""
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="numpy") as f:
        for key in f.keys():
            try:
                value = f.get_tensor(key)
            except TypeError:  # bfloat16 without ml_dtypes: read the file through torch
                from safetensors.torch import load_file

                return to_numpy_state_dict(load_file(path))
            out[key] = value.astype(np.float32) if value.dtype.name in ("float16", "bfloat16") else value
    return out


def read_torch_file(path: str) -> dict[str, np.ndarray]:
    """A pickled PyTorch file read with ``weights_only=True`` -> its state dict (numpy); refuses anything needing
    arbitrary unpickling with ``UnsafeCheckpointError``."""
    try:
        state = torch_state_dict(path, "")
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line),
                      str(e).splitlines()[0] if str(e) else "")
        raise UnsafeCheckpointError(
            f"{path} cannot be read safely: it holds pickled Python objects besides tensors ({detail}). Loading it "
            "would run code from the file, which lidiff does not do. Convert it to .safetensors with a tool you "
            "trust (or extract its 'state_dict' on a machine where running the pickle is acceptable) and pass that "
            "file to --src."
        ) from None
    return to_numpy_state_dict(state)


def read_weights(path: str) -> dict[str, np.ndarray]:
    """A weights file by extension: ``.safetensors`` or a torch pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``)."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return read_torch_file(path)


# ----------------------------------------------------------------------------------------------- CompVis file


def split_compvis(state: Mapping[str, np.ndarray], path: str) -> Source:
    """A whole LDM state dict -> its parts by prefix; keys under no known prefix raise ``SourceMismatch``."""
    parts: dict[str, dict[str, np.ndarray]] = {"unet": {}, "ema": {}, "first_stage": {}, "cond": {}, "buffers": {}}
    ignored, unknown, losses = [], [], []
    for key, value in state.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX):]] = value
        elif key in EMA_BOOKKEEPING:
            ignored.append((key, "EMA bookkeeping"))
        elif key.startswith(EMA_UNET_PREFIX):
            parts["ema"][key] = value
        elif key.startswith(FIRST_STAGE_PREFIX + "loss."):
            losses.append(key)
        elif key.startswith(FIRST_STAGE_PREFIX):
            parts["first_stage"][key[len(FIRST_STAGE_PREFIX):]] = value
        elif key.startswith(COND_PREFIX):
            parts["cond"][key[len(COND_PREFIX):]] = value
        elif key in SCHEDULE_BUFFERS or key == "scale_factor":
            parts["buffers"][key] = value
        else:
            unknown.append(key)
    if unknown:
        raise SourceMismatch(f"{path}: {len(unknown)} tensors belong to no part of an LDM checkpoint (UNet "
                             f"{UNET_PREFIX}*, EMA {EMA_PREFIX}*, {FIRST_STAGE_PREFIX}*, {COND_PREFIX}*, schedule "
                             f"buffers, scale_factor): unexpected {', '.join(sorted(unknown)[:50])}")
    if losses:
        ignored.append((f"{FIRST_STAGE_PREFIX}loss.* ({len(losses)} tensors)", "first-stage training loss"))
    if not parts["unet"]:
        raise SourceMismatch(f"{path}: no UNet tensors ({UNET_PREFIX}*); is this an LDM checkpoint? (first keys: "
                             f"{', '.join(sorted(state)[:5])})")
    source = Source("compvis", path, parts["unet"], parts["ema"], parts["first_stage"], parts["cond"],
                    parts["buffers"], ignored)
    _take_clip(source)
    return source


def _take_clip(source: Source) -> None:
    """Moves an SD v1 CLIP text encoder (``cond_stage_model.transformer.text_model.*``) from ``source.cond`` to
    ``source.text_encoder`` (keys relative to ``text_model.``; the ``position_ids`` buffer ignored); refuses
    SD v2's OpenCLIP layout."""
    cond = source.cond
    if any(k.startswith(OPENCLIP_COND_PREFIX) for k in cond):
        raise ConfigError(
            f"{source.path}: the cond stage is SD v2's OpenCLIP text encoder in Stability's layout "
            f"({COND_PREFIX}{OPENCLIP_COND_PREFIX}*), which lidiff does not read. Import the diffusers folder of the "
            "same model instead (python -m lidiff.convert --src <folder with model_index.json>): its text_encoder/ "
            "holds the same weights as a CLIPTextModel")
    if not any(k.startswith(CLIP_COND_PREFIX) for k in cond):
        return
    outside = sorted(k for k in cond if not k.startswith(CLIP_COND_PREFIX))
    if outside:
        raise SourceMismatch(f"{source.path}: the CLIP text encoder ({COND_PREFIX}{CLIP_COND_PREFIX}*) comes with "
                             f"other {COND_PREFIX}* tensors lidiff cannot place: {', '.join(outside[:50])}")
    clip = {k[len(CLIP_COND_PREFIX):]: v for k, v in cond.items()}
    if clip.pop(CLIP_POSITION_IDS, None) is not None:
        source.ignored.append((f"{COND_PREFIX}{CLIP_COND_PREFIX}{CLIP_POSITION_IDS}",
                               "a buffer holding the positions 0..L-1, not a weight"))
    source.text_encoder, source.cond = clip, {}


def read_compvis(path: str) -> Source:
    """A CompVis / SD single file -> ``Source``."""
    return split_compvis(read_weights(path), path)


# ------------------------------------------------------------------------------------------- diffusers folder


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise MissingInputError(f"{path} is missing: a diffusers folder holds it")
    with open(path) as f:
        return json.load(f)


def _component_weights(folder: str) -> dict[str, np.ndarray]:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return read_weights(os.path.join(folder, name))
    raise MissingInputError(f"no weights in {folder}: expected diffusion_pytorch_model.safetensors (or .bin); "
                            "sharded weights are not read, re-save the model with save_pretrained")


def pipeline_components(index: Mapping[str, Any]) -> dict[str, str | None]:
    """``model_index.json`` -> ``{component: class name, or None where the pipeline saved it as null}``."""
    return {name: (value[1] if value[1] is not None else None) for name, value in index.items()
            if not name.startswith("_") and isinstance(value, (list, tuple)) and len(value) == 2}


def _check_components(folder: str, index: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Refuses components lidiff cannot import (naming each); returns ``(name, reason)`` of the ignored ones."""
    pipeline = index.get("_class_name", "a diffusers pipeline")
    components = pipeline_components(index)
    ignored, refused = [], []
    for name, cls in components.items():
        if name in IGNORED_COMPONENTS:
            why = "null in model_index.json" if cls is None else f"{cls}: {IGNORED_COMPONENTS[name]}"
            ignored.append((name, why))
        elif name not in MODEL_COMPONENTS and cls is not None:
            refused.append(f"{name!r} ({cls})")
    if refused:
        raise ConfigError(
            f"{folder} ({pipeline}) has components lidiff cannot import: {', '.join(refused)}. lidiff reads a UNet, "
            "its autoencoder, its scheduler settings and, for Stable Diffusion 1.x / 2.x, one CLIPTextModel text "
            "encoder with its CLIPTokenizer (SDXL's second text encoder 'text_encoder_2' and LDM's 'bert' are not "
            "read; for the CompVis text-to-image LDM, import its CompVis checkpoint file)")
    encoder, tokenizer = components.get("text_encoder"), components.get("tokenizer")
    if encoder is not None and encoder not in CLIP_TEXT_CLASSES:
        raise ConfigError(f"{folder} ({pipeline}): its text encoder 'text_encoder' is a {encoder}; lidiff imports "
                          "a CLIPTextModel (Stable Diffusion 1.x / 2.x) only")
    if encoder is not None and tokenizer not in CLIP_TOKENIZER_CLASSES:
        raise ConfigError(f"{folder} ({pipeline}): its 'tokenizer' is {tokenizer or 'missing'}; a CLIP text "
                          f"encoder needs its CLIPTokenizer")
    if tokenizer is not None and encoder is None:
        raise ConfigError(f"{folder} ({pipeline}) has a 'tokenizer' ({tokenizer}) but no 'text_encoder': lidiff "
                          "cannot tell which text encoder the UNet was trained with")
    return ignored


def read_diffusers(folder: str) -> Source:
    """A diffusers pipeline folder -> ``Source`` (the autoencoder renamed to CompVis keys; a CLIP text encoder is
    named by its folder, read at conversion)."""
    from lidiff.convert.diffusers_vae import diffusers_vae_to_compvis

    index = read_json(os.path.join(folder, "model_index.json"))
    ignored = _check_components(folder, index)
    vae_dir = next((os.path.join(folder, n) for n in ("vae", "vqvae") if os.path.isdir(os.path.join(folder, n))),
                   None)
    if vae_dir is None:
        raise MissingInputError(f"{folder} has no vae/ or vqvae/ folder: a latent diffusion pipeline needs its "
                                "autoencoder")
    unet_dir = os.path.join(folder, "unet")
    source = Source(
        "diffusers", folder, unet=_component_weights(unet_dir), ema={},
        first_stage=diffusers_vae_to_compvis(_component_weights(vae_dir)), cond={}, buffers={}, ignored=ignored,
        unet_config=read_json(os.path.join(unet_dir, "config.json")),
        scheduler_config=read_json(os.path.join(folder, "scheduler", "scheduler_config.json")),
        vae_config=read_json(os.path.join(vae_dir, "config.json")),
    )
    if pipeline_components(index).get("text_encoder") is not None:
        source.text_encoder_dir = os.path.abspath(os.path.join(folder, "text_encoder"))
        source.tokenizer_dir = os.path.abspath(os.path.join(folder, "tokenizer"))
        for sub in (source.text_encoder_dir, source.tokenizer_dir):
            if not os.path.isdir(sub):
                raise MissingInputError(f"{sub} is missing: model_index.json lists it")
        source.text_encoder_config = read_json(os.path.join(source.text_encoder_dir, "config.json"))
        architectures = source.text_encoder_config.get("architectures") or list(CLIP_TEXT_CLASSES)
        if not set(architectures) & set(CLIP_TEXT_CLASSES):
            raise ConfigError(f"{source.text_encoder_dir}/config.json describes a {', '.join(architectures)}; lidiff "
                              "imports a CLIPTextModel text encoder only")
    return source


def read_source(src: str, fmt: str | None) -> Source:
    """``--src`` (and ``--format``) -> ``Source``."""
    return read_diffusers(src) if detect_format(src, fmt) == "diffusers" else read_compvis(src)
