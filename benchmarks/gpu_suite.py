"""One command, one table: the LDM-4 CelebA-HQ numbers that matter on a single accelerator.

    python benchmarks/gpu_suite.py --peak_tflops=989          # H100/H200 (bf16 dense spec; ~800 measured matmul)
    python benchmarks/gpu_suite.py --small --peak_tflops=1    # CPU dry run (tests/test_gpu_suite.py), ~1-2 min

Rows (synthetic data, no TensorFlow, no weight files):

- ``train <dtype> b<N>``: the stage-2 ``DiffusionTrainer.train_step`` of configs/celebahq_f4.py (274M UNet,
  64x64x3 latents) compiled exactly as train.py does (``lidiff.train.common.compile_step``: ``"data"`` mesh,
  state replicated and donated), fed synthetic cached encodings (``bench_ldm.synthetic_batch``), in bfloat16 and
  float32, at batch ``--batch`` (48, the paper's) and at the largest power of two that fits (``--pow2_start``
  64, 128, ... until RESOURCE_EXHAUSTED, ``--pow2_max`` or ``--probe_budget_s`` seconds of searching per dtype).
  MFU = XLA's own FLOP count of the compiled step (``cost_analysis()``) / mean step time / ``--peak_tflops``.
- ``train bf16 b<N> fsdp``: the same step on a ``("data", "fsdp")`` mesh with ``fsdp=-1`` (every device on the
  fsdp axis, here the one device), built by the sharded path (``init_sharded``, ``parallel.state_shardings``):
  a sanity row that the fsdp machinery costs nothing where there is nothing to shard.
- ``ddim200+decode`` / ``dpm++20+decode``: ``LatentDiffusion.generate`` (EMA params, UNet in bf16, random VQ-f4
  first stage in float32 as ``load_first_stage`` builds it) at ``--sample_batches`` (16, 64); the first call
  compiles, the median of ``--sample_repeats`` further calls is timed; images/s counts decoded images.
- ``vq-f4 stage-1``: ``AutoencoderTrainer.train_step`` of configs/autoencoder_vq_f4.py at 256x256, LPIPS (random
  VGG16/LPIPS params of the real shapes) and discriminator on from step 0, batch ``--ae_batch`` (8, the config's).
- ``torch train bf16``: the same UNet as diffusers ``UNet2DModel`` (PyTorch, eager, AdamW, MSE on noise,
  ``torch.autocast(bfloat16)``, diffusers' default SDPA attention) at batch ``--batch``, reported with the ratio
  torch images/s / lidiff images/s. n/a without torch+diffusers or CUDA; with ``--small`` on a CPU it runs the
  small model in float32 on the CPU instead (so the row cannot rot).

Columns: ``dev peak GiB`` is the device's ``peak_bytes_in_use`` (a process-wide high-water mark, so it only
grows down the table; n/a on CPU), ``XLA GiB`` is ``memory_analysis()`` of that row's compiled step
(args + outputs + temps - donated aliases). A failing row prints ``error: ...`` and the suite goes on.

``--small``: UNet 32 ch (1,2), one res block, attention at ds 2; first stage ch 32, 32x32 images (latents
8x8x3), 64 codes; train batch 2 (the max-pow2 search tries only 2, so those rows and the fsdp row reuse the b2
rows' compiled programs through a persistent compilation cache in a temporary folder); DDIM-10 /
DPM-Solver++-5 at batch 2; stage 1 batch 2 at 32x32.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import pathlib
import shlex
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):  # run as a script from anywhere; reuse bench_ldm's helpers
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

if "--small" in sys.argv[1:] and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # Dry run: compile time dominates (2-3x less with these; read when the backend starts, so set before).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1"
                               " --xla_llvm_disable_expensive_passes=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_ldm  # noqa: E402  (defines absl flags on import; we parse with argparse and never read them)
from lidiff import parallel  # noqa: E402
from lidiff.train import builders  # noqa: E402
from lidiff.train.common import compile_step, init_sharded  # noqa: E402
from lidiff.train.diffusion import DiffusionTrainer  # noqa: E402
from lidiff.ldm import FirstStage  # noqa: E402

COLUMNS = ("row", "batch", "img/s", "step ms", "compile s", "GFLOP/img", "MFU %", "dev peak GiB", "XLA GiB", "note")

# Small preset: applied to both configs (dotted paths; absent ones are skipped).
SMALL = {
    "data.resolution": 32,
    "autoencoder.model.resolution": 32,
    "autoencoder.model.ch": 32,
    "autoencoder.model.num_res_blocks": 1,
    "autoencoder.model.n_embed": 64,
    "autoencoder.train.batch_size": 2,
    "diffusion.model.model_channels": 32,
    "diffusion.model.channel_mult": (1, 2),
    "diffusion.model.num_res_blocks": 1,
    "diffusion.model.attention_resolutions": (2,),
    "diffusion.model.num_head_channels": 32,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny models and batches: a CPU dry run")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak TFLOP/s for MFU (0: no MFU)")
    p.add_argument("--batch", type=int, default=None, help="train batch of the fixed rows (48; 2 with --small)")
    p.add_argument("--pow2_start", type=int, default=None, help="first power of two tried (64; 2 with --small)")
    p.add_argument("--pow2_max", type=int, default=None, help="largest power of two tried (4096; 2 with --small)")
    p.add_argument("--probe_budget_s", type=float, default=90.0,
                   help="seconds per dtype for the largest-power-of-two search; no new size starts after it")
    p.add_argument("--steps", type=int, default=None, help="timed train steps per row (10; 2 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after compile (2; 1 with --small)")
    p.add_argument("--sample_batches", default=None, help="comma list (16,64; 2 with --small)")
    p.add_argument("--samplers", default=None, help="name:steps list (ddim:200,dpm_solver++:20; "
                                                     "ddim:10,dpm_solver++:5 with --small)")
    p.add_argument("--sample_repeats", type=int, default=1, help="timed generate calls after the first")
    p.add_argument("--ae_batch", type=int, default=None, help="stage-1 batch (config's 8; 2 with --small)")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch row")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    small = a.small
    a.batch = a.batch or (2 if small else 48)
    a.pow2_start = a.pow2_start or (2 if small else 64)
    a.pow2_max = a.pow2_max or (2 if small else 4096)
    a.steps = a.steps or (2 if small else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if small else 2)
    a.sample_batches = [int(b) for b in (a.sample_batches or ("2" if small else "16,64")).split(",") if b]
    a.samplers = [s for s in (a.samplers or ("ddim:10,dpm_solver++:5" if small else "ddim:200,dpm_solver++:20"))
                  .split(",") if s]
    return a


def sampler_label(spec: str) -> str:
    name, steps = spec.rsplit(":", 1)
    return f"{'dpm++' if name.startswith('dpm') else name}{steps}+decode"


def row_names(args: argparse.Namespace) -> list[str]:
    """Every row the suite prints, in order (the test checks them)."""
    names = []
    for dt in ("bf16", "fp32"):
        names += [f"train {dt} b{args.batch}", f"train {dt} max-pow2"]
    names.append(f"train bf16 b{args.batch} fsdp")
    names += [f"{sampler_label(s)} b{b}" for s in args.samplers for b in args.sample_batches]
    names += ["vq-f4 stage-1", f"torch train b{args.batch}"]
    return names


def set_dotted(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        if p not in node:
            return
        node = node[p]
    if leaf in node:
        node[leaf] = value


def load_config(name: str, small: bool):
    import importlib
    config = importlib.import_module(f"configs.{name}").get_config()
    if small:
        for k, v in SMALL.items():
            set_dotted(config, k, v)
    return config


def one_device_mesh(fsdp: int = 1):
    """The suite measures one device: a 1-device mesh even where more are visible."""
    return parallel.make_mesh(jax.devices()[:1], fsdp=fsdp)


def is_oom(e: BaseException) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower()


def gib(x) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def device_peak() -> float | None:
    stats = jax.local_devices()[0].memory_stats()
    return float(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def xla_memory(compiled) -> float | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # backend-dependent
        return None
    if m is None:
        return None
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def xla_flops(compiled) -> float | None:
    try:
        f = bench_ldm.xla_flops(compiled)  # handles the list and dict forms
    except Exception:
        return None
    return f if f and math.isfinite(f) and f > 0 else None


def time_steps(step_fn, state, batch, extra, steps: int, warmup: int):
    metrics = {}
    for _ in range(warmup):
        state, metrics = step_fn(state, batch, extra)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch, extra)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return state, jax.device_get(metrics), float(np.mean(times))


def train_row(config, dtype: str, batch_size: int, args, fsdp: int = 1) -> dict:
    """One stage-2 train step measurement, built as train.py builds it (``config.parallel.fsdp = fsdp``)."""
    stage = config.diffusion
    stage.train.batch_size = batch_size
    stage.train.dtype = dtype
    ae = config.autoencoder.model
    mesh = one_device_mesh(fsdp)
    parallel.check_batch_size(batch_size, mesh)
    first_stage = FirstStage(model=builders.build_autoencoder(ae, jnp.float32), kind=ae.kind)
    trainer = DiffusionTrainer(stage, first_stage, config.seed)
    latent_shape = trainer.latent_shape(config.data.resolution)
    num_classes = stage.conditioning.num_classes if trainer.conditional else 0
    init = functools.partial(trainer.init_state, latent_shape=latent_shape)
    state = init_sharded(init, mesh, jax.random.PRNGKey(args.seed), jnp.float32(stage.first_stage.scale_factor))
    host = bench_ldm.synthetic_batch(np.random.default_rng(args.seed), ae.kind, batch_size, latent_shape, num_classes)
    batch = parallel.global_batch(host, mesh)
    step_fn, compile_s = compile_step(trainer.train_step, mesh, state, batch, {}, name="diffusion")
    state, metrics, mean_s = time_steps(step_fn, state, batch, {}, args.steps, args.warmup)
    loss = float(metrics["loss"])
    out = dict(batch=batch_size, ips=batch_size / mean_s, step_s=mean_s, compile_s=compile_s,
               flops=xla_flops(step_fn), xla_mem=xla_memory(step_fn), dev_peak=device_peak(),
               note=f"loss {loss:.3g}", finite=math.isfinite(loss))
    del state, batch, step_fn
    return out


def fill_mfu(r: dict, peak_tflops: float) -> dict:
    if r.get("flops") and r.get("step_s"):
        r["gflop_img"] = r["flops"] / r["batch"] / 1e9
        if peak_tflops > 0:
            r["mfu"] = 100 * r["flops"] / r["step_s"] / (peak_tflops * 1e12)
    return r


def max_pow2_row(dtype: str, args, log) -> dict:
    """Doubling search from --pow2_start; keeps the last size that compiled and ran."""
    best, start, b, why = None, time.perf_counter(), args.pow2_start, f"stopped at --pow2_max={args.pow2_max}"
    while b <= args.pow2_max:
        if best is not None and time.perf_counter() - start > args.probe_budget_s:
            why = f"--probe_budget_s {args.probe_budget_s:g} spent before b{b}"
            break
        try:
            r = train_row(load_config("celebahq_f4", args.small), dtype, b, args)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            why = f"b{b} out of memory"
            log(f"  {dtype} batch {b}: RESOURCE_EXHAUSTED")
            gc.collect()
            break
        log(f"  {dtype} batch {b}: {r['ips']:.2f} img/s")
        best, b = r, b * 2
    if best is None:
        raise RuntimeError(f"batch {args.pow2_start} does not fit ({why})")
    best["note"] += f"; {why}"
    return best


def fsdp_row(args) -> dict:
    r = train_row(load_config("celebahq_f4", args.small), "bfloat16", args.batch, args, fsdp=-1)
    r["note"] += "; fsdp=-1 over 1 device"
    return r


def sample_rows(args) -> list[tuple[str, dict]]:
    config = load_config("celebahq_f4", args.small)
    stage = config.diffusion
    stage.train.dtype = "bfloat16"
    ae = config.autoencoder.model
    first_stage = FirstStage(model=builders.build_autoencoder(ae, jnp.float32), kind=ae.kind)
    trainer = DiffusionTrainer(stage, first_stage, config.seed)
    res = config.data.resolution
    latent_shape = trainer.latent_shape(res)
    k_state, k_fs, k_sample = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    state = jax.jit(trainer.init_state, static_argnums=(2,))(
        k_state, jnp.float32(stage.first_stage.scale_factor), latent_shape)
    fs_params = bench_ldm.init_first_stage(first_stage, res, k_fs)
    num_classes = stage.conditioning.num_classes if trainer.conditional else 0
    mesh = one_device_mesh()
    rows = []
    for spec in args.samplers:
        name, steps = spec.rsplit(":", 1)
        for b in args.sample_batches:
            label = f"{sampler_label(spec)} b{b}"
            try:
                inputs = {"label": np.arange(b) % num_classes} if num_classes else {}
                run = lambda: trainer.ldm.generate(  # noqa: E731  (returns a host array: synchronous)
                    state.ema_params, fs_params, state.scale_factor, k_sample, num=b, latent_shape=latent_shape,
                    inputs=inputs, sampler=name, steps=int(steps), eta=0.0, guidance_scale=stage.sample.guidance_scale,
                    mesh=mesh)
                images, first, t = bench_ldm.time_calls(run, args.sample_repeats)
                finite = bool(np.isfinite(images).all())
                rows.append((label, dict(batch=b, ips=b / t, step_s=t, compile_s=first - t,
                                         dev_peak=device_peak(), finite=finite,
                                         note=f"{res}x{res}x3 images; s/call {t:.2f}; finite {finite}")))
            except Exception as e:  # noqa: BLE001
                rows.append((label, dict(error=f"{type(e).__name__}: {e}")))
    return rows


def autoencoder_row(args) -> dict:
    from lidiff.train.autoencoder import AutoencoderTrainer
    config = load_config("autoencoder_vq_f4", args.small)
    stage = config.autoencoder
    if args.ae_batch:
        stage.train.batch_size = args.ae_batch
    stage.loss.disc_start = 0  # discriminator, adaptive weight and discriminator update in the timed step
    if stage.loss.perceptual_weight <= 0:
        stage.loss.perceptual_weight = 1.0
    b, res = stage.train.batch_size, stage.model.resolution
    mesh = one_device_mesh()
    rep = parallel.replicated(mesh)
    trainer = AutoencoderTrainer(stage, args.seed)
    k_state, k_lpips = jax.random.split(jax.random.PRNGKey(args.seed))
    state = jax.jit(trainer.init_state, out_shardings=rep)(k_state)
    x1 = jnp.zeros((1, 32, 32, 3), jnp.float32)  # random LPIPS params of the real shapes, as bench_autoencoder
    lpips_params = jax.jit(lambda k: trainer.lpips.init(k, x1, x1)["params"], out_shardings=rep)(k_lpips)
    images = np.random.default_rng(args.seed).uniform(-1, 1, (b, res, res, 3)).astype(np.float32)
    batch = parallel.global_batch({"image": images}, mesh)
    step_fn, compile_s = compile_step(trainer.train_step, mesh, state, batch, lpips_params, name="autoencoder")
    state, metrics, mean_s = time_steps(step_fn, state, batch, lpips_params, args.steps, args.warmup)
    loss, disc = float(metrics["loss"]), float(metrics["disc_factor"])
    return dict(batch=b, ips=b / mean_s, step_s=mean_s, compile_s=compile_s, flops=xla_flops(step_fn),
                xla_mem=xla_memory(step_fn), dev_peak=device_peak(), finite=math.isfinite(loss),
                note=f"{res}x{res}, {stage.train.dtype}, LPIPS on, disc factor {disc:g}, loss {loss:.3g}")


def torch_unet(model_cfg, latent_size: int):
    """diffusers UNet2DModel of the lidiff UNet's architecture (plain self-attention UNet)."""
    from diffusers import UNet2DModel
    mult = tuple(model_cfg.channel_mult)
    attn = [2**i in tuple(model_cfg.attention_resolutions) for i in range(len(mult))]
    return UNet2DModel(
        sample_size=latent_size, in_channels=model_cfg.in_channels, out_channels=model_cfg.out_channels,
        block_out_channels=tuple(model_cfg.model_channels * m for m in mult), layers_per_block=model_cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=model_cfg.num_head_channels, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
        norm_num_groups=32, downsample_padding=1, act_fn="silu", center_input_sample=False)


