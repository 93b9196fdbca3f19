"""The same small UNet in lidiff (jax.jit) and in diffusers (PyTorch): forward and forward+backward time per step.

    python benchmarks/bench_unet_vs_torch.py                       # both variants, batch 8, 32x32x4 latents
    python benchmarks/bench_unet_vs_torch.py --variants=plain --steps=20 --threads=16

Two variants of one architecture (64 channels, mult 1,2,2, two res blocks per level, attention at downsampling
factor 2 and in the middle block, 32 channels per head):

- ``plain``: self-attention blocks; diffusers ``UNet2DModel``.
- ``cross``: spatial transformers with cross-attention to a context [B, L, D]; diffusers ``UNet2DConditionModel``.

The diffusers model gets random weights (every parameter, zero-initialised ones included), lidiff gets the same
weights through ``lidiff.convert.diffusers_unet.unet_params_from_diffusers``, and the outputs are compared
before timing (relative error ||jax - torch|| / ||torch||), so both sides provably run the same network.

Timed: forward (PyTorch under ``inference_mode``) and forward + backward of a mean-squared-error loss with
respect to all parameters (no optimizer), float32. JAX functions are compiled ahead of time (compile time
reported separately) and waited for with ``jax.block_until_ready``; each side runs ``--warmup`` untimed calls,
then ``--steps`` timed ones, and the median is reported. ``torch.set_num_threads(--threads)`` defaults to the
number of cores, which XLA's CPU backend also uses. ``--torch_device=cuda`` times PyTorch on a GPU instead.

On a shared, oversubscribed CPU PyTorch's OpenMP threads spin-wait and its times balloon (4-20x measured);
run with ``OMP_WAIT_POLICY=PASSIVE`` (read when torch loads) or pin both sides to one core
(``taskset -c 0 ... --threads=1``) for a fair comparison there; see benchmarks/README.md.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: make ``lidiff`` importable
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402

from lidiff.convert.diffusers_unet import unet_params_from_diffusers  # noqa: E402
from lidiff.models.unet import UNetModel  # noqa: E402

_VARIANTS = flags.DEFINE_list("variants", ["plain", "cross"], "Which of plain, cross to run.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch.")
_SIZE = flags.DEFINE_integer("latent_size", 32, "Latent height = width.")
_CHANNELS = flags.DEFINE_integer("latent_channels", 4, "Latent channels.")
_CONTEXT = flags.DEFINE_list("context", ["77", "512"], "Cross-attention context length, width.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls per measurement.")
_THREADS = flags.DEFINE_integer("threads", os.cpu_count(), "torch.set_num_threads.")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cpu", "cpu | cuda.")

WIDTH, MULT, BLOCKS, HEAD_CHANNELS = 64, (1, 2, 2), 2, 32
# diffusers settings that reproduce CompVis/lidiff numerics (see lidiff/convert/diffusers_unet.py).
DIFFUSERS_COMMON = dict(flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, norm_num_groups=32, downsample_padding=1,
                        act_fn="silu", center_input_sample=False, layers_per_block=BLOCKS,
                        block_out_channels=tuple(WIDTH * m for m in MULT))


def build(variant: str, channels: int, size: int, context_dim: int):
    """-> (diffusers model, lidiff UNetModel) of one architecture; attention at level 1 (ds 2) and the middle."""
    common = dict(in_channels=channels, out_channels=channels, model_channels=WIDTH, channel_mult=MULT,
                  num_res_blocks=BLOCKS, attention_resolutions=(2,), num_head_channels=HEAD_CHANNELS)
    if variant == "plain":
        ref = UNet2DModel(**DIFFUSERS_COMMON, sample_size=size, in_channels=channels, out_channels=channels,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=HEAD_CHANNELS)
        return ref, UNetModel(**common)
    if variant == "cross":
        heads = tuple(WIDTH * m // HEAD_CHANNELS for m in MULT)  # diffusers: attention_head_dim = number of heads
        ref = UNet2DConditionModel(**DIFFUSERS_COMMON, sample_size=size, in_channels=channels, out_channels=channels,
                                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                   attention_head_dim=heads, cross_attention_dim=context_dim,
                                   use_linear_projection=False)
        return ref, UNetModel(**common, use_spatial_transformer=True, context_dim=context_dim)
    raise ValueError(f"unknown variant {variant!r}; choose plain or cross")


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (zero-initialised output convs and biases too); norm scales around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + offset)
    return module.eval()


def median_seconds(fn, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench(variant: str) -> dict:
    b, size, c = _BATCH.value, _SIZE.value, _CHANNELS.value
    ctx_len, ctx_dim = (int(v) for v in _CONTEXT.value)
    ref, model = build(variant, c, size, ctx_dim)
    ref = randomize(ref, seed=0)
    params = jax.device_put(unet_params_from_diffusers(ref.state_dict(), model))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, size, size, c)).astype(np.float32)
    t = rng.integers(0, 1000, b).astype(np.int32)
    target = rng.normal(size=x.shape).astype(np.float32)
    ctx = rng.normal(size=(b, ctx_len, ctx_dim)).astype(np.float32) if variant == "cross" else None

    dev = torch.device(_TORCH_DEVICE.value)
    ref = ref.to(dev)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)
    tt = torch.from_numpy(t.astype(np.int64)).to(dev)
    ttarget = torch.from_numpy(target.transpose(0, 3, 1, 2).copy()).to(dev)
    kwargs = {"encoder_hidden_states": torch.from_numpy(ctx).to(dev)} if ctx is not None else {}

    def torch_forward():
        with torch.inference_mode():
            return ref(tx, tt, **kwargs).sample

    def torch_forward_backward():
        ref.zero_grad(set_to_none=True)
        loss = torch.mean((ref(tx, tt, **kwargs).sample - ttarget) ** 2)
        loss.backward()
        return loss

    def torch_sync(_):
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def loss_fn(p, x, t, ctx, target):
        return jnp.mean(jnp.square(model.apply({"params": p}, x, t, ctx) - target))

    jx, jt, jtarget = jnp.asarray(x), jnp.asarray(t), jnp.asarray(target)
    jctx = None if ctx is None else jnp.asarray(ctx)
    start = time.perf_counter()
    forward = jax.jit(lambda p, x, t, ctx: model.apply({"params": p}, x, t, ctx)).lower(params, jx, jt, jctx).compile()
    compile_fwd = time.perf_counter() - start
    start = time.perf_counter()
    forward_backward = jax.jit(jax.value_and_grad(loss_fn)).lower(params, jx, jt, jctx, jtarget).compile()
    compile_bwd = time.perf_counter() - start

    got = np.asarray(forward(params, jx, jt, jctx), np.float64)
    want = torch_forward().float().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float64)
    rel_err = float(np.linalg.norm(got - want) / np.linalg.norm(want))

    steps, warmup = _STEPS.value, _WARMUP.value
    out = dict(
        variant=variant, params_m=sum(p.numel() for p in ref.parameters()) / 1e6, rel_err=rel_err,
        compile_s=(compile_fwd, compile_bwd),
        jax_fwd=median_seconds(lambda: forward(params, jx, jt, jctx), steps, warmup, jax.block_until_ready),
        torch_fwd=median_seconds(torch_forward, steps, warmup, torch_sync),
        jax_fb=median_seconds(lambda: forward_backward(params, jx, jt, jctx, jtarget), steps, warmup,
                              jax.block_until_ready),
        torch_fb=median_seconds(torch_forward_backward, steps, warmup, torch_sync),
    )
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    torch.set_num_threads(_THREADS.value)
    results = [bench(v) for v in _VARIANTS.value]
    jdev = jax.devices()[0]
    ctx_len, ctx_dim = _CONTEXT.value
    print(f"\n### lidiff (JAX {jax.__version__}, {jdev.device_kind}) vs diffusers (torch {torch.__version__}, "
          f"{_TORCH_DEVICE.value}, {_THREADS.value} threads); batch {_BATCH.value}, latents "
          f"{_SIZE.value}x{_SIZE.value}x{_CHANNELS.value}, float32, cross context {ctx_len}x{ctx_dim}; "
          f"median of {_STEPS.value}; host load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| variant | params (M) | output rel. err | JAX compile fwd / fwd+bwd (s) | forward JAX / torch (ms) "
          "| ratio jax/torch | fwd+bwd JAX / torch (ms) | ratio jax/torch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['params_m']:.2f} | {r['rel_err']:.1e} | {r['compile_s'][0]:.1f} / "
              f"{r['compile_s'][1]:.1f} | {1e3 * r['jax_fwd']:.1f} / {1e3 * r['torch_fwd']:.1f} | "
              f"{r['jax_fwd'] / r['torch_fwd']:.2f} | {1e3 * r['jax_fb']:.1f} / {1e3 * r['torch_fb']:.1f} | "
              f"{r['jax_fb'] / r['torch_fb']:.2f} |")


if __name__ == "__main__":
    app.run(main)
