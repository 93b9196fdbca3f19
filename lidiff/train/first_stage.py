"""The frozen first stage seen from stage 2: load it from a stage-1 workdir, encode images, decode latents."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from ml_collections import ConfigDict

from lidiff.checkpoint import Checkpointer
from lidiff.errors import MissingInputError
from lidiff.models.autoencoder import DiagonalGaussian
from lidiff.train import builders


@dataclasses.dataclass(frozen=True)
class FirstStage:
    """A KL or VQ autoencoder used frozen. All methods are pure in ``params`` (jit them from outside).

    Latents here are UNSCALED (``scale_factor`` is applied by the caller).
    """

    model: Any
    kind: str  # "kl" | "vq"

    @property
    def latent_channels(self) -> int:
        return self.model.embed_dim

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factor

    def encode(self, params: Any, x: jax.Array) -> dict[str, jax.Array]:
        """x: [B, R, R, 3] in [-1, 1] -> KL: {"mean", "logvar"}; VQ: {"latent"}; each [B, R/f, R/f, c]."""
        if self.kind == "kl":
            posterior = self.model.apply({"params": params}, x, method=self.model.encode)
            return {"mean": posterior.mean, "logvar": posterior.logvar}
        return {"latent": self.model.apply({"params": params}, x, method=self.model.encode)}

    @staticmethod
    def latent_from_encoding(encoding: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
        """KL: a posterior sample (as LDM trains); VQ: the pre-quantisation latent."""
        if "latent" in encoding:
            return encoding["latent"]
        return DiagonalGaussian.from_mean_logvar(encoding["mean"], encoding["logvar"]).sample(rng)

    def decode(self, params: Any, z: jax.Array) -> jax.Array:
        """z: [B, h, w, c] unscaled latent -> images [B, h*f, w*f, 3] float32 (VQ quantises first)."""
        return self.model.apply({"params": params}, z, method=self.model.decode)


def load_first_stage(config: ConfigDict, workdir: str) -> tuple[FirstStage, Any]:
    """The frozen autoencoder named by ``config.diffusion.first_stage`` -> (FirstStage, params on host).

    The architecture comes from the checkpoint itself (saved by stage 1), so a stage-2 config cannot silently
    pair a checkpoint with the wrong model.
    """
    fs = config.diffusion.first_stage
    root = fs.workdir or workdir
    directory = os.path.join(root, "autoencoder", "checkpoints")
    checkpointer = Checkpointer(directory, create=False) if os.path.isdir(directory) else None
    if checkpointer is None or checkpointer.latest_step() is None:
        raise MissingInputError(
            f"no autoencoder checkpoint in {directory}. Train stage 1 first (config.stages=('autoencoder', "
            "'diffusion') or configs/autoencoder_*.py with the same --workdir), or point "
            "--config.diffusion.first_stage.workdir at a stage-1 workdir."
        )
    state, meta, _ = checkpointer.restore_items(names=("step", "params", "ema_params"))
    checkpointer.close()
    model_cfg = ConfigDict(meta["model"])
    model = builders.build_autoencoder(model_cfg, jnp.float32)
    if fs.use_ema and state.get("ema_params"):
        params, which = state["ema_params"], "EMA"
    else:
        params, which = state["params"]["autoencoder"], "raw"
    logging.info("first stage: %s autoencoder from %s (step %d, %s params)", model_cfg.kind, directory,
                 int(state["step"]), which)
    return FirstStage(model=model, kind=model_cfg.kind), params