def torch_row(args, results: dict) -> dict:
    if args.no_torch:
        return dict(na="n/a (--no_torch)")
    try:
        import torch
        import diffusers  # noqa: F401
    except ImportError as e:
        return dict(na=f"n/a ({e.name} not importable)")
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        return dict(na="n/a (no CUDA for torch)")
    config = load_config("celebahq_f4", args.small)
    dev = torch.device("cuda" if cuda else "cpu")
    latent = config.data.resolution // 2 ** (len(config.autoencoder.model.ch_mult) - 1)
    model = torch_unet(config.diffusion.model, latent).to(dev).train()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    b, c = args.batch, config.diffusion.model.in_channels
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    x = torch.randn(b, c, latent, latent, device=dev, generator=gen)
    noise = torch.randn(b, c, latent, latent, device=dev, generator=gen)
    t = torch.randint(0, 1000, (b,), device=dev, generator=gen)
    use_bf16 = cuda
    lidiff_ips = results.get(f"train {'bf16' if cuda else 'fp32'} b{b}", {}).get("ips")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = torch.nn.functional.mse_loss(model(x, t).sample.float(), noise)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(max(args.warmup, 1)):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    mean_s = (time.perf_counter() - t0) / args.steps
    ips = b / mean_s
    kind = "bf16" if cuda else "fp32"
    ratio = f"; torch/lidiff {kind} {ips / lidiff_ips:.2f}x" if lidiff_ips else "; torch/lidiff n/a (no lidiff row)"
    mode = "bf16 autocast, SDPA, cuda" if cuda else "fp32, cpu"
    return dict(batch=b, ips=ips, step_s=mean_s, finite=math.isfinite(float(loss.detach())),
                dev_peak=float(torch.cuda.max_memory_allocated()) if cuda else None,
                note=f"torch {torch.__version__} {mode}, {params_m:.2f}M params, eager{ratio}")


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render(rows: list[tuple[str, dict]]) -> str:
    table = [COLUMNS]
    for name, r in rows:
        if "error" in r:
            table.append((name,) + ("",) * 8 + ("error: " + r["error"].splitlines()[0][:160],))
        elif "na" in r:
            table.append((name,) + ("n/a",) * 8 + (r["na"],))
        else:
            step_ms = 1e3 * r["step_s"] if r.get("step_s") else None
            table.append((name, str(r["batch"]), fmt(r.get("ips"), ".2f"), fmt(step_ms, ".1f"),
                          fmt(r.get("compile_s"), ".1f"), fmt(r.get("gflop_img"), ".1f"), fmt(r.get("mfu"), ".1f"),
                          gib(r.get("dev_peak")), gib(r.get("xla_mem")), r.get("note", "")))
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(table[0]), rule] + [line(r) for r in table[1:]])


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.small:
        return run_suite(args)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lidiff_gpu_suite_cache_") as cache:
        # rows that build the same program (max-pow2 and fsdp at batch 2) compile it once
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        return run_suite(args)


