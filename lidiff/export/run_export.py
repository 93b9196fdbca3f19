"""A lidiff run directory -> a diffusers-format folder (``python -m lidiff.export``).

What is read (``lidiff.runs``' layout; never the optimizer state):

- ``<workdir>/diffusion/checkpoints/<latest>``: ``ema_params`` (or ``params`` with ``use_ema=False``),
  ``scale_factor``, and the config saved with it.
- the first stage named by ``config.diffusion.first_stage`` (``runs.load_first_stage``: EMA weights when the
  config says so, as sampling uses them).
- a frozen CLIP text encoder's folders ``runs.text_encoder_dir`` / ``runs.tokenizer_dir``, copied as they are.

What is written::

    unet/config.json, diffusion_pytorch_model.safetensors      UNet2DConditionModel | UNet2DModel
    vae/ (AutoencoderKL) | vqvae/ (VQModel)                     config.json with scaling_factor = scale_factor
    scheduler/scheduler_config.json                             DDIMScheduler with the run's betas
    text_encoder/, tokenizer/                                   frozen CLIP text models only
    model_index.json                                            when a diffusers pipeline reproduces the sampling

The folder is assembled under a temporary name beside ``out`` and renamed into place at the end, so ``out``
either does not exist or holds a complete export; an existing non-empty ``out`` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from lidiff import runs
from lidiff.errors import ConfigError, MissingInputError
from lidiff.export.pipelines import clip_text_encoder, plan_pipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclasses.dataclass
class ExportReport:
    """out: the written folder. pipeline: the ``model_index.json`` pipeline, or None (components only).
    components: the subfolders written. lines: what was written and where each value came from."""

    out: str
    pipeline: str | None
    components: list[str]
    lines: list[str]


def check_out(out: str) -> None:
    """Refuses an ``out`` that exists and is not an empty folder (an export never overwrites)."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out={out} already exists and is not an empty folder; choose a new one (an export "
                          "never overwrites)")


def text_model_folders(config: ConfigDict, workdir: str) -> tuple[str, str] | None:
    """(text encoder folder, tokenizer folder) of a run with a frozen CLIP text encoder, else None; a missing one
    raises ``MissingInputError`` naming it."""
    if not clip_text_encoder(config):
        return None
    folders = (runs.text_encoder_dir(workdir), runs.tokenizer_dir(workdir))
    missing = [path for path in folders if not os.path.isdir(path)]
    if missing:
        raise MissingInputError(
            f"{workdir}: this run conditions on a frozen CLIP text encoder (config.diffusion.conditioning.encoder="
            f"'clip'), but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. Copy the "
            "CLIPTextModel folder (config.json + model.safetensors) and the CLIP tokenizer folder the run was "
            f"trained with to {folders[0]} and {folders[1]}, then export again.")
    return folders


def restore_stage2(workdir: str, use_ema: bool) -> tuple[dict[str, Any], float, int, ConfigDict]:
    """The newest stage-2 checkpoint -> (params {"unet", "cond"} as host arrays, scale_factor, step, config).

    Reads ``ema_params`` (``use_ema``) or ``params``, plus ``scale_factor``; nothing else.
    """
    from lidiff.checkpoint import Checkpointer

    if not runs.has_stage(workdir, runs.DIFFUSION):
        raise MissingInputError(f"--workdir={workdir}: no stage-2 (diffusion) checkpoint in "
                                f"{runs.checkpoint_dir(workdir, runs.DIFFUSION)}")
    item = "ema_params" if use_ema else "params"
    checkpointer = Checkpointer(runs.checkpoint_dir(workdir, runs.DIFFUSION), create=False)
    try:
        items, meta, step = checkpointer.restore_items(names=(item, "scale_factor"))
    finally:
        checkpointer.close()
    scale = float(np.asarray(items["scale_factor"]).reshape(()))
    return items[item], scale, step, ConfigDict(json.loads(meta["config"]))


def write_component(folder: str, config: dict[str, Any], state: dict[str, np.ndarray],
                    config_name: str = "config.json") -> None:
    """``folder/config.json`` (sorted keys) and, when ``state`` is non-empty, ``folder/WEIGHTS`` (safetensors,
    PyTorch layouts)."""
    from safetensors.numpy import save_file

    os.makedirs(folder)
    with open(os.path.join(folder, config_name), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    if state:
        save_file(state, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})


def _count(tree: Any) -> int:
    from lidiff.convert.common import flatten

    return sum(int(np.prod(np.shape(v))) for v in flatten(tree).values()) if tree else 0


def _write_unet(tmp: str, config: ConfigDict, unet_params: Any, latent_size: int) -> tuple[dict[str, Any], str]:
    """``unet/`` -> (its config, a report line)."""
    from lidiff.convert.diffusers_configs import unet_config
    from lidiff.convert.to_diffusers import unet_state_dict_to_diffusers
    from lidiff.train import builders
    from lidiff.train.conditioning import unet_num_classes

    unet = builders.build_unet(config.diffusion.model, unet_num_classes(config.diffusion.conditioning))
    unet_cfg = unet_config(unet, latent_size)
    write_component(os.path.join(tmp, "unet"), unet_cfg,
                    unet_state_dict_to_diffusers(unet_params, unet))
    classes = f", num_class_embeds {unet.num_classes} (adm class labels)" if unet.num_classes else ""
    return unet_cfg, (f"unet/: {unet_cfg['_class_name']} from config.diffusion.model ({_count(unet_params):,} "
                      f"parameters), sample_size {latent_size} (config.data.resolution {config.data.resolution} / "
                      f"the first stage's factor){classes}")


