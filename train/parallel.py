"""Data parallelism, one code path for 1 or N devices and 1 or N processes.

Every device of every process is one position on a 1-D mesh axis named `data`. Parameters,
optimiser state, BatchNorm statistics and the uint8 splits are replicated; inside the
jitted steps each batch is split over `data` (`shard_batch`), and XLA inserts the
all-reduces, so BatchNorm statistics and gradients are over the global batch, as on one
device. Multi-process runs start with `initialize_distributed()`.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

def initialize_distributed(environ=os.environ) -> bool:
    """`jax.distributed.initialize()` when JAX_COORDINATOR_ADDRESS (host:port of process 0)
    is set, with JAX_NUM_PROCESSES and JAX_PROCESS_ID where given (clusters that jax
    detects itself, SLURM, Open MPI, Kubernetes, Cloud TPU, fill in the rest); returns
    whether it did. ValueError, in one line, for a malformed value or a failed join."""
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return False
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port; set it to "
                         f"the address of process 0, e.g. 10.0.0.1:12345")
    counts = {}
    for name, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        value = environ.get(name)
        if value is None:
            continue
        if not value.isdigit():
            raise ValueError(f"{name}={value!r} is not a non-negative integer; set it to "
                             f"{'the number of processes' if arg == 'num_processes' else 'this process index, from 0'}")
        counts[arg] = int(value)
    if counts.get("process_id", 0) >= counts.get("num_processes", 1 << 30):
        raise ValueError(f"JAX_PROCESS_ID={counts['process_id']} must be below "
                         f"JAX_NUM_PROCESSES={counts['num_processes']}")
    try:
        jax.distributed.initialize(**counts)
    except RuntimeError as error:  # the coordinator's gRPC status, several lines long
        raise ValueError(f"could not join the run at JAX_COORDINATOR_ADDRESS={address}: "
                         f"{str(error).splitlines()[0]}; check that process 0 is running "
                         f"and reachable") from error
    return True


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process), axis `data`."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicate(tree, mesh: Mesh):
    """Host values (numpy arrays, or arrays on one device; the same in every process) as
    arrays replicated on every device of `mesh`. PRNG keys stay keys."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def shard_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside jit: x (B, ...) split over the `data` axis along B. A batch that the mesh
    does not divide (an epoch's last, partial one) stays replicated: same result, computed
    on every device."""
    spec = P(DATA_AXIS) if x.shape[0] % mesh.size == 0 else P()
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
