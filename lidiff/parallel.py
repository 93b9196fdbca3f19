"""Device mesh, shardings, and putting host batches onto devices.

lidiff trains data-parallel over a 1-D mesh with axis ``"data"`` covering every device of every process:
the batch is split on ``"data"``; params, optimizer state and EMA are replicated. Multi-host runs call
``jax.distributed.initialize()`` (see ``initialize_distributed``) before anything touches a device; each
process then loads only its share of the global batch and ``global_batch`` assembles the global array.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lidiff.errors import ConfigError

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Starts JAX's distributed runtime when the environment describes a multi-process job.

    On TPU pods and SLURM/Kubernetes GPU clusters JAX finds the coordinator by itself; elsewhere set
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (each
    process its own, 0 .. N-1), which are passed on explicitly (JAX itself reads only the first). On CPU the
    processes talk through gloo collectives. Single-process runs do nothing.
    """
    import os

    env = os.environ
    if not (env.get("JAX_COORDINATOR_ADDRESS") or env.get("SLURM_NTASKS") or env.get("TPU_WORKER_HOSTNAMES")):
        return
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        names = ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
        given = {name: env.get(name) for name in names}
        if any(v is not None for v in given.values()) or not (env.get("SLURM_NTASKS") or
                                                              env.get("TPU_WORKER_HOSTNAMES")):
            try:
                kwargs = {"num_processes": int(given["JAX_NUM_PROCESSES"]), "process_id": int(given["JAX_PROCESS_ID"])}
            except (TypeError, ValueError):
                raise ConfigError(
                    f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']} starts a multi-process run, which "
                    f"also needs JAX_NUM_PROCESSES (the number of processes) and JAX_PROCESS_ID (0 .. N-1, one per "
                    f"process) as integers; got {given}"
                ) from None
            if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
                raise ConfigError(f"JAX_PROCESS_ID={kwargs['process_id']} must lie in [0, JAX_NUM_PROCESSES="
                                  f"{kwargs['num_processes']})")
    if jax.config.jax_platforms == "cpu" or env.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d", jax.process_index(), jax.process_count())


def check_same_config(config_json: str) -> None:
    """In a multi-process run, refuses to start unless every process was given the same config (a process
    started with other flags would silently train something else). A no-op in a single process."""
    if jax.process_count() == 1:
        return
    import hashlib

    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(config_json.encode()).digest(), np.uint8).astype(np.int32)
    digests = np.asarray(multihost_utils.process_allgather(digest))  # [processes, 32]
    differ = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
    if differ:
        raise ConfigError(
            f"the {jax.process_count()} processes of this run were given different configs (process 0 differs "
            f"from process(es) {differ}); start every process with the same --config and --config.* flags"
        )


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of params, optimizer state, EMA and scalars: a full copy on every device."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of batch arrays: leading axis split over ``"data"``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "the global batch size") -> None:
    """Refuses a global batch (the config ``field`` holding it) that is not positive or does not split evenly
    over the devices and processes."""
    n, p = mesh.devices.size, jax.process_count()
    if global_batch_size <= 0:
        raise ConfigError(f"{field}={global_batch_size}: the batch size must be positive (a multiple of {n}, the "
                          "number of devices)")
    if global_batch_size % n or global_batch_size % p:
        multiple = max(n, p)
        suggestion = max(multiple, global_batch_size // multiple * multiple)
        raise ConfigError(
            f"{field}={global_batch_size} does not divide over the {n} devices ({p} processes): set it to a "
            f"multiple of {multiple}, e.g. {field.removeprefix('config.')}={suggestion}"
        )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global ``jax.Array``s sharded on ``"data"``.

    local_batch: {name: [B_global / num_processes, ...]}; returns {name: [B_global, ...]}.
    """
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` (host or device arrays) replicated on ``mesh``."""
    return jax.device_put(tree, replicated(mesh))
