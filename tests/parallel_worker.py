"""Run by tests/test_parallel.py in fresh processes (device count and jax.distributed are
fixed at start-up): a few float64 training steps of the strong recipe (momentum, weight
decay, augmentation), data-parallel over every device of every process, and the result
saved for the test to compare.

    python tests/parallel_worker.py OUT.npz [--mesh-devices K] [--kernels NAME]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

import densenet_jax
from train.config import RECIPES
from train.parallel import data_mesh, initialize_distributed, replicate
from train.steps import create_train_state, make_optimizer, train_step, zero_metrics

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
    recipe = RECIPES["strong"]
    config = densenet_jax.preset("d2l", dtype="float64", kernels=args.kernels)
    state = create_train_state(densenet_jax.DenseNet(config),
                               make_optimizer(recipe, len(BATCHES), 2), jax.random.key(0), 32)
    state, metrics, images, labels, key = replicate(
        (state, zero_metrics(), images, labels, jax.random.key(1)), mesh)
    for start, stop in BATCHES:
        indices = replicate(np.arange(start, stop, dtype=np.int32), mesh)
        state, metrics = train_step(state, metrics, images, labels, indices, key, resize=32,
                                    recipe=recipe, mesh=mesh)
    full = replicate(np.arange(32, dtype=np.int32), mesh)
    hlo = train_step.lower(state, metrics, images, labels, full, key, resize=32,
                           recipe=recipe, mesh=mesh).compile().as_text()
    leaves = jax.tree_util.tree_leaves_with_path(
        jax.device_get({"params": state.params, "batch_stats": state.batch_stats,
                        "metrics": metrics}))
    np.savez(args.out, mesh_size=mesh.size, processes=jax.process_count(),
             all_reduce="all-reduce" in hlo,
             **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})


if __name__ == "__main__":
    main()
