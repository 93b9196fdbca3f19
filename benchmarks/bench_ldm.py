"""Stage-2 throughput: the latent-diffusion train step on synthetic latents, and sampling (DDIM, DPM-Solver++)
including the first-stage decode.

    python benchmarks/bench_ldm.py --config=configs/celebahq_f4.py --batch_size=48 --dtype=bfloat16 \
        --peak_tflops=800                      # the real LDM-4 UNet (274M params); an accelerator job
    python benchmarks/bench_ldm.py --small     # a small UNet and first stage that run on a laptop CPU

Training: ``DiffusionTrainer.train_step`` exactly as ``train.py`` compiles it (``compile_step``: batch split over
all devices on the ``"data"`` mesh, state replicated and donated, compiled ahead of time), fed synthetic encodings
(VQ: ``{"latent"}``, KL: ``{"mean", "logvar"}``, plus labels for class-conditional configs) the way the latent
cache feeds it, so no first-stage encode is timed and no data or TensorFlow is needed. Model-FLOP utilisation
is ``flops_per_image * images/s / peak``: ``--flops_per_image`` defaults to 576e9 (3 x 192 GFLOP forward, counted
with torch's FlopCounterMode) when the UNet and latent shape are the celebahq_f4 ones, and otherwise to XLA's
cost analysis of the compiled step (which also counts AdamW and EMA, a small share).

Sampling: ``LatentDiffusion.generate`` with the EMA params and a randomly initialised first stage of the config's
architecture (float32, as ``load_first_stage`` builds it; the UNet runs in ``--dtype``), for each entry of
``--samplers`` (``name:steps``; DDIM/PLMS step counts must divide T). The first call compiles; the next
``--sample_repeats`` calls are timed (median); images/s counts decoded images, image-steps/s = steps x images / s
(with guidance != 1 each image-step runs the UNet on two rows). ``generate`` splits each sampling batch over all
local devices (compare ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` with 1 on a CPU).

``--small`` shrinks data (64 px, latents 16x16x3), first stage (ch 64) and UNet (64 ch, mult 1,2,2, one res
block, attention at 8x8 and 4x4) unless a ``--config.*`` override names the same field; any config field can be
overridden, e.g. ``--config.diffusion.model.model_channels=128``.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import base  # noqa: E402
from lidiff import parallel  # noqa: E402
from lidiff.train import builders  # noqa: E402
from lidiff.train.common import compile_step  # noqa: E402
from lidiff.train.diffusion import DiffusionTrainer  # noqa: E402
from lidiff.ldm import FirstStage  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(ROOT / "configs" / "celebahq_f4.py"), "A config with autoencoder and diffusion sections.",
    lock_config=True)
_SMALL = flags.DEFINE_bool("small", False, "Small data/first stage/UNet preset that runs on a CPU in minutes.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global train batch (default: the config's, 8 with --small).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps after compilation.")
_FLOPS = flags.DEFINE_float("flops_per_image", None, "Train FLOPs per image for MFU (default: see module doc).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (0: MFU not reported).")
_SAMPLERS = flags.DEFINE_list("samplers", ["ddim:200", "dpm_solver++:20"], "name:steps to time ('' for none).")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", None, "Images per sampling call (default 8, 4 with --small).")
_SAMPLE_REPEATS = flags.DEFINE_integer("sample_repeats", 1, "Timed sampling calls per sampler after the first.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for params and synthetic latents.")

SMALL_PRESET = {
    "data.resolution": 64,
    "autoencoder.model.resolution": 64,
    "autoencoder.model.ch": 64,
    "diffusion.model.model_channels": 64,
    "diffusion.model.channel_mult": (1, 2, 2),
    "diffusion.model.num_res_blocks": 1,
    "diffusion.model.attention_resolutions": (2, 4),
    "diffusion.model.num_head_channels": 32,
}
REFERENCE_FLOPS_PER_IMAGE = 576e9  # celebahq_f4 UNet, 64x64x3 latents: 3 x 192 GFLOP forward


def apply_small_preset(config) -> None:
    overridden = config_flags.get_override_values(flags.FLAGS["config"])
    for dotted, value in SMALL_PRESET.items():
        if dotted in overridden:
            continue
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value


def peak_memory(compiled) -> tuple[float | None, str]:
    """(bytes, source): the device's measured peak if the backend reports one, else XLA's estimate of the step."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    m = compiled.memory_analysis()
    if m is None:
        return None, "not available"
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return float(total), "XLA memory_analysis of the train step (estimate)"


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def host_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def num_params(tree) -> float:
    return sum(x.size for x in jax.tree.leaves(tree)) / 1e6


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n### {title}\n\n| | |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")


