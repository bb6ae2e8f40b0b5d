"""Run by tests/test_parallel.py in fresh processes (device count and jax.distributed are
fixed at start-up): a few float64 training steps of the strong recipe (momentum, weight
decay, augmentation) with the tests' tiny network, data-parallel over every device of every
process, and the result saved for the test to compare.

    python tests/parallel_worker.py OUT.npz [--mesh-devices K] [--kernels NAME]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

import densenet_jax
from train.config import RECIPES, RunConfig, TrainConfig
from train.build import compile_train_step, initial_state, learning_rate, step_config
from train.parallel import data_mesh, initialize_distributed, replicate
from train.steps import zero_metrics

# Two full batches the mesh divides, then a partial one (30 = 4·7 + 2) that stays replicated.
BATCHES = ((0, 32), (32, 64), (64, 94))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mesh-devices", type=int, help="the first K devices only")
    parser.add_argument("--kernels", default="auto")
    args = parser.parse_args()
    # float64, so that the comparison tests the parallelism, not float32 reduction order.
    jax.config.update("jax_enable_x64", True)
    initialize_distributed()
    mesh = data_mesh(jax.devices()[:args.mesh_devices] if args.mesh_devices else None)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 100).astype(np.int32)
    model = densenet_jax.preset("d2l", block_config=(2, 2), growth_rate=8, stem_channels=8,
                                dtype="float64", kernels=args.kernels)
    run = RunConfig(model=model, recipe=RECIPES["strong"],
                    train=TrainConfig(epochs=2, batch_size=32, resize=32))
    config = step_config(run, 94)  # three batches per epoch, as BATCHES
    state, metrics, images, labels, key, rate = replicate(
        (initial_state(config, jax.random.key(0)), zero_metrics(), images, labels,
         jax.random.key(1), learning_rate(run)), mesh)
    train_step = compile_train_step(config, mesh, state, metrics, images, labels, key,
                                    rate, [stop - start for start, stop in BATCHES])
    for start, stop in BATCHES:
        indices = replicate(np.arange(start, stop, dtype=np.int32), mesh)
        state, metrics = train_step(state, metrics, images, labels, indices, key, rate)
    hlo = train_step.steps[32].as_text()
    leaves = jax.tree_util.tree_leaves_with_path(
        jax.device_get({"params": state.params, "batch_stats": state.batch_stats,
                        "metrics": metrics}))
    np.savez(args.out, mesh_size=mesh.size, processes=jax.process_count(),
             all_reduce="all-reduce" in hlo,
             **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})


if __name__ == "__main__":
    main()
