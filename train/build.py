"""One place builds a run from its `RunConfig`: what its compiled steps depend on, its
train state (fresh, or the shapes a checkpoint restores into), and its steps compiled ahead
of time for the batch sizes it uses, with their compile time and memory. The trainer,
checkpoints, the benchmark, evaluation, export and the tests all build here."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import densenet_jax
from train.config import RunConfig
from train.parallel import batch_sharding
from train.steps import (StepConfig, TrainState, create_train_state, eval_step,
                         init_variables, initial_variables, train_step)


def use_compilation_cache(folder: str | None = None, environ=os.environ) -> None:
    """Keep compiled programs in `folder` across processes (JAX's persistent compilation
    cache), or where $JAX_COMPILATION_CACHE_DIR says when `folder` is None; off when neither
    is set. A run whose programs are there loads them instead of compiling them. Programs
    that compile in under 0.1 s are left out ($JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
    sets another bound; JAX's default, 1 s, would leave the eval steps out)."""
    if folder:
        jax.config.update("jax_compilation_cache_dir", str(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def step_config(run: RunConfig, num_train: int) -> StepConfig:
    """The train step's configuration for `run` over `num_train` examples per epoch."""
    return StepConfig(model=run.model, recipe=run.recipe, resize=run.train.resize,
                      schedule_steps=(math.ceil(num_train / run.train.batch_size),
                                      run.train.epochs),
                      normalize=run.data.normalize)


def learning_rate(run: RunConfig) -> np.ndarray:
    """The run's learning rate (or its schedule's peak) as `train_step` takes it: a scalar
    in the parameters' dtype."""
    return np.asarray(run.recipe.learning_rate, run.model.param_dtype)


def initial_state(config: StepConfig, key: jax.Array) -> TrainState:
    """A fresh train state for `config`, its variables initialised from `key`."""
    return create_train_state(config, initial_variables(config.model, key, config.resize))


def state_shapes(config: StepConfig, mesh: Mesh) -> TrainState:
    """The shapes and dtypes of `initial_state(config, ...)`, replicated on `mesh`, without
    computing it: what a checkpoint restores into."""
    shapes = jax.eval_shape(lambda key: create_train_state(config, init_variables(
        key, model=config.model, resize=config.resize)), jax.random.key(0))
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                          sharding=replicated), shapes)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A step compiled for each batch size it is called with, how long compiling took (a
    program compiled before in this process, or found in the persistent compilation cache,
    takes next to nothing) and the largest program's memory on one device: its arguments,
    outputs and temporaries, less what it updates in place."""

    steps: dict[int, jax.stages.Compiled]
    seconds: float
    memory_bytes: int

    def __call__(self, *args):
        """The step for the batch size of `args`: of its indices (the fifth argument), or
        where those are None, of its images (the third)."""
        return self.steps[(args[2] if args[4] is None else args[4]).shape[0]](*args)


def batch_arguments(size: int, images, labels, mesh: Mesh, streamed: bool) -> tuple:
    """The (images, labels, indices) shapes a step takes for batches of `size`: the split
    on the devices and replicated indices, or (`streamed`) the batch itself, placed as
    train.stream places it, and None."""
    if not streamed:
        return images, labels, jax.ShapeDtypeStruct((size,), jnp.int32,
                                                    sharding=NamedSharding(mesh, P()))
    sharding = batch_sharding(size, mesh)
    return (jax.ShapeDtypeStruct((size, *images.shape[1:]), images.dtype, sharding=sharding),
            jax.ShapeDtypeStruct((size,), labels.dtype, sharding=sharding), None)


def compile_for_batches(lower: Callable[[int], jax.stages.Lowered], batch_sizes) -> Compiled:
    """`lower(size)` compiled for each batch size."""
    start = time.perf_counter()
    steps = {size: lower(size).compile() for size in sorted(set(batch_sizes))}
    memory = max(_memory_bytes(step) for step in steps.values())
    return Compiled(steps, time.perf_counter() - start, memory)


def compile_train_step(config: StepConfig, mesh: Mesh, state: TrainState, metrics: dict,
                       images: jax.Array, labels: jax.Array, key: jax.Array,
                       learning_rate: jax.Array, batch_sizes, streamed: bool = False
                       ) -> Compiled:
    """`train_step` for `config` on these arguments (arrays on `mesh`, or their shapes);
    `streamed`: for batches from train.stream (`images`, `labels`: shaped as one batch)."""
    def lower(size):
        images_, labels_, indices = batch_arguments(size, images, labels, mesh, streamed)
        return train_step.lower(state, metrics, images_, labels_, indices, key, learning_rate,
                                config=config, mesh=mesh)
    return compile_for_batches(lower, batch_sizes)


def compile_eval_step(model: densenet_jax.DenseNetConfig, resize: int, flip: bool, mesh: Mesh,
                      variables: dict, confusion: jax.Array, images: jax.Array,
                      labels: jax.Array, batch_sizes, normalize=None, streamed: bool = False
                      ) -> Compiled:
    """`eval_step` for `model` on these arguments (arrays on `mesh`, or their shapes);
    `streamed` as in `compile_train_step`."""
    def lower(size):
        images_, labels_, indices = batch_arguments(size, images, labels, mesh, streamed)
        return eval_step.lower(variables, confusion, images_, labels_, indices, model=model,
                               resize=resize, flip=flip, mesh=mesh, normalize=normalize)
    return compile_for_batches(lower, batch_sizes)


def _memory_bytes(compiled: jax.stages.Compiled) -> int:
    memory = compiled.memory_analysis()
    return (memory.temp_size_in_bytes + memory.argument_size_in_bytes
            + memory.output_size_in_bytes - memory.alias_size_in_bytes)
