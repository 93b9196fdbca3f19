"""Orbax checkpoints that survive: atomic save, keep-N, per-item restore, fallback past a damaged step.

A checkpoint directory holds one numbered sub-directory per saved step. Each top-level field of the train state
(``step``, ``params``, ``opt_state``, ``ema_params``, ...) is its own orbax item, so a reader restores only what
it needs (sampling reads ``ema_params`` and never the optimizer state); ``meta`` is JSON with what numerics
depend on and is not an array (the config, the model's architecture) plus ``items``, the names saved.

What can go wrong, and what happens:

- **Killed mid-save**: orbax writes each step into a temporary directory and renames it when complete; the
  partial directory is ignored and removed on the next start.
- **A damaged step** (a truncated array file, missing metadata): ``restore`` reports it by step and reason,
  renames it to ``<step>.unreadable-<n>`` (never deletes it) and restores the newest step that reads.
- **Divergence**: ``save`` first counts non-finite values in the state on the device; a state with any is not
  saved (``TrainingDiverged``), so keep-N only ever rotates finite checkpoints out for finite ones.
- **Disk full**: ``save`` checks the free space first, and a write that fails for lack of space anyway is
  cleaned up (the temporary directory removed) and reported as one ``CheckpointWriteError`` naming the
  directory and the space needed; earlier checkpoints are untouched.

Random keys and the data position are derived from the step, so restoring the state is all it takes for a
resumed run to continue exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from lidiff.errors import CheckpointWriteError, ConfigError, MissingInputError, TrainingDiverged

META = "meta"
SCALARS = "scalars"  # the item holding the state's single-array fields (step, scale_factor): orbax wants trees
_TMP_MARKER = ".orbax-checkpoint-tmp"


def quiet_orbax_logs() -> None:
    """Kept for callers outside the entry points; ``lidiff.cli.quiet_logs`` does this and more."""
    from lidiff.cli import quiet_logs

    quiet_logs()


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct``s (with shardings) describing ``tree``: a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


def state_items(state: Any) -> dict[str, Any]:
    """A train state (flax struct dataclass or dict) as ``{field: subtree}``."""
    if dataclasses.is_dataclass(state):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return dict(state)


def _is_empty(tree: Any) -> bool:
    return not jax.tree.leaves(tree)


def _path_names(path) -> tuple:
    """A tree path as plain names, the same for dict keys, attributes (named tuples) and sequence indices."""
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", str(k)))) for k in path)


def saved_structure(item_dir: str) -> Any:
    """The saved tree of one item as ``ShapeDtypeStruct``s on this process's first device, from its metadata
    (reads no arrays). The restore target for reading a checkpoint as saved, whatever mesh wrote it."""
    metadata = ocp.StandardCheckpointer().metadata(item_dir).item_metadata
    tree = getattr(metadata, "tree", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)


def _is_array(tree: Any) -> bool:
    return hasattr(tree, "shape") and hasattr(tree, "dtype")


def _orbax_items(items: dict[str, Any]) -> dict[str, Any]:
    """Fields as orbax items: trees as they are, single arrays gathered under ``SCALARS``, empty ones left out."""
    out = {name: tree for name, tree in items.items() if not _is_array(tree) and not _is_empty(tree)}
    scalars = {name: tree for name, tree in items.items() if _is_array(tree)}
    if scalars:
        out[SCALARS] = scalars
    return out


def _host_copies(tree: Any) -> Any:
    """In a single-process run, the fully replicated arrays of ``tree`` as host numpy arrays; orbax then writes
    them as they are, instead of compiling a slice per array shape and device (seconds per save on 8 devices).
    Sharded arrays, and every array of a multi-process run, stay jax arrays for orbax's per-shard writes. Either
    form restores onto any sharding."""
    if jax.process_count() > 1:
        return tree

    def host(x):
        if isinstance(x, jax.Array) and x.sharding.is_fully_replicated:
            return np.asarray(x)
        return x

    return jax.tree.map(host, tree)


@jax.jit
def _nonfinite_counts(items: dict[str, Any]) -> dict[str, jax.Array]:
    """{item: number of NaN/inf values in its floating-point leaves} (int32 scalars), on the device."""
    def count(tree):
        leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        return sum((jnp.sum(~jnp.isfinite(x)).astype(jnp.int32) for x in leaves), jnp.int32(0))

    return {name: count(tree) for name, tree in items.items()}


def _host_nonfinite_count(tree: Any) -> int:
    """NaN/inf values in the floating-point leaves of a tree of host (numpy) arrays."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    return int(sum(np.count_nonzero(~np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating)))


