"""Test-wide setup: 8 host CPU devices so sharded code paths run on any machine."""

import os

# XLA's CPU backend at optimisation level 1 without its expensive LLVM passes: the suite's programs are tiny and
# compiled once, so compile time dominates (measured ~10-15% less wall time); results are the same computation.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1 "
                                   "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The files that train or launch processes, longest first. Run first, they let `-n 2 --dist=loadfile` fill the
# tail of the run with the many short files instead of ending on one long file.
SLOW_FIRST = ("test_digit_demos.py", "test_multiprocess.py", "test_gpu_suite.py", "test_spatial_modes.py",
              "test_conditioning_modes.py", "test_autoencoder_trainer.py", "test_diffusion_trainer.py",
              "test_finetune_import.py", "test_export.py", "test_sd_pipeline.py", "test_clip_conditioning.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the order within a rank stays
