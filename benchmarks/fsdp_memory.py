"""Per-device memory of a stage-2 train step, replicated vs fsdp-sharded, from XLA's own ``memory_analysis``.

    python benchmarks/fsdp_memory.py --config=configs/txt2img_f8.py --devices=8 --fsdp=1,8 --batch=8

Compiles (never runs) ``DiffusionTrainer.train_step`` exactly as train.py does (``compile_step`` on a
``("data", "fsdp")`` mesh of ``--devices`` forced host CPU devices, the state sharded by
``parallel.state_shardings``) for each ``--fsdp`` value, fed cached encodings and the encoder's raw inputs, and
prints per device: the train state as sharded (params + EMA + optimizer state, counted from the shardings), and
the compiled step's argument, output and temporary bytes. Nothing is allocated: the state is abstract
(``jax.eval_shape``), so a 1.45B model is measured on any machine. Temporaries are the CPU backend's schedule; a
GPU/TPU compile differs, the state and argument bytes do not.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/txt2img_f8.py", help="an experiment config file with a diffusion stage")
    p.add_argument("--devices", type=int, default=8, help="forced host CPU devices")
    p.add_argument("--fsdp", default="1,8", help="comma list of config.parallel.fsdp values")
    p.add_argument("--batch", type=int, default=8, help="global batch (one row per device by default)")
    p.add_argument("--resolution", type=int, default=0, help="image side (0 = the config's)")
    p.add_argument("--small", action="store_true", help="a tiny UNet and text encoder: a dry run of this script")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from lidiff import parallel
    from lidiff.eval.sources import load_config
    from lidiff.ldm import FirstStage
    from lidiff.train import builders
    from lidiff.train.common import compile_step
    from lidiff.train.diffusion import DiffusionTrainer

    config = load_config(args.config)
    stage = config.diffusion
    if args.small:
        stage.model.update(dict(model_channels=32, channel_mult=(1, 2), context_dim=64, remat=False))
        stage.conditioning.update(dict(embed_dim=64, n_layer=1, vocab_size=min(stage.conditioning.vocab_size, 1000)))
        config.autoencoder.model.update(dict(ch=32, num_res_blocks=1))
    resolution = args.resolution or (64 if args.small else config.data.resolution)
    ae = config.autoencoder.model
    first_stage = FirstStage(model=builders.build_autoencoder(ae, jnp.float32), kind=ae.kind)
    tokenizer = None
    if stage.conditioning.kind == "text":  # only the null tokens come from it; the vocabulary size is the config's
        import tempfile

        from lidiff.data.text import build_wordpiece_tokenizer

        tokenizer = build_wordpiece_tokenizer(["a photo of a cat"], tempfile.mkdtemp(), vocab_size=100)
    trainer = DiffusionTrainer(stage, first_stage, config.seed, tokenizer)
    latent_shape = trainer.latent_shape(resolution)
    init = lambda key, scale: trainer.init_state(key, scale, latent_shape)  # noqa: E731
    state = jax.eval_shape(init, jax.random.PRNGKey(0), jnp.float32(1.0))
    fs_params = jax.eval_shape(lambda: first_stage.model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, resolution, resolution, 3)), sample_posterior=False)["params"])
    rows = {"mean": ((args.batch,) + latent_shape, np.float32), "logvar": ((args.batch,) + latent_shape, np.float32)}
    for name, (shape, dtype) in trainer.ldm.conditioner.input_specs.items():
        rows[name] = ((args.batch,) + tuple(shape), dtype)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in rows.items()}
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"command: {' '.join([sys.executable] + sys.argv)}")
    print(f"{args.config}{' --small' if args.small else ''}: {n_params / 1e6:.1f}M trained params, latents "
          f"{latent_shape}, global batch {args.batch}, {args.devices} CPU devices, jax {jax.__version__}")
    print()
    print("| fsdp | mesh (data x fsdp) | state GiB/device | args GiB | outputs GiB | temps GiB | compile s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for fsdp in [int(f) for f in args.fsdp.split(",")]:
        mesh = parallel.make_mesh(fsdp=fsdp)
        shardings = parallel.state_shardings(state, mesh)
        per_device = sum(np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                         for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
        start = time.perf_counter()
        compiled, _ = compile_step(trainer.train_step, mesh, state, batch, fs_params, name=f"fsdp={fsdp}")
        seconds = time.perf_counter() - start
        m = compiled.memory_analysis()
        gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        print(f"| {fsdp} | {mesh.shape['data']} x {mesh.shape['fsdp']} | {gib(per_device)} | "
              f"{gib(m.argument_size_in_bytes)} | {gib(m.output_size_in_bytes)} | {gib(m.temp_size_in_bytes)} | "
              f"{seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
