"""The streaming input path: splits too large to hold on the devices are read batch by
batch through grain while the devices compute.

Training reads the same batches as the on-device path (train.pipeline.epoch_batches: the
epoch's permutation of the run's data key, drawn here on the host), so both paths give the
same results. Each process reads only its own rows of each global batch (those of its
devices), from a random-access source (train.datasets), in grain's reader threads, ahead
of the step that takes them; `global_batch` assembles the rows of all processes into one
array split over the `data` axis. Augmentation stays in the step, on the devices. The
reader's position (grain's iterator state) is saved with every checkpoint, so a resumed
run reads on exactly where the saved one stopped.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from train.data import DataConfig, Split
from train.parallel import batch_sharding
from train.pipeline import cut, evaluation_batch_sizes, training_batch_sizes

READ_THREADS = 4      # grain's reader threads (decoding releases the GIL)
PREFETCH_BATCHES = 4  # batches read ahead of the step: what bounds the host memory used


def local_rows(size: int, mesh: Mesh) -> slice:
    """The rows of a global batch of `size` that this process reads: those of its devices
    where the batch is split over the mesh, all of them where it is replicated."""
    if size % mesh.size:  # replicated (`batch_sharding`)
        return slice(0, size)
    devices = list(mesh.devices.flat)
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    per_device = size // len(devices)
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def global_batch(images: np.ndarray, labels: np.ndarray, size: int, mesh: Mesh
                 ) -> tuple[jax.Array, jax.Array]:
    """This process's rows (`local_rows`) of a batch of `size`, assembled with the other
    processes' into arrays placed as the steps take them (`batch_sharding`)."""
    sharding = batch_sharding(size, mesh)
    return (jax.make_array_from_process_local_data(sharding, images, (size, *images.shape[1:])),
            jax.make_array_from_process_local_data(sharding, labels, (size,)))


def host_key(key: jax.Array) -> jax.Array:
    """The run's data key (replicated on the mesh) as a key of this process alone: what the
    reader threads draw each epoch's permutation from, without the other processes."""
    return jax.random.wrap_key_data(np.asarray(jax.random.key_data(key).addressable_data(0)),
                                    impl=jax.random.key_impl(key))


class TrainingBatches(Sequence):
    """For each step of a run, this process's indices of its training batch: epoch e's
    batches are `epoch_batches(fold_in(key, e), ...)`, as on the devices."""

    def __init__(self, key: jax.Array, num_examples: int, batch_size: int, epochs: int,
                 mesh: Mesh):
        self.key, self.num_examples, self.mesh = host_key(key), num_examples, mesh
        self.sizes = training_batch_sizes(num_examples, batch_size)
        self.epochs = epochs
        self._orders: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def start(self, epochs_done: int) -> "TrainingBatches":
        """Draw the next epoch's order now, before the first step waits for it."""
        if epochs_done < self.epochs:
            self.epoch(epochs_done + 1)
        return self

    def __len__(self) -> int:
        return self.epochs * len(self.sizes)

    def __getitem__(self, step: int) -> tuple[np.ndarray, int]:
        """(this process's indices, the global batch size) of step `step`'s batch."""
        epoch, batch = divmod(int(step), len(self.sizes))
        indices = self.epoch(epoch + 1)[batch]
        return indices[local_rows(len(indices), self.mesh)], len(indices)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """Epoch `epoch`'s batches of indices (the last two epochs' are kept)."""
        with self._lock:
            if epoch not in self._orders:
                order = np.asarray(jax.random.permutation(jax.random.fold_in(self.key, epoch),
                                                          self.num_examples))
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
                self._orders[epoch] = cut(order, self.sizes)
            return self._orders[epoch]


def evaluation_batches(num_examples: int, batch_size: int, mesh: Mesh
                       ) -> list[tuple[np.ndarray, int]]:
    """(this process's indices, the global batch size) of each evaluation batch: every
    example once, in order."""
    batches = cut(np.arange(num_examples), evaluation_batch_sizes(num_examples, batch_size))
    return [(indices[local_rows(len(indices), mesh)], len(indices)) for indices in batches]


def reader(source, batches: Sequence[tuple[np.ndarray, int]], mesh: Mesh) -> grain.IterDataset:
    """Each of `batches` (this process's indices, the global size) read from `source` and
    placed on the devices as the steps take it (`global_batch`), in grain's reader threads,
    PREFETCH_BATCHES ahead of whoever iterates: (images, labels). Placing it there keeps
    the step loop from waiting on the transfer (on XLA:CPU it waits for the step before)."""
    def read(batch):
        indices, size = batch
        return global_batch(*source.read(indices), size, mesh)

    return (grain.MapDataset.source(batches).map(read)
            .to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                               prefetch_buffer_size=PREFETCH_BATCHES)))


def example_bytes(split) -> int:
    """The bytes one example's image takes as the steps take it (uint8)."""
    if isinstance(split, Split):
        return split.images[0].nbytes if len(split) else 0
    return split.read(np.arange(1))[0][0].nbytes if len(split) else 0


def device_limit_bytes(config: DataConfig, mesh: Mesh) -> int:
    """The most image bytes the on-device path may hold: `config.device_limit_mib`, else a
    quarter of one device's memory (of the host's, for CPU devices, which report none)."""
    if config.device_limit_mib is not None:
        return int(config.device_limit_mib * 2**20)
    try:
        stats = mesh.devices.flat[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 (backends without memory statistics)
        stats = {}
    total = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // 4


def input_path(config: DataConfig, splits: list, mesh: Mesh, log=print) -> str:
    """"device" (every split held on the devices) or "stream" (train.stream), as
    `config.input` says; "auto" streams when the splits' images exceed
    `device_limit_bytes`. Says which, in one line, with the sizes."""
    total = sum(example_bytes(split) * len(split) for split in splits)
    limit = device_limit_bytes(config, mesh)
    path = config.input if config.input != "auto" else ("device" if total <= limit else "stream")
    how = ("held on the devices" if path == "device" else
           f"streamed through grain, {READ_THREADS} reader threads")
    why = f" (--input {config.input})" if config.input != "auto" else (
        f" (the device limit: {limit / 2**20:,.0f} MiB, --device-limit)")
    log(f"input: {total / 2**20:,.1f} MiB of images, {how}{why}")
    return path
