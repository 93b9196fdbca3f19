"""The shared training loop (``lidiff.train.loop.train_loop``) with a stand-in step: when it logs, evaluates and
saves, without compiling a model."""

import jax
import jax.numpy as jnp
import numpy as np

from lidiff import parallel
from lidiff.checkpoint import Checkpointer
from lidiff.metrics.writers import MetricWriter, read_metrics
from lidiff.train.loop import LoopSettings, train_loop


class CountingLoader:
    """Batches of ones, ``image`` [2, 4, 4, 3]; records the steps it was asked for."""

    num_skipped = 0

    def iterate(self, start_step=0):
        step = start_step
        while True:
            yield step, {"image": np.ones((2, 4, 4, 3), np.float32)}
            step += 1

    def close(self):
        pass


@jax.jit
def step_fn(state, batch):
    new = {"step": state["step"] + 1, "w": state["w"] + jnp.mean(batch["image"])}
    return new, {"loss": jnp.mean(new["w"]), "grad_norm": jnp.float32(1.0)}


def test_loop_evaluates_every_k_steps_and_logs_with_the_scalars(tmp_path):
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = {"step": jnp.int32(0), "w": jnp.zeros((3,), jnp.float32)}
    calls = []

    def evaluate(state, step):
        calls.append((step, int(state["step"])))
        return {"eval/fid": float(step) / 10, "eval/seconds": 0.5}

    settings = LoopSettings(name="test", num_steps=5, batch_size=2, log_every=1, checkpoint_every=5, eval_every=2)
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    writer = MetricWriter(str(tmp_path))
    final = train_loop(settings, state, 0, step_fn, (), CountingLoader(), mesh, checkpointer, {}, writer,
                       eval_fn=evaluate)
    writer.close()
    checkpointer.close()
    assert int(final["step"]) == 5
    assert calls == [(2, 2), (4, 4), (5, 5)]  # every 2 steps and at the end, on the state after that step
    rows = read_metrics(str(tmp_path))
    evaluated = [(r["step"], r["eval/fid"]) for r in rows if "eval/fid" in r]
    assert evaluated == [(2, 0.2), (4, 0.4), (5, 0.5)]
    assert all("loss" in r for r in rows if "eval/fid" not in r)