def nonfinite_values(state: Any) -> dict[str, int]:
    """{item: count} of the items of ``state`` that hold NaN/inf values (empty when all are finite).

    Items held in jax arrays are counted on their devices by one compiled program; items of host arrays (an
    imported checkpoint, a restored state on the host) are counted with numpy, compiling nothing."""
    items = state_items(state)
    on_device = {name: tree for name, tree in items.items()
                 if any(isinstance(x, jax.Array) for x in jax.tree.leaves(tree))}
    counts = {name: _host_nonfinite_count(tree) for name, tree in items.items() if name not in on_device}
    if on_device:
        counts.update(jax.device_get(_nonfinite_counts(on_device)))
    return {name: int(n) for name, n in counts.items() if int(n)}


def tree_nbytes(tree: Any) -> int:
    """Bytes of one copy of the arrays in ``tree`` (what a checkpoint of it holds, before compression)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _is_no_space(error: BaseException) -> bool:
    """Whether ``error`` or anything it was raised from is an out-of-space failure."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "ENOSPC" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


# What reading a damaged step raises (orbax/tensorstore over truncated or missing files and metadata). Anything
# else is not evidence of damage and is re-raised instead of setting a checkpoint aside.
_DAMAGE_SIGNS = ("_METADATA", "Metadata file", "OCDBT", "Error reading", "Error opening", "DATA_LOSS",
                 "OUT_OF_RANGE", "not valid for value of size", "truncated", "Expecting value", "JSONDecodeError",
                 "Unterminated string", "No such file or directory", "does not exist")


