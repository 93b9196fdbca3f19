"""JAX's persistent compilation cache for a block of test code: runs that build the same program (the same
train step in several ``train_diffusion`` calls, a step compiled again for another run) compile it once."""

import contextlib

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache


@contextlib.contextmanager
def compilation_cache(path: str):
    """The persistent compilation cache in ``path`` for the duration of the block (settings restored after)."""
    old_dir = jax.config.jax_compilation_cache_dir
    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax_compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", old_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
        jax_compilation_cache.reset_cache()