def run_suite(args: argparse.Namespace) -> int:
    suite_start = time.perf_counter()
    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - suite_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    names = row_names(args)
    results: dict[str, dict] = {}

    def attempt(name: str, fn):
        log(f"{name} ...")
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001  (one row's failure must not stop the suite)
            traceback.print_exc(file=sys.stderr)
            results[name] = dict(error=f"{type(e).__name__}: {e}")
        gc.collect()

    b = args.batch
    for dt, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        attempt(f"train {dt} b{b}", lambda: train_row(load_config("celebahq_f4", args.small), dtype, b, args))
    for dt, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        attempt(f"train {dt} max-pow2", lambda: max_pow2_row(dtype, args, log))
    attempt(f"train bf16 b{b} fsdp", lambda: fsdp_row(args))
    log("sampling ...")
    try:
        results.update(dict(sample_rows(args)))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        for n in names:
            if "+decode" in n:
                results[n] = dict(error=f"{type(e).__name__}: {e}")
    gc.collect()
    attempt("vq-f4 stage-1", lambda: autoencoder_row(args))
    attempt(names[-1], lambda: torch_row(args, results))

    rows = [(n, fill_mfu(results.get(n, dict(error="not run")), args.peak_tflops)) for n in names]
    dev = jax.devices()[0]
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"jax {jax.__version__}; 1 of {jax.device_count()} x {dev.device_kind} ({dev.platform}); peak "
          f"{args.peak_tflops:g} TFLOP/s; suite wall {time.perf_counter() - suite_start:.0f} s"
          + ("; --small (tiny models: a dry run, not a measurement)" if args.small else ""))
    print()
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
