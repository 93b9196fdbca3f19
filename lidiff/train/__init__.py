"""Training: train states, steps and loops; the only code that reads a config."""

from __future__ import annotations

from ml_collections import ConfigDict

from lidiff.errors import ConfigError

STAGES = ("autoencoder", "diffusion")


def train_and_evaluate(config: ConfigDict, workdir: str) -> None:
    """Runs every stage named in ``config.stages``, in order, under ``workdir/<stage>``.

    Re-running with the same ``workdir`` resumes each stage from its latest checkpoint (finished stages are
    skipped after their checkpoint is found complete).
    """
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown or not config.stages:
        raise ConfigError(f"config.stages={tuple(config.stages)!r}: each stage must be one of {STAGES}")
    for stage in config.stages:
        if stage == "autoencoder":
            from lidiff.train.autoencoder import train_autoencoder

            train_autoencoder(config, workdir)
        else:
            from lidiff.train.diffusion import train_diffusion

            train_diffusion(config, workdir)
