"""Data parallelism over every device of every host: one `data` mesh axis, batches sharded on it, state replicated.

The same code runs on a laptop CPU (1 device), on 8 simulated CPU devices in tests, on a GPU, and on a TPU pod slice
(where every host runs the same command and `jax.distributed.initialize()` lets them find each other).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
    """Joins a multi-process run when the environment describes one (TPU pods, SLURM, or explicit coordinator
    variables); a plain single-process run skips it. Must run before anything touches a device."""
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ or "RESMOBILE_COORDINATOR" in os.environ
    pod = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "MEGASCALE_COORDINATOR_ADDRESS"))
    if not (explicit or pod):
        return
    if "RESMOBILE_COORDINATOR" in os.environ:  # our own spelling for localhost tests and hand-started clusters
        jax.distributed.initialize(
            coordinator_address=os.environ["RESMOBILE_COORDINATOR"],
            num_processes=int(os.environ["RESMOBILE_NUM_PROCESSES"]),
            process_id=int(os.environ["RESMOBILE_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_global_batch(global_batch_size: int, what: str = "data.batch_size") -> int:
    """The per-process share of the global batch; it must split evenly over processes and devices."""
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if global_batch_size % n_dev:
        raise ValueError(
            f"{what} = {global_batch_size} does not split over the {n_dev} devices of this run; "
            f"use a multiple of {n_dev}"
        )
    return global_batch_size // n_proc


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's rows of every field into global arrays sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
