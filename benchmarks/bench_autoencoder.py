"""Stage-1 training throughput: the full AutoencoderTrainer step (autoencoder + LPIPS + PatchGAN) on synthetic images.

    python benchmarks/bench_autoencoder.py --config=configs/autoencoder_vq_f4.py --batch_size=8 --steps=20
    python benchmarks/bench_autoencoder.py --config=configs/autoencoder_kl_f8.py --dtype=bfloat16 --no_lpips

Any stage-1 config works (any file with an ``autoencoder`` section), and any config field can be overridden,
e.g. ``--config.autoencoder.model.ch=64``. What is timed is exactly the step ``train.py`` runs: the trainer's
``train_step`` jitted by ``lidiff.train.common.compile_step`` (batch split over all devices of a 1-D ``"data"``
mesh, state replicated and donated), compiled ahead of time, then called ``--steps`` times after ``--warmup``
calls, each call waited for with ``jax.block_until_ready``.

Defaults that make the measured step the expensive one:
- the discriminator is active from step 0 (``disc_start=0``, override with ``--disc_start``), so the adaptive
  weight (two extra gradients at the decoder's last conv) and the discriminator update are included;
- LPIPS runs with random VGG16/LPIPS params of the real shapes (no weight files needed; the cost is the same),
  turned on even if the config has ``perceptual_weight=0``; ``--no_lpips`` turns it off.

Images are uniform noise in [-1, 1]; no dataset and no TensorFlow are needed. The numbers are printed as a
markdown table. Peak memory is the device's ``peak_bytes_in_use`` where the backend reports it (GPU/TPU), else
XLA's static estimate for the compiled step (arguments + temporaries + outputs - donated aliases).
"""

from __future__ import annotations

import os
import pathlib
import resource
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: make ``lidiff`` and ``configs`` importable
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lidiff import parallel  # noqa: E402
from lidiff.train.autoencoder import AutoencoderTrainer  # noqa: E402
from lidiff.train.common import compile_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(ROOT / "configs" / "autoencoder_vq_f4.py"), "Any config with an autoencoder section.",
    lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's autoencoder.train.batch_size).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the config's).")
_RES = flags.DEFINE_integer("resolution", None, "Image side in pixels (default: the config's model.resolution).")
_NO_LPIPS = flags.DEFINE_bool("no_lpips", False, "Leave the LPIPS perceptual loss out of the step.")
_DISC_START = flags.DEFINE_integer("disc_start", 0, "Step at which the discriminator switches on (0: timed).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for params and synthetic images.")


def peak_memory(compiled) -> tuple[float | None, str]:
    """(bytes, source): the device's measured peak if the backend reports one, else XLA's estimate of the step."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    m = compiled.memory_analysis()
    if m is None:
        return None, "not available"
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return float(total), "XLA memory_analysis of the step (estimate)"


def host_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def num_params(tree) -> float:
    return sum(x.size for x in jax.tree.leaves(tree)) / 1e6


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n### {title}\n\n| | |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    stage = config.autoencoder
    if _BATCH.value:
        stage.train.batch_size = _BATCH.value
    if _DTYPE.value:
        stage.train.dtype = _DTYPE.value
    if _RES.value:
        stage.model.resolution = _RES.value
    stage.loss.disc_start = _DISC_START.value
    if _NO_LPIPS.value:
        stage.loss.perceptual_weight = 0.0
    elif stage.loss.perceptual_weight <= 0:
        stage.loss.perceptual_weight = 1.0
    batch_size, res = stage.train.batch_size, stage.model.resolution

    mesh = parallel.make_mesh()
    parallel.check_batch_size(batch_size, mesh)
    rep = parallel.replicated(mesh)
    trainer = AutoencoderTrainer(stage, _SEED.value)
    k_state, k_lpips = jax.random.split(jax.random.PRNGKey(_SEED.value))
    state = jax.jit(trainer.init_state, out_shardings=rep)(k_state)
    lpips_params = {}
    if stage.loss.perceptual_weight > 0:  # random weights of the real shapes: same cost as the released ones
        x1 = jax.numpy.zeros((1, 32, 32, 3), jax.numpy.float32)
        lpips_params = jax.jit(lambda k: trainer.lpips.init(k, x1, x1)["params"], out_shardings=rep)(k_lpips)
    images = np.random.default_rng(_SEED.value).uniform(-1, 1, (batch_size, res, res, 3)).astype(np.float32)
    batch = parallel.global_batch({"image": images}, mesh)

    step_fn, compile_s = compile_step(trainer.train_step, mesh, state, batch, lpips_params, name="autoencoder")
    metrics = {}
    for _ in range(_WARMUP.value):
        state, metrics = step_fn(state, batch, lpips_params)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch, lpips_params)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    times = np.asarray(times)
    metrics = jax.device_get(metrics)
    memory, memory_source = peak_memory(step_fn)

    m = stage.model
    dev = jax.devices()[0]
    rows = [
        ("config", config_flags.get_config_filename(flags.FLAGS["config"])),
        ("devices", f"{jax.device_count()} x {dev.device_kind} ({dev.platform})"),
        ("host load average (1 min)", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"),
        ("model", f"{m.kind}, ch {m.ch}, ch_mult {tuple(m.ch_mult)}, {m.num_res_blocks} res blocks, "
                  f"z {m.z_channels}" + (f", {m.n_embed} codes" if m.kind == "vq" else "")),
        ("params (M)", f"autoencoder {num_params(state.params['autoencoder']):.2f}, "
                       f"discriminator {num_params(state.disc_params):.2f}, LPIPS {num_params(lpips_params):.2f}"),
        ("images", f"{batch_size} x {res}x{res}x3, dtype {stage.train.dtype}"),
        ("losses in the step", "rec (" + stage.loss.reconstruction + ")"
         + (" + LPIPS" if stage.loss.perceptual_weight > 0 else "") + (" + KL" if m.kind == "kl" else " + codebook")
         + (" + GAN (adaptive weight) + discriminator update" if float(metrics["disc_factor"]) > 0 else
            " (discriminator off)")),
        ("compile time (s)", f"{compile_s:.1f}"),
        ("step time mean / median (ms)", f"{1e3 * times.mean():.1f} / {1e3 * np.median(times):.1f} "
                                         f"(min {1e3 * times.min():.1f}, {len(times)} steps)"),
        ("throughput (images/s)", f"{batch_size / times.mean():.2f}"),
        ("peak memory (GiB)", "n/a" if memory is None else f"{memory / 2**30:.2f} ({memory_source})"),
        ("host peak RSS of this process (GiB)", f"{host_rss_gib():.2f}"),
        ("last loss / d_loss", f"{float(metrics['loss']):.4g} / {float(metrics['d_loss']):.4g}"),
    ]
    print_table("autoencoder train step", rows)


if __name__ == "__main__":
    app.run(main)