def synthetic_batch(rng: np.random.Generator, kind: str, batch_size: int, latent_shape, num_classes: int) -> dict:
    """What the latent cache would feed: unscaled encodings [B, h, w, c] float32 (+ labels [B] int32)."""
    shape = (batch_size,) + tuple(latent_shape)
    if kind == "vq":
        batch = {"mean": rng.normal(size=shape).astype(np.float32)}  # a point posterior (lidiff.ldm)
    else:
        batch = {"mean": rng.normal(size=shape).astype(np.float32), "logvar": np.full(shape, -4.0, np.float32)}
    if num_classes:
        batch["label"] = rng.integers(0, num_classes, batch_size).astype(np.int32)
    return batch


def init_first_stage(first_stage: FirstStage, resolution: int, rng: jax.Array):
    """Random params of the first stage (sampling cost does not depend on their values)."""
    x = jnp.zeros((1, resolution, resolution, 3), jnp.float32)
    if first_stage.kind == "vq":
        return jax.jit(lambda k: first_stage.model.init(k, x)["params"])(rng)
    return jax.jit(lambda k: first_stage.model.init(k, x, sample_posterior=False)["params"])(rng)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if _SMALL.value:
        apply_small_preset(config)
    stage = config.diffusion
    stage.train.batch_size = _BATCH.value or (8 if _SMALL.value else stage.train.batch_size)
    if _DTYPE.value:
        stage.train.dtype = _DTYPE.value
    batch_size = stage.train.batch_size
    sample_batch = _SAMPLE_BATCH.value or (4 if _SMALL.value else 8)
    resolution = config.data.resolution

    mesh = parallel.make_mesh()
    parallel.check_batch_size(batch_size, mesh)
    rep = parallel.replicated(mesh)
    ae = config.autoencoder.model
    first_stage = FirstStage(model=builders.build_autoencoder(ae, jnp.float32), kind=ae.kind)
    trainer = DiffusionTrainer(stage, first_stage, config.seed)
    latent_shape = trainer.latent_shape(resolution)
    num_classes = stage.conditioning.num_classes if trainer.conditional else 0
    k_state, k_fs, k_sample = jax.random.split(jax.random.PRNGKey(_SEED.value), 3)
    init = jax.jit(trainer.init_state, static_argnums=(2,), out_shardings=rep)
    state = init(k_state, jnp.float32(stage.first_stage.scale_factor), latent_shape)
    host_batch = synthetic_batch(np.random.default_rng(_SEED.value), ae.kind, batch_size, latent_shape, num_classes)
    batch = parallel.global_batch(host_batch, mesh)

    # ---- training
    step_fn, compile_s = compile_step(trainer.train_step, mesh, state, batch, {}, name="diffusion")
    metrics = {}
    for _ in range(_WARMUP.value):
        state, metrics = step_fn(state, batch, {})
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch, {})
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    times = np.asarray(times)
    images_per_s = batch_size / times.mean()
    memory, memory_source = peak_memory(step_fn)
    counted = xla_flops(step_fn)
    counted_per_image = counted / batch_size if counted else None
    same = lambda d: {k: v for k, v in d.items() if k not in ("attention_kernel", "remat")}  # noqa: E731
    is_reference = same(stage.model.to_dict()) == same(base.ldm_f4_unet().to_dict()) and latent_shape == (64, 64, 3)
    if _FLOPS.value:
        fpi, fpi_source = _FLOPS.value, "--flops_per_image"
    elif is_reference:
        fpi, fpi_source = REFERENCE_FLOPS_PER_IMAGE, "celebahq_f4 reference count"
    else:
        fpi, fpi_source = counted_per_image, "XLA cost analysis"

    m = stage.model
    dev = jax.devices()[0]
    achieved = fpi * images_per_s / 1e12 if fpi else None
    rows = [
        ("config", config_flags.get_config_filename(flags.FLAGS["config"]) + (" --small" if _SMALL.value else "")),
        ("devices", f"{jax.device_count()} x {dev.device_kind} ({dev.platform})"),
        ("host load average (1 min)", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"),
        ("UNet", f"{m.model_channels} ch, mult {tuple(m.channel_mult)}, {m.num_res_blocks} res blocks, attention at "
                 f"ds {tuple(m.attention_resolutions)}, {num_params(state.params['unet']):.2f}M params"
                 + (f", {num_classes} classes" if num_classes else "")),
        ("latents", f"{batch_size} x {'x'.join(map(str, latent_shape))} ({ae.kind} first stage, f="
                    f"{first_stage.downsample_factor}), dtype {stage.train.dtype}"),
        ("compile time (s)", f"{compile_s:.1f}"),
        ("step time mean / median (ms)", f"{1e3 * times.mean():.1f} / {1e3 * np.median(times):.1f} "
                                         f"(min {1e3 * times.min():.1f}, {len(times)} steps)"),
        ("throughput (images/s)", f"{images_per_s:.2f}"),
        ("peak memory (GiB)", "n/a" if memory is None else f"{memory / 2**30:.2f} ({memory_source})"),
        ("host peak RSS of this process (GiB)", f"{host_rss_gib():.2f}"),
        ("XLA-counted FLOPs per image (train step)", "n/a" if counted_per_image is None else
         f"{counted_per_image / 1e9:.1f} GFLOP"),
        ("FLOPs per image used for MFU", "n/a" if not fpi else f"{fpi / 1e9:.1f} GFLOP ({fpi_source})"),
        ("achieved TFLOP/s", "n/a" if achieved is None else f"{achieved:.3f}"),
        ("MFU", f"{100 * achieved / _PEAK.value:.1f}% of {_PEAK.value:g} TFLOP/s" if achieved and _PEAK.value > 0
         else "n/a (pass --peak_tflops)"),
        ("last loss", f"{float(metrics['loss']):.4g}"),
    ]
    print_table("latent diffusion train step", rows)

    # ---- sampling
    specs = [s for s in _SAMPLERS.value if s]
    if not specs:
        return
    fs_params = init_first_stage(first_stage, resolution, k_fs)
    inputs = {"label": np.arange(sample_batch) % num_classes} if num_classes else {}
    s = stage.sample
    rows = [("images per call", f"{sample_batch} x {resolution}x{resolution}x3 (UNet {stage.train.dtype}, "
                                f"decode float32, guidance {s.guidance_scale:g})")]
    for spec in specs:
        name, steps = spec.rsplit(":", 1)
        run = lambda: trainer.ldm.generate(  # noqa: E731  (returns a host array, so it is synchronous)
            state.ema_params, fs_params, state.scale_factor, k_sample, num=sample_batch, latent_shape=latent_shape,
            inputs=inputs, sampler=name, steps=int(steps), eta=0.0, guidance_scale=s.guidance_scale)
        images, first, t = time_calls(run, _SAMPLE_REPEATS.value)
        finite = bool(np.isfinite(images).all())
        rows.append((f"{name} {steps} steps + decode",
                     f"{sample_batch / t:.3f} images/s ({t:.2f} s per call, {int(steps) * sample_batch / t:.1f} "
                     f"image-steps/s; first call incl. compile {first:.1f} s; finite: {finite})"))
    print_table("sampling (LatentDiffusion.generate)", rows)


def time_calls(run, repeats: int):
    """``run()`` once (compiling), then ``repeats`` more times -> (first result, first call's seconds, median
    seconds of the repeats, or the first call's when ``repeats`` is 0). ``run`` must block until done."""
    start = time.perf_counter()
    result = run()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return result, first, float(np.median(times)) if times else first


if __name__ == "__main__":
    app.run(main)
