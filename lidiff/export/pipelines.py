"""Which diffusers pipeline (if any) reproduces a lidiff run's sampling, and what of the run diffusers cannot hold.

- ``StableDiffusionPipeline``: text conditioning by a frozen CLIP text encoder (``conditioning.encoder="clip"``),
  cross-attention UNet, KL first stage, prompts padded to the tokenizer's ``model_max_length`` (lidiff pads to
  ``conditioning.max_length``: they must agree). Guidance's unconditional branch is the empty prompt in both.
- ``LDMPipeline``: unconditional, a ``UNet2DModel`` and a VQ first stage (its ``vqvae`` component, which it
  decodes after dividing the latents by ``vqvae.config.scaling_factor``).
- anything else: the components are written without a ``model_index.json``, and the reason is reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ml_collections import ConfigDict

from lidiff.convert.diffusers_configs import DIFFUSERS_VERSION

NULL = [None, None]


@dataclasses.dataclass
class PipelinePlan:
    """name: the diffusers pipeline class, or None (components only). model_index: its ``model_index.json``.
    lines: the report's explanation (why this pipeline, or which one cannot express the model and why)."""

    name: str | None
    model_index: dict[str, Any] | None
    lines: list[str]


def _index(name: str, parts: dict[str, Any]) -> dict[str, Any]:
    return {"_class_name": name, "_diffusers_version": DIFFUSERS_VERSION, **parts}


def tokenizer_max_length(tokenizer_dir: str) -> int | None:
    """``model_max_length`` of a Hugging Face tokenizer folder (its ``tokenizer_config.json``), None if unknown."""
    path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        value = json.load(f).get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and value < 1e9 else None


def _text_encoder_kind(cond: ConfigDict) -> str:
    from lidiff.train.conditioning import text_encoder_kind

    return text_encoder_kind(cond)


def _stable_diffusion(cond: ConfigDict, unet_class: str, first_stage: str, tokenizer_dir: str) -> PipelinePlan:
    problems = []
    if unet_class != "UNet2DConditionModel":
        problems.append(f"it needs a UNet2DConditionModel, this UNet is a {unet_class}")
    if first_stage != "kl":
        problems.append(f"it decodes with an AutoencoderKL, this run's first stage is {first_stage.upper()}")
    length = tokenizer_max_length(tokenizer_dir)
    if length is not None and length != cond.max_length:
        problems.append(f"it pads prompts to the tokenizer's model_max_length {length}, lidiff to "
                        f"config.diffusion.conditioning.max_length={cond.max_length}")
    if problems:
        return PipelinePlan(None, None, ["pipeline: none written. StableDiffusionPipeline cannot express this "
                                         "model: " + "; ".join(problems)])
    lines = ["pipeline: StableDiffusionPipeline (frozen CLIP text encoder + cross-attention UNet + AutoencoderKL; "
             "classifier-free guidance's unconditional branch is the empty prompt, as in lidiff)"]
    if cond.clip_output == "penultimate":
        lines.append("  call it with clip_skip=1: this model reads the CLIP encoder's penultimate layer "
                     "(config.diffusion.conditioning.clip_output='penultimate'), the pipeline's default is the last")
    index = _index("StableDiffusionPipeline", {
        "feature_extractor": NULL, "image_encoder": NULL, "requires_safety_checker": False, "safety_checker": NULL,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", unet_class],
        "vae": ["diffusers", "AutoencoderKL"]})
    return PipelinePlan("StableDiffusionPipeline", index, lines)


def _unconditional(unet_class: str, first_stage: str) -> PipelinePlan:
    problems = []
    if unet_class != "UNet2DModel":
        problems.append(f"it needs a UNet2DModel, this UNet is a {unet_class}")
    if first_stage != "vq":
        problems.append(f"it decodes with a VQModel (component vqvae), this run's first stage is "
                        f"{first_stage.upper()}; no diffusers pipeline samples an unconditional KL latent diffusion "
                        "model: run DDIMScheduler over the UNet and decode latents / vae.config.scaling_factor")
    if problems:
        return PipelinePlan(None, None, ["pipeline: none written. LDMPipeline cannot express this model: "
                                         + "; ".join(problems)])
    index = _index("LDMPipeline", {"scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", unet_class],
                                   "vqvae": ["diffusers", "VQModel"]})
    return PipelinePlan("LDMPipeline", index, ["pipeline: LDMPipeline (unconditional UNet2DModel + VQModel; it "
                                                "divides latents by vqvae.config.scaling_factor before decoding)"])


def _other(cond: ConfigDict) -> str:
    """Why no diffusers pipeline samples a model with this conditioning."""
    kind, mode = cond.kind, cond.mode
    if kind == "class" and mode == "adm":
        return (f"no diffusers pipeline samples a class-conditional latent diffusion UNet. Call the UNet with "
                f"class_labels [B] in [0, {cond.num_classes}) ({cond.num_classes} is the null class that "
                "classifier-free guidance uses)")
    if kind == "class":
        return ("no diffusers pipeline (or component) holds lidiff's class embedder; the UNet's encoder_hidden_states "
                f"are its table's rows [B, 1, {cond.embed_dim}] (row {cond.num_classes} is the null class)")
    if kind == "text":
        return ("StableDiffusionPipeline encodes prompts with CLIP; this model's text encoder is the jointly trained "
                "BERT-style transformer (config.diffusion.conditioning.encoder='transformer'), which no diffusers or "
                "transformers component computes")
    if kind == "layout":
        return "no diffusers pipeline or component holds lidiff's layout (box token) transformer"
    return (f"the UNet takes x_t concatenated with the {kind} conditioning (config.diffusion.conditioning.kind="
            f"{kind!r}, mode 'concat'), which no diffusers pipeline prepares as lidiff does")


def plan_pipeline(config: ConfigDict, unet_class: str, first_stage: str, tokenizer_dir: str) -> PipelinePlan:
    """The pipeline to write for a run with ``config``, a UNet of ``unet_class``, a ``first_stage`` of kind
    ``"kl"`` / ``"vq"`` (and, for CLIP text models, the run's tokenizer folder)."""
    cond = config.diffusion.conditioning
    if cond.kind == "text" and _text_encoder_kind(cond) == "clip":
        return _stable_diffusion(cond, unet_class, first_stage, tokenizer_dir)
    if cond.kind == "none":
        return _unconditional(unet_class, first_stage)
    return PipelinePlan(None, None, ["pipeline: none written: " + _other(cond)])


def clip_text_encoder(config: ConfigDict) -> bool:
    """Whether the run conditions on a frozen CLIP text encoder (kept as a folder beside the run)."""
    cond = config.diffusion.conditioning
    return cond.kind == "text" and _text_encoder_kind(cond) == "clip"
