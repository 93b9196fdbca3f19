"""Checkpoints survive damage, divergence and a full disk (``lidiff.checkpoint.Checkpointer``).

A tiny train state (a flax struct with params, an optimizer-like tree, an empty EMA and scalar fields) is
saved at steps 20, 40, 60 with keep 3, then each fault is injected the way it happens on a real disk.
"""

import errno
import glob
import logging
import os
import shutil

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidiff import checkpoint as ckpt_module
from lidiff.checkpoint import Checkpointer
from lidiff.errors import CheckpointWriteError, ConfigError, MissingInputError, TrainingDiverged


@flax.struct.dataclass
class TinyState:
    step: jax.Array
    params: dict
    opt_state: dict
    ema_params: dict  # {} = EMA off: saved as absent
    scale_factor: jax.Array


def tiny_state(step: int, width: int = 64) -> TinyState:
    value = jnp.float32(step)
    return TinyState(step=jnp.int32(step),
                     params={"dense": {"kernel": jnp.full((width, 8), value), "bias": jnp.arange(8.0) + value}},
                     opt_state={"mu": jnp.full((width, 8), -value)}, ema_params={},
                     scale_factor=jnp.float32(0.5 + step))


@pytest.fixture
def three_steps(tmp_path):
    """A checkpoint directory holding steps 20, 40 and 60 (keep 3)."""
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, keep=3)
    for step in (20, 40, 60):
        ckpt.save(step, tiny_state(step), {"stage": "test"})
    ckpt.close()
    return directory


def restore_latest(directory):
    ckpt = Checkpointer(directory, keep=3)
    try:
        return ckpt.restore(tiny_state(0))
    finally:
        ckpt.close()


def assert_is_state_of(state, step):
    assert int(state.step) == step and float(state.scale_factor) == 0.5 + step
    np.testing.assert_array_equal(state.params["dense"]["kernel"], np.full((64, 8), step, np.float32))
    np.testing.assert_array_equal(state.opt_state["mu"], np.full((64, 8), -step, np.float32))
    assert state.ema_params == {}


def test_round_trip_and_partial_restore(three_steps):
    state, meta = restore_latest(three_steps)
    assert_is_state_of(state, 60)
    assert meta["stage"] == "test" and "opt_state" in meta["items"] and meta["scalars"] == ["scale_factor", "step"]
    ckpt = Checkpointer(three_steps, create=False)
    items, _, step = ckpt.restore_items(names=("params", "scale_factor"))  # no optimizer state read
    ckpt.close()
    assert step == 60 and set(items) == {"params", "scale_factor"} and float(items["scale_factor"]) == 60.5


def _data_files(directory, step):
    return [f for f in glob.glob(os.path.join(directory, str(step), "params", "**", "d", "*"), recursive=True)
            if os.path.isfile(f)]


