"""Import a released LDM checkpoint into a lidiff run directory (``python -m lidiff.convert``).

Sources (read by ``lidiff.convert.read_source``, whose docstring lists the key prefixes):

- a CompVis / Stable Diffusion single file (``.safetensors``, or a ``.ckpt`` that ``torch.load(weights_only=True)``
  reads): UNet, its EMA, first stage, cond stage (class embedder, BERT-style transformer, SD v1's CLIP text
  encoder, or semantic synthesis's ``SpatialRescaler``; super-resolution and inpainting models, which have none,
  are told apart by the UNet's input channels: ``lidiff.convert.import_spatial``), schedule buffers and
  ``scale_factor``;
- a diffusers folder: ``model_index.json``, ``unet/``, ``vae/`` or ``vqvae/``, ``scheduler/scheduler_config.json``,
  and for a ``StableDiffusionPipeline`` its CLIP ``text_encoder/`` and ``tokenizer/``
  (``lidiff.convert.import_clip``).

Every tensor is converted or explicitly ignored; anything else stops the import with one ``SourceMismatch``
naming every missing, unexpected and mis-shaped key. Without ``--config`` the architecture is read from the
tensor shapes (``lidiff.convert.infer``); what they cannot tell (the attention head layout, an SD v1 file's
tokenizer) must be given as a ``--config.<field>=<value>`` override.

What is written (the layout is ``lidiff.runs``'s), once every tensor has converted:

- ``<out>/autoencoder/checkpoints/0``: ``params = {"autoencoder": ..., "logvar": 0}`` and ``step``, meta as stage 1
  writes it (``runs.load_first_stage`` reads only these). No discriminator or optimizer state: stage 1 cannot be
  resumed from it, so the written ``config.stages`` is ``("diffusion",)``.
- ``<out>/diffusion/checkpoints/0``: the weights of a ``DiffusionState`` without its optimizer state: ``params``
  the raw weights, ``ema_params`` the EMA weights (the raw ones when the source has no EMA or with ``--no_ema``),
  ``step`` 0 and ``scale_factor``; meta with the whole config. ``sample.py`` and ``runs.load_latent_diffusion``
  read ``ema_params``; ``train.py`` starts a fresh AdamW state for ``params`` (``lidiff.train.diffusion.
  restore_state``), so no optimizer state of zeros (twice the params) is written.
- text models: ``<out>/diffusion/tokenizer/``; a frozen CLIP text encoder in ``<out>/diffusion/text_encoder/``
  (a transformers ``CLIPTextModel`` folder; its weights are not in the train state, whose ``params["cond"]`` is {}).
- ``<out>/config.py``: ``get_config()`` returns the saved config, for ``train.py --config`` (which needs a file).

An inferred config sets ``diffusion.train.ema_warmup=False``: a fine-tune restarts at step 0, and CompVis's EMA
warm-up would replace the imported EMA within a few steps.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from lidiff import runs
from lidiff.convert import import_clip, import_spatial, infer
from lidiff.convert.common import ConversionError, convert_state_dict
from lidiff.convert.read_source import (COND_PREFIX, EMA_UNET_PREFIX, FIRST_STAGE_PREFIX, UNET_PREFIX, Source,
                                       SourceMismatch, read_source)
from lidiff.errors import ConfigError, MissingInputError

DEFAULT_RESOLUTION = 256
SD_SCALE_FACTOR = 0.18215  # Stable Diffusion v1's latent scale (v1-inference.yaml); its files do not store it
# Placeholders of the written config for fine-tuning with train.py (set them with --config.* overrides).
FINETUNE_BATCH_SIZE, FINETUNE_LEARNING_RATE = 16, 1e-5


@dataclasses.dataclass
class ImportReport:
    """What the import did: the written config, and one line per decision (where each value came from)."""

    config: ConfigDict
    lines: list[str]
    used_ema: bool


# ----------------------------------------------------------------------------------------------------- config


def _base_module():
    """``configs/base.py`` of this checkout (configs/ is not an installed package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "configs", "base.py")
    path = os.path.normpath(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"{path} is missing: the import builds its config on configs/base.py of the lidiff "
                                "checkout")
    spec = importlib.util.spec_from_file_location("_lidiff_configs_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(spec: str) -> ConfigDict:
    """``configs/x.py`` or ``configs/x.py:arg`` -> its ``get_config([arg])``."""
    from lidiff.eval.sources import load_config

    return load_config(spec)


def parse_value(text: str) -> Any:
    """An override's value: a Python literal (``32``, ``(1, 2)``, ``True``, ``0.18215``), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ConfigDict, overrides: Mapping[str, str]) -> None:
    """Sets ``{"diffusion.model.num_heads": "8", ...}`` on ``config``; an unknown field raises ``ConfigError``
    naming the fields that exist at that level."""
    for path, text in overrides.items():
        node, parts = config, path.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ConfigDict) or part not in node:
                fields = sorted(node.keys()) if isinstance(node, ConfigDict) else []
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"--config.{path}: config.{'.'.join(parts[:i]) or '<root>'} has no field "
                                  f"{part!r}{hint}; its fields are {', '.join(fields)}")
            if i < len(parts) - 1:
                node = node[part]
        value = parse_value(text)
        if isinstance(node[parts[-1]], tuple) and isinstance(value, (int, float)):
            value = (value,)
        try:
            node[parts[-1]] = value
        except TypeError as e:
            raise ConfigError(f"--config.{path}={text}: {e}") from None


def _unet_config_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != "label_classes"}


def _conditioning_fields(source: Source, unet: Mapping[str, Any], ae: Mapping[str, Any],
                         user_kind: Any = None) -> tuple[dict[str, Any], list[str]]:
    """``diffusion.conditioning`` fields the source implies (BERT-style text: heads are left unset, -1) and report
    lines for the spatial kinds (``lidiff.convert.import_spatial``; user_kind: ``--config.diffusion.conditioning.
    kind`` when given). A concat model whose kind the channel counts do not decide gets kind none, which
    ``_check_required`` refuses naming the flag."""
    cond, notes = source.cond, []
    factor = 2 ** (len(ae["ch_mult"]) - 1)
    if source.has_clip:
        fields = import_clip.conditioning_fields(source)
    elif "embedding.weight" in cond:
        fields = infer.infer_class_embedder(infer.shapes_of(cond))
    elif "transformer.token_emb.weight" in cond:
        fields = infer.infer_text_transformer(infer.shapes_of(cond))
        fields.update(heads=-1, dim_head=-1)
    elif "channel_mapper.weight" in cond:
        fields = infer.infer_spatial_rescaler(infer.shapes_of(cond))
        notes = import_spatial.semantic_lines(fields, unet["in_channels"], ae["embed_dim"], factor)
    elif cond:
        raise ConfigError(f"{source.path}: unknown cond stage (keys {', '.join(sorted(cond)[:5])}); give --config "
                          "with the matching diffusion.conditioning")
    elif unet["label_classes"]:
        fields = dict(kind="class", mode="adm", num_classes=int(unet["label_classes"]) - 1)
    elif unet["context_dim"]:
        raise ConfigError(f"{source.path}: the UNet has cross-attention (context_dim {unet['context_dim']}) but the "
                          "source holds no conditioning encoder lidiff can import; give --config with one")
    else:
        fields, notes = import_spatial.concat_fields(unet["in_channels"], ae["embed_dim"], factor, user_kind)
        fields = fields or dict(kind="none")
    return fields, notes


def inferred_config(source: Source, resolution: int,
                    overrides: Mapping[str, str] | None = None) -> tuple[ConfigDict, list[str]]:
    """The experiment config the source's shapes imply -> ``(config, report lines)``; what the shapes do not
    determine is left unset (heads -1) for ``_check_required``. overrides: the ``--config.*`` flags (applied by the
    caller; a conditioning kind given there decides what a concat model's extra channels are)."""
    base = _base_module()
    if source.format == "diffusers":
        unet = infer.unet_fields_from_diffusers(source.unet_config)
    else:
        unet = infer.infer_unet(infer.shapes_of(source.unet))
        unet.update(legacy=True, num_heads=-1, num_head_channels=-1)
    ae = infer.infer_autoencoder(infer.shapes_of(source.first_stage), resolution)
    user_kind = (overrides or {}).get("diffusion.conditioning.kind")
    cond, cond_notes = _conditioning_fields(source, unet, ae, None if user_kind is None else parse_value(user_kind))
    model = base.autoencoder_model(ae["kind"], ae["ch_mult"], ae["z_channels"], ae["embed_dim"],
                                   attn_resolutions=ae["attn_resolutions"], n_embed=ae["n_embed"], ch=ae["ch"],
                                   num_res_blocks=ae["num_res_blocks"], resolution=resolution,
                                   attn_type=ae["attn_type"])
    stage1 = base.autoencoder_stage(model, base.autoencoder_loss(), FINETUNE_BATCH_SIZE, FINETUNE_LEARNING_RATE)
    stage2 = base.diffusion_stage(base.unet_model(**_unet_config_fields(unet)), FINETUNE_BATCH_SIZE,
                                  FINETUNE_LEARNING_RATE)
    stage2.conditioning.update(cond)
    if source.text_encoder and "scale_factor" not in source.buffers:
        stage2.first_stage.scale_factor = SD_SCALE_FACTOR
    # The imported EMA is a long-run average: a fine-tune continues it at the full decay instead of restarting
    # CompVis's warm-up (which would overwrite it within a few steps, since the step restarts at 0).
    stage2.train.ema_warmup = False
    data = "segmentation_folder" if cond["kind"] == "semantic" else "folder"
    config = base.experiment(("diffusion",), base.data_config(data, resolution=resolution), stage1, stage2)
    what = "unet/config.json and the vae tensor shapes" if source.format == "diffusers" else "the tensor shapes"
    shown = ("embed_dim",) if source.has_clip else tuple(k for k in cond if k not in ("kind", "mode", "heads",
                                                                                       "dim_head"))
    lines = [f"architecture inferred from {what}:", "  " + infer.describe_unet(unet),
             "  " + infer.describe_autoencoder(ae),
             f"  conditioning: {cond['kind']}" + (f" ({cond['mode']})" if cond["kind"] != "none" else "")
             + (", frozen CLIP text encoder" if source.has_clip else "")
             + "".join(f", {k} {cond[k]}" for k in shown)] + cond_notes
    if source.text_encoder and "scale_factor" not in source.buffers:
        lines.append(f"  scale_factor default {SD_SCALE_FACTOR}: Stable Diffusion v1's (its files do not store it)")
    if source.format == "diffusers" and source.unet_config.get("sample_size"):
        size = int(source.unet_config["sample_size"]) * 2 ** (len(ae["ch_mult"]) - 1)
        if size != resolution:
            lines.append(f"  resolution {resolution} (--resolution); the UNet's sample_size says {size}: pass "
                         f"--resolution {size} to sample at the pipeline's default size")
    return config, lines


def _check_required(config: ConfigDict, source: Source) -> None:
    """Refuses a config whose head layout (or text-encoder heads) the user has not set, naming the flags."""
    missing = []
    m = config.diffusion.model
    if m.num_heads == -1 and m.num_head_channels == -1:
        sd = " (Stable Diffusion v1: num_heads=8)" if source.text_encoder else ""
        missing.append("the UNet's attention head layout, which tensor shapes do not determine: "
                       + " or ".join(infer.HEAD_FLAGS) + sd)
    c = config.diffusion.conditioning
    if c.kind == "text" and not source.has_clip:
        if c.heads <= 0:
            missing.append("the text encoder's heads: --config.diffusion.conditioning.heads=<heads> (CompVis: 8)")
        if not c.tokenizer:
            missing.append("the text model's tokenizer: --config.diffusion.conditioning.tokenizer=<BERT tokenizer "
                           "folder> (bert-base-uncased for CompVis txt2img)")
    if c.kind == "none" and m.in_channels != config.autoencoder.model.embed_dim:
        missing.append(import_spatial.undetermined(m.in_channels, config.autoencoder.model.embed_dim))
    if missing:
        raise ConfigError(f"{source.path}: set what the checkpoint does not say, then run the command again:\n  "
                          + "\n  ".join(missing))
    if c.kind == "text" and not source.has_clip and c.dim_head == -1:
        inner = source.cond["transformer.attn_layers.layers.0.1.to_q.weight"].shape[0]
        if inner % c.heads:
            raise ConfigError(f"--config.diffusion.conditioning.heads={c.heads} does not divide the text encoder's "
                              f"attention width {inner}")
        c.dim_head = inner // c.heads


def _compare(inferred: Mapping[str, Any], section: ConfigDict, name: str) -> list[str]:
    """``field: checkpoint X, config Y`` for every inferred field the config sets differently."""
    out = []
    transformer_only = ("transformer_depth", "context_dim", "use_linear_in_transformer")
    for key, value in inferred.items():
        if key not in section or (key in transformer_only and not inferred.get("use_spatial_transformer", True)):
            continue
        have = section[key]
        if isinstance(value, tuple):
            same = sorted(value) == sorted(have) if "resolutions" in key else tuple(value) == tuple(have)
        else:
            same = value == have
        if not same:
            out.append(f"{name}.{key}: checkpoint {value!r}, config {have!r}")
    return out


def _head_differences(fields: Mapping[str, Any], model: ConfigDict) -> list[str]:
    """The attention heads (count x width) at every attention width: those of the diffusers ``config.json``
    fields vs those ``model`` (``diffusion.model``) builds; one line per width where they differ."""
    from lidiff.models.unet import attention_heads

    mult, ch = fields["channel_mult"], fields["model_channels"]
    widths = sorted({ch * mult[ds.bit_length() - 1] for ds in fields["attention_resolutions"]} | {ch * mult[-1]})
    out = []
    for width in widths:
        want = attention_heads(width, fields["num_heads"], fields["num_head_channels"], fields["legacy"],
                               fields["use_spatial_transformer"])
        try:
            have = attention_heads(width, model.num_heads, model.num_head_channels, model.legacy,
                                   model.use_spatial_transformer)
        except ValueError as e:
            have = str(e)
        if have != want:
            out.append(f"diffusion.model attention heads at width {width}: checkpoint {want[0]} x {want[1]}, config "
                       f"{have if isinstance(have, str) else f'{have[0]} x {have[1]}'} (num_heads / "
                       "num_head_channels / legacy)")
    return out


def check_config_against_source(config: ConfigDict, source: Source) -> None:
    """With ``--config``: the architecture it describes must be the checkpoint's (``SourceMismatch`` otherwise);
    a diffusers UNet's config.json also fixes the head layout."""
    heads: list[str] = []
    if source.format == "diffusers":
        unet = infer.unet_fields_from_diffusers(source.unet_config)
        heads = _head_differences(unet, config.diffusion.model)
        unet = {k: v for k, v in unet.items() if k not in ("num_heads", "num_head_channels", "legacy")}
    else:
        unet = infer.infer_unet(infer.shapes_of(source.unet))
    ae = infer.infer_autoencoder(infer.shapes_of(source.first_stage), config.autoencoder.model.resolution)
    diffs = (_compare(_unet_config_fields(unet), config.diffusion.model, "diffusion.model") + heads
             + _compare({k: v for k, v in ae.items() if k != "resolution"}, config.autoencoder.model,
                        "autoencoder.model"))
    if diffs:
        raise SourceMismatch("the --config architecture is not the checkpoint's:\n  " + "\n  ".join(diffs))


def build_config(source: Source, config_file: str | None, overrides: Mapping[str, str],
                 resolution: int) -> tuple[ConfigDict, list[str]]:
    """The experiment config to write -> ``(config, report lines)``: ``--config`` (checked against the shapes)
    or the inferred one, then the overrides, then the values the source stores (schedule, scale_factor)."""
    if config_file:
        config = load_config_file(config_file)
        apply_overrides(config, overrides)
        check_config_against_source(config, source)
        lines = [f"architecture from --config={config_file} (checked against the tensor shapes)"]
    else:
        config, lines = inferred_config(source, resolution, overrides)
        apply_overrides(config, overrides)
    _check_required(config, source)
    clip_lines = import_clip.finish_config(config, source, overrides, bool(config_file)) if source.has_clip else []
    config.stages = ("diffusion",)
    config.diffusion.first_stage.workdir = ""
    lines += ["  UNet heads: " + (f"num_head_channels {config.diffusion.model.num_head_channels}"
                                  if config.diffusion.model.num_head_channels != -1
                                  else f"num_heads {config.diffusion.model.num_heads}")]
    if not config_file:
        dropping = (f" conditioning.p_uncond {config.diffusion.conditioning.p_uncond:g} (Stable Diffusion's caption "
                    "dropping, for classifier-free guidance);" if source.has_clip else "")
        lines.append("  fine-tuning: diffusion.train.ema_warmup=False (the imported EMA continues at the full decay);"
                     f"{dropping} batch size {FINETUNE_BATCH_SIZE} and learning rate {FINETUNE_LEARNING_RATE:g} are "
                     "placeholders")
    lines += clip_lines
    lines += _stored_numbers(config, source, f"--config={config_file}" if config_file else
                             "the config: configs/base.py defaults and --config.* overrides")
    return config, lines


def _stored_numbers(config: ConfigDict, source: Source, where: str) -> list[str]:
    """Schedule, parameterization and scale_factor: from the source when it stores them, else the config
    (``where`` names it). Sets them on ``config``; returns report lines saying where each came from."""
    process, fs = config.diffusion.process, config.diffusion.first_stage
    stored: dict[str, Any] = {}
    origin, sampling = where, None
    if "betas" in source.buffers:
        stored = infer.infer_schedule(source.buffers["betas"], source.buffers.get("alphas_cumprod"))
        origin = "the checkpoint's betas buffer"
    elif source.scheduler_config:
        stored = infer.process_from_diffusers_scheduler(source.scheduler_config)
        origin = "scheduler/scheduler_config.json"
        differences = infer.sampling_differences(source.scheduler_config)
        name = source.scheduler_config.get("_class_name", "the scheduler")
        sampling = (f"sampling: lidiff's DDIM / PLMS steps (arange(0, T, T // S) + 1, the last to alphas_cumprod[0], "
                    f"x0 not clipped) differ from {name}'s settings: " + ", ".join(differences)
                    + "; samples will not equal diffusers' exactly") if differences else (
                    f"sampling: lidiff's DDIM / PLMS steps are {name}'s (timestep_spacing 'leading', steps_offset 1, "
                    "set_alpha_to_one False)")
    replaced = [f"{k} {process[k]!r}" for k, v in stored.items() if process[k] != v]
    process.update(stored)
    note = f"; replaces the config's {', '.join(replaced)}" if replaced and where.startswith("--config") else ""
    lines = [f"schedule: {process.schedule}, T={process.num_timesteps}, linear_start {process.linear_start:g}, "
             f"linear_end {process.linear_end:g} (from {origin}{note})"]
    if sampling:
        lines.append(sampling)
    if "parameterization" in stored:
        lines.append(f"parameterization: {process.parameterization} (from {origin})")
    else:
        lines.append(f"parameterization: {process.parameterization} (from {where}; the checkpoint does not say: "
                     "set --config.diffusion.process.parameterization=v for a v-prediction model)")
    if "scale_factor" in source.buffers:
        value = float(np.asarray(source.buffers["scale_factor"]).reshape(()))
        origin = "the checkpoint's scale_factor buffer"
    elif "scaling_factor" in source.vae_config:
        value, origin = float(source.vae_config["scaling_factor"]), "vae/config.json scaling_factor"
    else:
        value, origin = float(fs.scale_factor), where
    note = f"; replaces the config's {fs.scale_factor!r}" if value != fs.scale_factor and \
        where.startswith("--config") else ""
    if origin == where:
        note += "; set --config.diffusion.first_stage.scale_factor (0.18215 for the KL-f8 txt2img / SD models)"
    fs.scale_factor = value
    fs.scale_by_std = False  # the factor is fixed now; a fine-tune must not recompute it
    lines.append(f"scale_factor: {value:.6g} (from {origin}{note})")
    return lines


# ---------------------------------------------------------------------------------------------------- convert


def _collect(errors: list[str], what: str, fn, *args, **kwargs):
    """Runs one strict conversion; a ``ConversionError`` is recorded under ``what`` and None returned."""
    try:
        return fn(*args, **kwargs)
    except ConversionError as e:
        errors.append(f"{what}: {e}")
        return None


def convert_params(source: Source, config: ConfigDict, trainer, use_ema: bool,
                   errors: list[str] | None = None) -> tuple[Any, Any, Any, list[str]]:
    """All tensors -> ``(autoencoder params, params, ema_params, report lines)`` (nested float32 numpy).

    params / ema_params: ``{"unet": ..., "cond": ...}`` shaped like ``trainer.ldm.init_params`` (``"cond"`` is {}
    for a frozen CLIP text encoder, converted by ``convert_text_encoder``). errors: failures of conversions done
    before (the text encoder's), reported with these. Raises one ``SourceMismatch`` listing every component's
    missing, unexpected and mis-shaped tensors.
    """
    from lidiff.convert.compvis_cond import class_embedder_params_from_compvis, text_transformer_params_from_compvis
    from lidiff.convert.diffusers_unet import unet_params_from_compvis, unet_params_from_diffusers
    from lidiff.convert.diffusers_vae import autoencoder_params_from_compvis

    errors = list(errors or [])
    lines: list[str] = []
    unet_model = trainer.ldm.unet
    if source.format == "diffusers":
        unet = _collect(errors, "UNet (unet/)", unet_params_from_diffusers, source.unet, unet_model)
    else:
        unet = _collect(errors, f"UNet ({UNET_PREFIX}*)", unet_params_from_compvis, source.unet, unet_model)
    ema_unet = None
    if source.ema and use_ema:
        ema_unet = _collect(errors, f"UNet EMA ({EMA_UNET_PREFIX}*)", unet_params_from_compvis, source.ema,
                            unet_model, ema=True)
        lines.append(f"EMA: {len(source.ema)} {EMA_UNET_PREFIX}* tensors -> ema_params (sampling uses them); the raw "
                     f"{UNET_PREFIX}* weights -> params (fine-tuning continues from them)")
    elif source.ema:
        lines.append(f"EMA: --no_ema: the {len(source.ema)} {EMA_UNET_PREFIX}* tensors are ignored; params and "
                     "ema_params both hold the raw weights")
    else:
        lines.append("EMA: the source holds no EMA weights; params and ema_params both hold its weights")
    ae_model = trainer.first_stage.model
    prefix = "vae/" if source.format == "diffusers" else FIRST_STAGE_PREFIX + "*"
    if not source.first_stage:
        errors.append(f"autoencoder ({prefix}): no tensors; an LDM checkpoint carries its first stage")
        ae = None
    else:
        ae = _collect(errors, f"autoencoder ({prefix})", autoencoder_params_from_compvis, source.first_stage, ae_model)
    cond_target = jax.eval_shape(trainer.ldm.conditioner.init, jax.random.PRNGKey(0))
    kind = config.diffusion.conditioning.kind
    cond: Any = {}
    if source.cond and kind == "class":
        cond = _collect(errors, f"class embedder ({COND_PREFIX}*)", class_embedder_params_from_compvis, source.cond,
                        cond_target, prefix="")
    elif source.cond and kind == "text":
        cond = _collect(errors, f"text encoder ({COND_PREFIX}*)", text_transformer_params_from_compvis, source.cond,
                        cond_target, prefix="transformer.")
        outside = sorted(k for k in source.cond if not k.startswith("transformer."))
        if outside:
            errors.append(f"text encoder ({COND_PREFIX}*): unexpected {', '.join(outside[:50])}")
        if any(k.startswith("transformer.to_logits.") for k in source.cond):
            lines.append(f"ignored: {COND_PREFIX}transformer.to_logits.* (the unused language-model head)")
    elif source.cond and kind == "semantic":
        cond = _collect(errors, f"semantic map encoder ({COND_PREFIX}*)", import_spatial.semantic_params_from_compvis,
                        source.cond, cond_target)
    elif source.cond:  # CompVis names, strictly
        cond = _collect(errors, f"cond stage ({COND_PREFIX}*, conditioning.kind={kind!r})", convert_state_dict,
                        source.cond, cond_target)
    elif jax.tree.leaves(cond_target):
        errors.append(f"cond stage: conditioning.kind={kind!r} needs encoder weights, the source has none "
                      f"({COND_PREFIX}*)")
    if errors:
        raise SourceMismatch(f"{source.path} does not match the lidiff model (missing names are lidiff param "
                             "paths: input_blocks_4_1/norm is CompVis input_blocks.4.1.norm; unexpected and "
                             "mis-shaped names are the source's keys):\n" + "\n".join(errors)
                             + "\nCheck --config / the --config.* overrides, or that the file is not damaged.")
    params = {"unet": unet, "cond": cond}
    ema = {"unet": ema_unet if ema_unet is not None else unet, "cond": cond}
    return ae, params, ema, lines


def convert_text_encoder(source: Source, config: ConfigDict, errors: list[str]) -> tuple[Any, Any]:
    """A frozen CLIP text encoder -> ``(CLIPTextTransformer, params)``, or ``(None, None)`` when the source has
    none; on a mismatch the params are None and the failure is appended to ``errors`` (for ``convert_params``)."""
    if not source.has_clip:
        return None, None
    from lidiff.models.clip import CLIPTextTransformer

    kwargs = import_clip.architecture(source, config.diffusion.conditioning.heads)
    converted = _collect(errors, f"text encoder ({import_clip.component(source)})", import_clip.convert, source,
                         kwargs)
    return CLIPTextTransformer(**kwargs), None if converted is None else converted[1]


# ------------------------------------------------------------------------------------------------------ write


def _check_out(out: str) -> None:
    for stage in (runs.AUTOENCODER, runs.DIFFUSION):
        if os.path.exists(runs.checkpoint_dir(out, stage)):
            raise ConfigError(f"--out={out} already holds {stage} checkpoints ({runs.checkpoint_dir(out, stage)}); "
                              "choose a new directory (an import never overwrites a run)")
    for part in (runs.tokenizer_dir(out), runs.text_encoder_dir(out)):
        if os.path.exists(part):
            raise ConfigError(f"--out={out} already holds {part}, which the import would write; choose a new "
                              "directory (an import never overwrites a run)")


def write_text_parts(out: str, config: ConfigDict, source: Source, text_encoder: Any) -> list[str]:
    """A text model's tokenizer (copied) and frozen CLIP text encoder (copied or written) into the run directory
    (``runs.tokenizer_dir`` / ``runs.text_encoder_dir``); returns report lines."""
    from lidiff.train import conditioning as conditioning_setup

    if config.diffusion.conditioning.kind != "text":
        return []
    tokenizer = conditioning_setup.prepare_tokenizer(config, out)
    lines = [f"wrote {runs.tokenizer_dir(out)}: a copy of the tokenizer folder"]
    if source.has_clip:
        kwargs = import_clip.architecture(source, text_encoder[0].num_heads)
        import_clip.write_text_encoder(source, kwargs, tokenizer, runs.text_encoder_dir(out))
        how = f"a copy of {source.text_encoder_dir}" if source.text_encoder_dir else \
            "a transformers CLIPTextModel folder (config.json, model.safetensors) from the file's tensors"
        lines.append(f"wrote {runs.text_encoder_dir(out)}: {how}")
    return lines


def write_run(out: str, config: ConfigDict, trainer, ae_params: Any, params: Any, ema_params: Any) -> None:
    """Writes the autoencoder and diffusion checkpoints (step 0) under ``out`` in ``lidiff.runs``'s layout."""
    from lidiff.checkpoint import Checkpointer
    from lidiff.train.autoencoder import checkpoint_meta as autoencoder_meta
    from lidiff.train.diffusion import checkpoint_meta as diffusion_meta

    step = np.zeros((), np.int32)
    stage1 = {"step": step, "params": {"autoencoder": ae_params, "logvar": np.zeros((), np.float32)},
              "ema_params": {}}
    scale = float(config.diffusion.first_stage.scale_factor)
    as_host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    weights = {"step": step, "params": as_host(params), "ema_params": as_host(ema_params),
               "scale_factor": np.asarray(scale, np.float32)}  # a DiffusionState's items but opt_state
    for stage, tree, meta in ((runs.AUTOENCODER, stage1, autoencoder_meta(config)),
                              (runs.DIFFUSION, weights, diffusion_meta(config, scale))):
        checkpointer = Checkpointer(runs.checkpoint_dir(out, stage), keep=1)
        try:
            checkpointer.save(0, tree, meta)
        finally:
            checkpointer.close()


CONFIG_FILE = "config.py"
_CONFIG_PY = '''"""The config of the lidiff run in this folder, imported from {src} by python -m lidiff.convert:
the one saved with its latest diffusion checkpoint. Fine-tune with

    python train.py --config={path} --workdir={out} --config.data.path=<images> ...
"""

import os

from lidiff import runs


def get_config():
    return runs.saved_config(os.path.dirname(os.path.abspath(__file__)))
'''


def write_config_file(out: str, src: str) -> str:
    """``<out>/config.py``: ``get_config()`` returns the config saved with the run, so ``train.py --config`` (which
    needs a config file) can fine-tune the imported model. Returns its path."""
    path = os.path.join(out, CONFIG_FILE)
    with open(path, "w") as f:
        f.write(_CONFIG_PY.format(src=os.path.abspath(src), path=path, out=out))
    return path


def build_trainer(config: ConfigDict, out: str, text_encoder: tuple[Any, Any] | None = None):
    """The stage-2 model (``DiffusionTrainer``) the config builds. A text model's tokenizer is read from ``out``
    (``runs.tokenizer_dir``) or ``conditioning.tokenizer``, nothing is copied; text_encoder: a frozen CLIP text
    encoder ``(module, params or None)``."""
    from lidiff.ldm import FirstStage
    from lidiff.train import builders
    from lidiff.train.diffusion import DiffusionTrainer

    model_cfg = config.autoencoder.model
    first_stage = FirstStage(model=builders.build_autoencoder(model_cfg, jnp.float32), kind=model_cfg.kind)
    try:
        tokenizer = runs.load_tokenizer(out, config)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--config.diffusion.conditioning.tokenizer={config.diffusion.conditioning.tokenizer}: "
                          f"{e}") from None
    return DiffusionTrainer(config.diffusion, first_stage, config.seed, tokenizer,
                            text_encoder if text_encoder is not None and text_encoder[0] is not None else None)


def import_checkpoint(src: str, out: str, *, fmt: str | None = None, config_file: str | None = None,
                      overrides: Mapping[str, str] | None = None, use_ema: bool = True,
                      resolution: int = DEFAULT_RESOLUTION) -> ImportReport:
    """Reads ``src``, converts every tensor strictly and writes a run directory at ``out``.

    overrides: ``{"diffusion.model.num_head_channels": "32", ...}`` (the ``--config.<field>=<value>`` flags).
    resolution: training image size of the written config when there is no ``--config`` (it places the
    autoencoder's attention levels and is the default sampling size).
    """
    _check_out(out)
    source = read_source(src, fmt)
    try:
        config, lines = build_config(source, config_file, overrides or {}, resolution)
    except SourceMismatch:
        raise
    except ConversionError as e:  # inference could not read the shapes
        raise SourceMismatch(f"{src}: {e}") from None
    if source.text_encoder:  # a CompVis file's CLIP weights become a transformers folder in the run
        config.diffusion.conditioning.text_encoder = os.path.abspath(runs.text_encoder_dir(out))
    errors: list[str] = []
    text_encoder = convert_text_encoder(source, config, errors)
    trainer = build_trainer(config, out, text_encoder)
    ae, params, ema, ema_lines = convert_params(source, config, trainer, use_ema, errors)
    lines += ema_lines + [f"ignored: {key} ({reason})" for key, reason in source.ignored]
    lines += write_text_parts(out, config, source, text_encoder)
    write_run(out, config, trainer, ae, params, ema)
    config_path = write_config_file(out, src)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    lines += [f"wrote {out}: autoencoder/ and diffusion/ checkpoints at step 0 ({n:,} stage-2 parameters; "
              f"fine-tuning starts a fresh AdamW state) and {config_path}",
              f"  sample:    python sample.py --workdir={out}",
              f"  fine-tune: python train.py --config={config_path} --workdir={out} --config.data.path=<images> "
              "(set data, diffusion.train.batch_size / num_steps and diffusion.optim.learning_rate)" + {
                  "class": "; class labels from the data, e.g. --config.data.class_from_subdir=True",
                  "text": "; captions from the data, e.g. --config.data.source=captioned_folder",
                  "semantic": "; class-id maps named like the images in --config.data.maps_path",
              }.get(config.diffusion.conditioning.kind, "")]
    return ImportReport(config=config, lines=[f"{source.format} checkpoint {src}"] + lines,
                        used_ema=bool(source.ema) and use_ema)


def split_override_args(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` -> (the arguments that are not ``--config.<field>=<value>``, ``{field: value}``)."""
    rest, overrides = [], {}
    for arg in argv:
        if arg.startswith("--config."):
            field, sep, value = arg[len("--config."):].partition("=")
            if not sep:
                raise ConfigError(f"{arg}: write config overrides as --config.<field>=<value>")
            overrides[field] = value
        else:
            rest.append(arg)
    return rest, overrides
