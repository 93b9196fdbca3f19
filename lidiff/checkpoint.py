"""Orbax checkpoints: atomic save, keep-N, restore onto the mesh, resume.

A checkpoint directory holds one numbered sub-directory per saved step with two items:

- ``state``: the train state pytree (params, optimizer state, EMA, step, ...).
- ``meta``: JSON with what numerics depend on and is not in ``state`` (e.g. ``scale_factor``, the config).

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoints intact and the partial one is ignored. Random keys and the data position are
derived from the step (``fold_in(seed_key, step)``; batch ``s`` is a pure function of ``s``), so restoring the
state is all it takes for a resumed run to continue exactly where it stopped.
"""

from __future__ import annotations

import logging as std_logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


def quiet_orbax_logs() -> None:
    """Keeps orbax's per-save INFO lines out of the console (its warnings and errors still show)."""
    std_logging.getLogger("absl").addFilter(
        lambda record: "orbax" not in record.pathname or record.levelno >= std_logging.WARNING
    )


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct``s (with shardings) describing ``tree``: the restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


class Checkpointer:
    """Keeps the ``keep`` most recent checkpoints of one training stage under ``directory``."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` and JSON-serialisable ``meta`` at ``step`` (asynchronously; see ``wait``)."""
        self._manager.save(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self._manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``(state, meta)`` at ``step`` (default latest) with ``target``'s structure and shardings.

        ``target`` is a pytree of arrays or ``ShapeDtypeStruct`` (e.g. ``abstract_like(initial_state)``).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = abstract_like(target)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        logging.info("restored step %d from %s", step, self.directory)
        return restored.state, dict(restored.meta)

    def restore_raw(self, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores ``(state, meta)`` as saved, as nested dicts of arrays, without a target structure.

        For reading another stage's checkpoint (e.g. the frozen autoencoder for stage 2).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
        return restored.state, dict(restored.meta)

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON ``meta`` of a checkpoint (cheap: reads no arrays)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
