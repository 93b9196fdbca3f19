"""The training loop both stages share: feed batches, step, log, write images, checkpoint.

The host only feeds batches and, every ``log_every`` steps, reads back the metrics (one transfer for the
whole interval); everything else stays on the devices.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from lidiff import parallel
from lidiff.checkpoint import Checkpointer
from lidiff.metrics.writers import MetricWriter
from lidiff.train.common import check_finite, format_eta


@dataclasses.dataclass
class LoopSettings:
    name: str  # "autoencoder" | "diffusion", used in log lines
    num_steps: int
    batch_size: int  # global
    log_every: int
    checkpoint_every: int
    image_every: int = 0  # 0 = never
    eval_every: int = 0  # 0 = never; steps between calls of the loop's ``eval_fn``
    batch_keys: tuple[str, ...] = ("image",)  # the batch entries the step consumes
    finite_keys: tuple[str, ...] = ("loss", "grad_norm")


def check_finite_steps(fetched: list[dict[str, Any]], last_step: int, names: tuple[str, ...]) -> None:
    """Raises ``TrainingDiverged`` naming the first step whose ``names`` metrics are NaN/inf.

    fetched: host metrics of the consecutive steps that end at ``last_step`` (1-based step numbers).
    """
    first = last_step - len(fetched) + 1
    for i, metrics in enumerate(fetched):
        check_finite({k: float(np.asarray(metrics[k])) for k in names if k in metrics}, first + i, names)


def train_loop(
    settings: LoopSettings,
    state: Any,
    start_step: int,
    step_fn: Callable,
    extra_args: tuple[Any, ...],
    loader,
    mesh: Mesh,
    checkpointer: Checkpointer,
    meta: dict[str, Any],
    writer: MetricWriter,
    image_fn: Callable[[Any, dict[str, jax.Array]], dict[str, np.ndarray]] | None = None,
    eval_fn: Callable[[Any, int], dict[str, float]] | None = None,
) -> Any:
    """Runs ``state, metrics = step_fn(state, batch, *extra_args)`` from ``start_step`` to ``num_steps``.

    Checkpoints every ``checkpoint_every`` steps and at the end; returns the final state. A NaN/inf in
    ``finite_keys`` stops training with ``TrainingDiverged`` naming the first bad step, checked before anything
    is logged, drawn or saved, so every checkpoint on disk is finite.
    """
    s = settings
    if start_step >= s.num_steps:
        logging.info("%s: already trained to step %d of %d", s.name, start_step, s.num_steps)
        return state
    pending: list[dict[str, jax.Array]] = []
    interval_start, interval_steps = time.perf_counter(), 0
    run_start, run_first = time.perf_counter(), start_step
    last_saved = start_step
    try:
        for step, host_batch in loader.iterate(start_step):
            if step >= s.num_steps:
                break
            batch = parallel.global_batch({k: host_batch[k] for k in s.batch_keys}, mesh)
            state, metrics = step_fn(state, batch, *extra_args)
            pending.append(metrics)
            interval_steps += 1
            done = step + 1
            last = done == s.num_steps
            log_now = done % s.log_every == 0 or last
            images_now = image_fn is not None and s.image_every and (done % s.image_every == 0 or last)
            save_now = done % s.checkpoint_every == 0 or last
            eval_now = eval_fn is not None and s.eval_every and (done % s.eval_every == 0 or last)
            if log_now or images_now or save_now or eval_now:
                # Every step since the last check must be finite before anything is logged or saved, so a
                # non-finite state never reaches a checkpoint (and the error names the first bad step).
                fetched = jax.device_get(pending)
                check_finite_steps(fetched, done, s.finite_keys)
            if log_now:
                means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                pending = []
                elapsed = time.perf_counter() - interval_start
                steps_per_s = interval_steps / max(elapsed, 1e-9)
                means["steps_per_s"] = steps_per_s
                means["images_per_s"] = steps_per_s * s.batch_size
                if getattr(loader, "num_skipped", 0):
                    means["data/skipped_images"] = float(loader.num_skipped)
                writer.write_scalars(done, means)
                rate = (done - run_first) / max(time.perf_counter() - run_start, 1e-9)
                shown = " ".join(f"{k}={v:.4g}" for k, v in means.items() if k not in ("steps_per_s", "images_per_s"))
                logging.info(
                    "%s step %d/%d | %s | %.2f steps/s, %.1f images/s | ETA %s",
                    s.name, done, s.num_steps, shown, steps_per_s, means["images_per_s"],
                    format_eta((s.num_steps - done) / max(rate, 1e-9)),
                )
                interval_start, interval_steps = time.perf_counter(), 0
            if images_now:
                writer.write_images(done, image_fn(state, batch))
            if eval_now:
                writer.write_scalars(done, eval_fn(state, done))
            if save_now:
                checkpointer.save(done, state, meta)
                last_saved = done
            if last:
                break
    finally:
        loader.close()
        checkpointer.wait()
    logging.info("%s: finished at step %d (last checkpoint %d)", s.name, s.num_steps, last_saved)
    return state
