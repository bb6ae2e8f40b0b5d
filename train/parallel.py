"""Data parallelism, one code path for 1 or N devices and 1 or N processes.

Every device of every process is one position on a 1-D mesh axis named `data`. Parameters,
optimiser state, BatchNorm statistics and the uint8 splits are replicated; inside the
jitted steps each batch is split over `data` (`shard_batch`), and XLA inserts the
all-reduces, so BatchNorm statistics and gradients are over the global batch, as on one
device. Multi-process runs start with `initialize_distributed()`.
"""
from __future__ import annotations

import os
import socket
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

JOIN_TIMEOUT_VAR = "DENSENET_JAX_JOIN_TIMEOUT"  # seconds a process waits for the others


def initialize_distributed(environ=os.environ, log=print) -> bool:
    """`jax.distributed.initialize()` when JAX_COORDINATOR_ADDRESS (host:port of process 0)
    is set, with JAX_NUM_PROCESSES and JAX_PROCESS_ID where given (clusters that jax
    detects itself, SLURM, Open MPI, Kubernetes, Cloud TPU, fill in the rest); returns
    whether it did. Says in one line what it waits for, and for how long
    (DENSENET_JAX_JOIN_TIMEOUT seconds, default 300). ValueError, in one line, for a
    malformed value, a coordinator that cannot be reached in that time, or a failed join."""
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return False
    host, port = coordinator(address)
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
    timeout = join_timeout(environ)
    processes = counts.get("num_processes", "all")
    log(f"waiting up to {timeout} s for {processes} processes to join at {address} "
        f"(${JOIN_TIMEOUT_VAR} sets the wait)", flush=True)
    if counts.get("process_id", 0) > 0:
        wait_for_coordinator(host, port, timeout)
    elif "process_id" in counts:
        require_free_port(address, port)
    # JAX's preemption notifier would take SIGTERM for itself (and training would run on):
    # a SIGTERM ends a multi-process run as it ends a one-process run (train.main).
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(**counts, initialization_timeout=timeout)
    except RuntimeError as error:  # the coordinator's gRPC status, several lines long
        raise ValueError(f"could not join the run at JAX_COORDINATOR_ADDRESS={address}: "
                         f"{str(error).splitlines()[0]}; check that process 0 is running "
                         f"and reachable") from error
    return True


def process_index_before_joining(environ=os.environ) -> int | None:
    """This process's index in its run, where it is known before joining: 0 without
    JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID where it is set, else None (a cluster's
    settings, which JAX reads when it joins)."""
    if not environ.get("JAX_COORDINATOR_ADDRESS"):
        return 0
    value = environ.get("JAX_PROCESS_ID", "")
    return int(value) if value.isdigit() else None


def coordinator(address: str) -> tuple[str, int]:
    """(host, port) of a JAX_COORDINATOR_ADDRESS; ValueError, in one line, unless it is
    host:port with a port in 1..65535 and a host that resolves."""
    host, _, port = address.rpartition(":")
    if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port (port 1..65535, "
                         f"no scheme); set it to the address of process 0, e.g. 10.0.0.1:12345")
    try:
        socket.getaddrinfo(host.strip("[]"), int(port))
    except OSError as error:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS={address}: host {host!r} is unknown "
                         f"({error.strerror or error}); check the name of process 0's machine") from None
    return host.strip("[]"), int(port)


def require_free_port(address: str, port: int) -> None:
    """ValueError, in one line, when another program listens on `port` here, where process 0
    is to start the coordinator (JAX's runtime would end the process with a crash)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={address}: port {port} is in use here "
                             f"({error.strerror}), by another program or another run; choose "
                             f"a free port for every process of this run") from None


def join_timeout(environ=os.environ) -> int:
    value = environ.get(JOIN_TIMEOUT_VAR, "300")
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"{JOIN_TIMEOUT_VAR}={value!r} must be a positive number of seconds")
    return int(value)


def wait_for_coordinator(host: str, port: int, timeout: float) -> None:
    """Return once process 0's coordinator accepts connections; ValueError, in one line,
    if it does not within `timeout` seconds (JAX would abort the process after it)."""
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise ValueError(f"no coordinator answered at {host}:{port} within {timeout} s; "
                                 f"start process 0 (JAX_PROCESS_ID=0) there, or check "
                                 f"JAX_COORDINATOR_ADDRESS") from None
            time.sleep(0.5)


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


def batch_sharding(size: int, mesh: Mesh) -> NamedSharding:
    """How a batch of `size` examples lies on `mesh`: split over the `data` axis; a batch
    that the mesh does not divide (an epoch's last, partial one) replicated: same result,
    computed on every device."""
    return NamedSharding(mesh, P(DATA_AXIS) if size % mesh.size == 0 else P())


def shard_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside jit: x (B, ...) placed as `batch_sharding` says."""
    return jax.lax.with_sharding_constraint(x, batch_sharding(x.shape[0], mesh))