def test_truncated_array_file_falls_back_to_previous_step(three_steps, caplog):
    files = _data_files(three_steps, 60)
    assert files
    for f in files:  # cut each data file of the newest step's params to half its size
        with open(f, "r+b") as handle:
            handle.truncate(os.path.getsize(f) // 2)
    with caplog.at_level(logging.WARNING):
        state, _ = restore_latest(three_steps)
    assert_is_state_of(state, 40)
    assert os.path.isdir(os.path.join(three_steps, "60.unreadable-0"))  # set aside, not deleted
    assert not os.path.exists(os.path.join(three_steps, "60"))
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint step 60" in warning and "cannot be restored" in warning and "60.unreadable-0" in warning
    # The next save continues from the good history; the damaged copy stays where it was put.
    ckpt = Checkpointer(three_steps, keep=3)
    assert ckpt.all_steps() == [20, 40]
    ckpt.close()


def test_missing_metadata_falls_back_to_previous_step(three_steps, caplog):
    os.remove(os.path.join(three_steps, "60", "params", "_METADATA"))
    with caplog.at_level(logging.WARNING):
        state, _ = restore_latest(three_steps)
    assert_is_state_of(state, 40)
    assert os.path.isdir(os.path.join(three_steps, "60.unreadable-0"))
    assert "_METADATA" in "\n".join(r.getMessage() for r in caplog.records)


def test_no_restorable_step_is_a_clear_error(three_steps):
    for step in (20, 40, 60):
        os.remove(os.path.join(three_steps, str(step), "params", "_METADATA"))
    with pytest.raises(MissingInputError, match="no restorable checkpoint") as info:
        restore_latest(three_steps)
    assert all(f"step {s}" in str(info.value) for s in (20, 40, 60))
    assert sorted(os.listdir(three_steps)) == ["20.unreadable-0", "40.unreadable-0", "60.unreadable-0"]


def test_a_checkpoint_of_another_model_is_refused_not_set_aside(three_steps):
    ckpt = Checkpointer(three_steps, keep=3)
    with pytest.raises(ConfigError, match=r"does not fit the model .*params.*saved \(64, 8\), expected \(32, 8\)"):
        ckpt.restore(tiny_state(0, width=32))
    ckpt.close()
    assert sorted(os.listdir(three_steps)) == ["20", "40", "60"]


def test_non_finite_state_is_never_saved(three_steps):
    ckpt = Checkpointer(three_steps, keep=3)
    bad = tiny_state(80)
    bad = bad.replace(params={"dense": {**bad.params["dense"], "bias": bad.params["dense"]["bias"].at[3].set(jnp.nan)}},
                      opt_state={"mu": bad.opt_state["mu"].at[0, :2].set(jnp.inf)})
    with pytest.raises(TrainingDiverged, match=r"step 80: .*opt_state: 2, params: 1.*latest checkpoint \(step 60\)"):
        ckpt.save(80, bad, {"stage": "test"})
    ckpt.close()
    assert sorted(os.listdir(three_steps)) == ["20", "40", "60"]  # keep-3 rotated nothing out


def test_non_finite_host_state_is_never_saved(three_steps):
    """The same refusal for a state of numpy arrays (an imported checkpoint), counted on the host."""
    ckpt = Checkpointer(three_steps, keep=3)
    bad = jax.device_get(tiny_state(80))
    bias = np.array(bad.params["dense"]["bias"])
    bias[[1, 3]] = np.nan
    bad = bad.replace(params={"dense": {**bad.params["dense"], "bias": bias}})
    with pytest.raises(TrainingDiverged, match=r"step 80: .*\(params: 2\)"):
        ckpt.save(80, bad, {"stage": "test"})
    ckpt.close()
    assert sorted(os.listdir(three_steps)) == ["20", "40", "60"]


def test_disk_full_during_save_is_one_message_and_cleans_up(three_steps, monkeypatch):
    ckpt = Checkpointer(three_steps, keep=3)

    def save_that_fills_the_disk(step, args):  # what orbax does when the device fills up mid-write
        os.makedirs(os.path.join(three_steps, f"{step}.orbax-checkpoint-tmp-1234", "params"))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt._manager, "save", save_that_fills_the_disk)
    with pytest.raises(CheckpointWriteError) as info:
        ckpt.save(80, tiny_state(80), {"stage": "test"})
    message = str(info.value)
    assert "cannot save checkpoint step 80" in message and three_steps in message
    assert "not enough disk space (needs about" in message and "latest: step 60" in message
    assert info.value.__cause__ is None and "Traceback" not in message
    ckpt.close()
    assert sorted(os.listdir(three_steps)) == ["20", "40", "60"]  # no temporary directory left
    assert_is_state_of(restore_latest(three_steps)[0], 60)


def test_save_refused_up_front_when_free_space_is_short(three_steps, monkeypatch):
    ckpt = Checkpointer(three_steps, keep=3)
    usage = shutil.disk_usage(three_steps)
    monkeypatch.setattr(ckpt_module.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(CheckpointWriteError, match=r"needs about 1\.\d MiB, 0\.0 MiB free"):
        ckpt.save(80, tiny_state(80), {"stage": "test"})
    monkeypatch.undo()
    ckpt.close()
    assert sorted(os.listdir(three_steps)) == ["20", "40", "60"]


def test_other_save_failures_keep_their_traceback(three_steps, monkeypatch):
    ckpt = Checkpointer(three_steps, keep=3)
    monkeypatch.setattr(ckpt._manager, "save", lambda step, args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        ckpt.save(80, tiny_state(80), {"stage": "test"})
    monkeypatch.undo()
    ckpt.close()