def _looks_damaged(error: BaseException) -> bool:
    """Whether a failed restore looks like damaged files (rather than a bug or a wrong target)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, FileNotFoundError) or any(sign in str(error) for sign in _DAMAGE_SIGNS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class Checkpointer:
    """Keeps the ``keep`` most recent checkpoints of one training stage under ``directory``."""

    def __init__(self, directory: str, keep: int = 3, *, create: bool = True):
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self._create = create
        self._manager = self._open()
        self._pending: tuple[int, int] | None = None  # (step, bytes) of the save in flight

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=self._create,
                                                 cleanup_tmp_directories=self._create),
        )

    # ------------------------------------------------------------------------------------------------ reading
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None (a damaged one is only found by restoring it)."""
        return self._manager.latest_step()

    def _restore_step(self, step: int, targets: dict[str, Any] | None, names: tuple[str, ...] | None):
        meta = dict(self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])
        trees, scalars = tuple(meta.get("items", ())), tuple(meta.get("scalars", ()))
        wanted = names if names is not None else (tuple(targets) if targets is not None else trees + scalars)
        args = {}
        for name in wanted + ((SCALARS,) if any(name in scalars for name in wanted) else ()):
            if name in trees or name == SCALARS:
                item_dir = os.path.join(self.directory, str(step), name)
                if not os.path.isfile(os.path.join(item_dir, "_METADATA")):
                    raise FileNotFoundError(f"{name}/_METADATA is missing (an incomplete or damaged step)")
                if name == SCALARS:  # onto the targets' shardings when all are given, else as saved
                    whole = targets is not None and all(n in targets for n in scalars)
                    target = ({n: abstract_like(targets[n]) for n in scalars} if whole
                              else saved_structure(item_dir))
                else:
                    target = saved_structure(item_dir) if targets is None else abstract_like(targets[name])
                args[name] = ocp.args.StandardRestore(target)
        restored = self._manager.restore(step, args=ocp.args.Composite(**args)) if args else {}
        items = {}
        for name in wanted:
            if name in trees:
                items[name] = restored[name]
            elif name in scalars:
                items[name] = restored[SCALARS][name]
            elif targets is None:
                items[name] = {}  # not saved: it was empty (e.g. EMA switched off)
            elif _is_empty(targets[name]):
                items[name] = targets[name]
            else:
                raise KeyError(f"item {name!r} is not in checkpoint step {step} (it has "
                               f"{', '.join(trees + scalars)})")
        return items, meta

    def _mismatch(self, step: int, targets: dict[str, Any]) -> str | None:
        """How the arrays saved at ``step`` differ in structure or shape from ``targets`` (read from the saved
        metadata), or None when they agree or the metadata itself is unreadable (then the step is damaged)."""
        for name, target in targets.items():
            path = os.path.join(self.directory, str(step), name)
            if _is_array(target) or _is_empty(target) or not os.path.isdir(path):
                continue
            try:
                saved = {"/".join(map(str, _path_names(k))): tuple(v.shape)
                         for k, v in jax.tree_util.tree_flatten_with_path(saved_structure(path))[0]}
            except Exception:  # noqa: BLE001 - unreadable metadata means damage, not a mismatch
                return None
            if not saved:  # no metadata could be read: damage
                return None
            wanted = {"/".join(map(str, _path_names(k))): tuple(v.shape)
                      for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
            missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
            shapes = [f"{k}: saved {saved[k]}, expected {wanted[k]}" for k in wanted if k in saved
                      and saved[k] != wanted[k]]
            if missing or extra or shapes:
                parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
                        ([f"unexpected {', '.join(extra[:5])}"] if extra else []) + shapes[:5]
                return f"{name}: " + "; ".join(parts)
        return None

    def _set_aside(self, step: int, reason: str) -> str:
        """Renames the damaged ``<step>`` directory out of the way (never deletes it); returns the new path.
        In a multi-process run process 0 renames it; every process skips it."""
        source = os.path.join(self.directory, str(step))
        if jax.process_index() != 0:
            logging.warning("checkpoint step %d in %s cannot be restored (%s); skipped", step, self.directory,
                            reason)
            return source
        n = 0
        while os.path.exists(f"{source}.unreadable-{n}"):
            n += 1
        target = f"{source}.unreadable-{n}"
        self._manager.close()
        os.rename(source, target)
        self._manager = self._open()
        logging.warning("checkpoint step %d in %s cannot be restored (%s); set aside as %s", step, self.directory,
                        reason, os.path.basename(target))
        return target

    def restore_items(self, targets: dict[str, Any] | None = None, step: int | None = None,
                      names: tuple[str, ...] | None = None) -> tuple[dict[str, Any], dict[str, Any], int]:
        """Restores items of a checkpoint -> ``(items, meta, step)``.

        targets: ``{item: pytree of arrays or ShapeDtypeStruct}`` giving structure, dtype and sharding of each
          item to restore (None: as saved, host-side nested dicts). names: restore only these items.
        step: a given step (a damaged one raises); default the newest step that restores, setting damaged
          newer ones aside (``<step>.unreadable-<n>``) with a warning naming the reason.
        """
        if step is not None:
            if step not in self.all_steps():
                raise MissingInputError(f"no checkpoint of step {step} in {self.directory} "
                                        f"(steps there: {self.all_steps() or 'none'})")
            items, meta = self._restore_step(step, targets, names)
            return items, meta, step
        set_aside = []
        for candidate in reversed(self.all_steps()):
            try:
                items, meta = self._restore_step(candidate, targets, names)
            except Exception as e:  # noqa: BLE001 - damage is set aside, anything else re-raised below
                mismatch = self._mismatch(candidate, targets) if targets is not None else None
                if mismatch:
                    raise ConfigError(
                        f"checkpoint step {candidate} in {self.directory} does not fit the model this config "
                        f"builds ({mismatch}). Use the config the run was trained with, or a new --workdir."
                    ) from None
                if not _looks_damaged(e):
                    raise
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                set_aside.append(f"step {candidate} ({reason})")
                self._set_aside(candidate, reason)
                continue
            if set_aside:
                logging.warning("resuming from step %d, the newest checkpoint that restores", candidate)
            logging.info("restored step %d from %s", candidate, self.directory)
            return items, meta, candidate
        detail = f"; set aside as unreadable: {'; '.join(set_aside)}" if set_aside else ""
        raise MissingInputError(f"no restorable checkpoint in {self.directory}{detail}")

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores a whole train state shaped like ``target`` (a state of arrays or ``ShapeDtypeStruct``s,
        with the shardings to restore onto) -> ``(state, meta)``; see ``restore_items`` for ``step``."""
        items, meta, _ = self.restore_items(state_items(target), step)
        if dataclasses.is_dataclass(target):
            return target.replace(**items), meta
        return items, meta

    def saved_items(self, step: int | None = None) -> tuple[str, ...]:
        """Names of the items saved at ``step`` (default: the latest), from its meta: empty items (e.g. an EMA
        switched off) and items left out on purpose (an imported model's optimizer state) are not among them."""
        meta = self.restore_meta(step)
        return tuple(meta.get("items", ())) + tuple(meta.get("scalars", ()))

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON ``meta`` of a checkpoint (reads no arrays)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise MissingInputError(f"no checkpoint in {self.directory}")
        return dict(self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])

    # ------------------------------------------------------------------------------------------------ writing
    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` (each field an item) and JSON ``meta`` at ``step``, asynchronously (see ``wait``).

        Refuses a state with NaN/inf values (``TrainingDiverged``) and a disk without room for it
        (``CheckpointWriteError``) before writing anything.
        """
        items = state_items(state)
        bad = nonfinite_values(items)
        if bad:
            counts = ", ".join(f"{name}: {n}" for name, n in bad.items())
            latest = self.latest_step()
            raise TrainingDiverged(
                f"step {step}: the train state holds non-finite values ({counts}), so it was not saved; the latest "
                f"checkpoint ({'step ' + str(latest) if latest is not None else 'none'}) in {self.directory} is "
                "untouched. Lower the learning rate, use float32, enable gradient clipping, or check the data."
            )
        self.wait()  # a failed earlier save surfaces here, before a new one starts
        nbytes = tree_nbytes(items)
        self._check_space(step, nbytes)
        saved = _orbax_items(_host_copies(items))
        args = {name: ocp.args.StandardSave(tree) for name, tree in saved.items()}
        args[META] = ocp.args.JsonSave({**meta, "items": sorted(n for n in saved if n != SCALARS),
                                        "scalars": sorted(saved.get(SCALARS, {}))})
        self._pending = (int(step), nbytes)
        try:
            self._manager.save(int(step), args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - classified below; anything but lack of space is re-raised
            self._fail(e)

    def _check_space(self, step: int, nbytes: int) -> None:
        os.makedirs(self.directory, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        needed = int(nbytes * 1.05) + 2**20  # arrays + orbax metadata
        if free < needed:
            raise CheckpointWriteError(self._no_space_message(step, needed, free))

    def _no_space_message(self, step: int, needed: int, free: int) -> str:
        latest = self.latest_step()
        return (
            f"cannot save checkpoint step {step} to {self.directory}: not enough disk space (needs about "
            f"{_mib(needed)}, {_mib(free)} free). Earlier checkpoints are untouched "
            f"({'latest: step ' + str(latest) if latest is not None else 'none saved yet'}); free some space or "
            "move the workdir, then run the same command again to resume."
        )

    def _remove_partial_saves(self) -> None:
        for path in glob.glob(os.path.join(self.directory, f"*{_TMP_MARKER}*")):
            shutil.rmtree(path, ignore_errors=True)

    def _fail(self, error: BaseException) -> None:
        """Turns a failed save into one clear error when it is a lack of space; re-raises anything else."""
        step, nbytes = self._pending or (-1, 0)
        self._pending = None
        if not _is_no_space(error):
            raise error
        try:
            self._manager.close()
        except Exception:  # noqa: BLE001 - the manager may hold the same failure; the message below says it
            pass
        self._remove_partial_saves()
        self._manager = self._open()
        free = shutil.disk_usage(self.directory).free
        raise CheckpointWriteError(self._no_space_message(step, int(nbytes * 1.05) + 2**20, free)) from None

    def wait(self) -> None:
        """Blocks until pending saves are on disk (a save that failed raises here)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - see _fail
            self._fail(e)
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()
