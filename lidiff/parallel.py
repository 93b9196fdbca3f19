"""Device mesh, shardings, and putting host batches onto devices.

lidiff trains on a 2-D mesh ``("data", "fsdp")`` covering every device of every process (``make_mesh``). The
batch is split over both axes. Params, optimizer state and EMA are sharded over ``"fsdp"`` by one rule
(``param_spec``: a tensor's largest dimension that divides evenly, small tensors replicated) and replicated over
``"data"``; ``fsdp=1`` (the default) is plain data parallelism with everything replicated. XLA inserts the
all-gathers before each use and reduce-scatters the gradients. Multi-host runs call
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

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device
MIN_SHARDED_SIZE = 2**14  # tensors with fewer elements (biases, norms, scalars, small kernels) stay replicated


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


def make_mesh(devices: list[jax.Device] | None = None, fsdp: int = 1) -> Mesh:
    """A mesh ``("data", "fsdp")`` of shape ``(n // fsdp, fsdp)`` over ``devices`` (default: all devices of all
    processes, in ``jax.devices()`` order, so each process holds whole rows when ``fsdp`` divides its device
    count). ``fsdp=-1`` puts every device on the ``"fsdp"`` axis; ``fsdp=1`` is plain data parallelism."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    size = n if fsdp == -1 else fsdp
    if size < 1 or n % size:
        raise ConfigError(f"config.parallel.fsdp={fsdp} does not divide the {n} devices: use a divisor of {n} "
                          f"(1 = replicated params, -1 = shard over all {n})")
    return Mesh(np.asarray(devices).reshape(n // size, size), BATCH_AXES)


def mesh_from_config(config: Any) -> Mesh:
    """The training mesh of an experiment config (``config.parallel.fsdp``; configs without the field: 1)."""
    return make_mesh(fsdp=int(config.get("parallel", {}).get("fsdp", 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of frozen params, scalars and metrics: a full copy on every device."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of batch arrays: leading axis split over every device (``"data"`` x ``"fsdp"``)."""
    return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = MIN_SHARDED_SIZE) -> P:
    """Where a trained tensor of ``shape`` lives on an ``fsdp``-way axis: split along its largest dimension that
    ``fsdp`` divides (the first such among equals), or replicated when ``fsdp`` is 1, the tensor has fewer than
    ``min_size`` elements, or no dimension divides. E.g. a [3, 3, 320, 640] conv kernel on fsdp=8 ->
    ``P(None, None, None, "fsdp")``; a [320] bias -> ``P()``."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*([None] * dim + [FSDP_AXIS]))
    return P()


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """``NamedSharding``s for every leaf of a train state (arrays or ``ShapeDtypeStruct``s) by ``param_spec``."""
    fsdp = mesh.shape.get(FSDP_AXIS, 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


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
    """Places every leaf of ``tree`` (host arrays, or device arrays of any sharding, e.g. fsdp-sharded EMA
    params of the training mesh) replicated on ``mesh``. When ``mesh`` or the arrays span processes, call it on
    every process with the same values: gathering a sharded array is a collective, and each process places its
    own copy on its own devices."""
    return put_sharded(jax.tree.map(_whole_on_this_process, tree), replicated(mesh))


def _whole_on_this_process(x: Any) -> Any:
    """A device array spanning other processes -> one local device's full copy (gathered first if sharded)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.sharding.is_fully_replicated:
            x = jax.jit(lambda a: a, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)
        x = x.addressable_data(0)
    return x


def put_sharded(tree: Any, sharding: NamedSharding) -> Any:
    """Host arrays, the same on every process, placed with ``sharding`` (e.g. a sampling batch split over the
    devices of all processes); each process places only its own devices' parts."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a device array on this process's host, gathered from all processes if it spans them
    (a collective: call it on every process)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