def _write_autoencoder(tmp: str, config: ConfigDict, workdir: str, first_stage: Any, fs_params: Any,
                       scale: float) -> tuple[str, dict[str, Any], str]:
    """``vae/`` or ``vqvae/`` -> (folder name, its config, a report line)."""
    from lidiff.convert.diffusers_configs import autoencoder_config
    from lidiff.convert.to_diffusers import autoencoder_state_dict_to_diffusers

    name = "vqvae" if first_stage.kind == "vq" else "vae"
    vae_cfg = autoencoder_config(first_stage.model, scale)
    write_component(os.path.join(tmp, name), vae_cfg,
                    autoencoder_state_dict_to_diffusers(fs_params, first_stage.model))
    fs = config.diffusion.first_stage
    source = runs.checkpoint_dir(fs.workdir or workdir, runs.AUTOENCODER)
    weights = "its EMA weights when stage 1 kept them" if fs.use_ema else "its raw weights"
    return name, vae_cfg, (f"{name}/: {vae_cfg['_class_name']} from {source} ({weights}: config.diffusion."
                           f"first_stage.use_ema={fs.use_ema}); scaling_factor {scale:.6g} = the checkpoint's "
                           "scale_factor")


def _write_scheduler(tmp: str, process: ConfigDict) -> str:
    """``scheduler/scheduler_config.json`` -> a report line."""
    from lidiff.convert.diffusers_configs import scheduler_config

    sched_cfg, how = scheduler_config(process)
    write_component(os.path.join(tmp, "scheduler"), sched_cfg, {}, "scheduler_config.json")
    return (f"scheduler/: DDIMScheduler from config.diffusion.process ({process.schedule}, T={process.num_timesteps}, "
            f"linear_start {process.linear_start:g}, linear_end {process.linear_end:g}): {how}; prediction_type "
            f"{sched_cfg['prediction_type']} (parameterization {process.parameterization}); steps_offset=1, "
            "set_alpha_to_one=False, clip_sample=False (CompVis's DDIM steps)")


def _left_out(config: ConfigDict, workdir: str, cond_params: Any, text: tuple[str, str] | None) -> list[str]:
    """Report lines naming what of the run the export does not carry."""
    lines = []
    if _count(cond_params):
        lines.append(f"left out: the {config.diffusion.conditioning.kind} conditioning encoder's params['cond'] "
                     f"({_count(cond_params):,} parameters): no diffusers component holds it")
    if text is None and os.path.isdir(runs.tokenizer_dir(workdir)):
        lines.append(f"left out: the text encoder's tokenizer {runs.tokenizer_dir(workdir)}")
    return lines


def _write_all(tmp: str, out: str, workdir: str, use_ema: bool) -> tuple[str | None, list[str], list[str]]:
    """Writes every component into ``tmp`` (renamed to ``out`` afterwards) -> (pipeline, components, report
    lines)."""
    config = runs.saved_config(workdir, runs.DIFFUSION)
    text = text_model_folders(config, workdir)  # before any heavy reading: a missing folder is named at once
    params, scale, step, config = restore_stage2(workdir, use_ema)
    first_stage, fs_params = runs.load_first_stage(config, workdir)
    lines = [f"read {runs.checkpoint_dir(workdir, runs.DIFFUSION)}/{step}: "
             f"{'EMA params (ema_params)' if use_ema else 'raw params (params, --no_ema)'}, scale_factor, config"]
    latent_size = config.data.resolution // first_stage.downsample_factor
    unet_cfg, line = _write_unet(tmp, config, params["unet"], latent_size)
    vae_name, vae_cfg, vae_line = _write_autoencoder(tmp, config, workdir, first_stage, fs_params, scale)
    lines += [line, vae_line, _write_scheduler(tmp, config.diffusion.process)]
    components = ["unet", vae_name, "scheduler"]
    if text is not None:
        for name, source in zip(("text_encoder", "tokenizer"), text):
            shutil.copytree(source, os.path.join(tmp, name))
            lines.append(f"{name}/: copied from {source}")
        components += ["text_encoder", "tokenizer"]

    plan = plan_pipeline(config, unet_cfg["_class_name"], first_stage.kind, text[1] if text else "")
    if plan.model_index is not None:
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(plan.model_index, f, indent=2, sort_keys=True)
            f.write("\n")
    lines += plan.lines + _left_out(config, workdir, params.get("cond"), text)
    load = (f"DiffusionPipeline.from_pretrained({out!r})" if plan.name else
            f"{unet_cfg['_class_name']}.from_pretrained({out!r}, subfolder='unet'); likewise "
            f"{vae_cfg['_class_name']} ({vae_name}) and DDIMScheduler (scheduler)")
    return plan.name, components, lines + [f"  load: {load}"]


def export_run(workdir: str, out: str, *, use_ema: bool = True) -> ExportReport:
    """Writes the diffusers folder of the run in ``workdir`` to ``out`` (see the module docstring).

    Raises ``MissingInputError`` (no checkpoint, a missing CLIP folder) or ``ConfigError`` (an existing ``out``, a
    model diffusers cannot express, naming the config field). Nothing is left at ``out`` when it fails.
    """
    check_out(out)
    out = os.path.abspath(out)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        pipeline, components, lines = _write_all(tmp, out, workdir, use_ema)
        check_out(out)
        os.replace(tmp, out)  # atomic; onto an empty folder too
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(out=out, pipeline=pipeline, components=components,
                        lines=[f"exported {workdir} -> {out}"] + lines)
