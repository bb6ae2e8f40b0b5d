"""The accelerator path stays lowerable where no accelerator is: jax.export lowers the train
and eval steps with the reference kernels (what GPUs and TPUs run) for CUDA and TPU from
this CPU, and no custom call that only the CPU implements appears in them; the same holds
for the export command's artifact."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import densenet_jax
from train import export
from train.build import state_shapes, step_config
from train.config import RECIPES, RunConfig, TrainConfig
from train.parallel import data_mesh
from train.steps import eval_step, train_step, zero_metrics

# Custom calls every platform implements: sharding annotations and shape checks.
PORTABLE_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                  "shape_assertion", "annotate_device_placement"}
ACCELERATORS = ("cuda", "tpu")


def custom_calls(exported: jax.export.Exported) -> set[str]:
    """The targets of the custom calls in an exported module."""
    text = exported.mlir_module()
    return (set(re.findall(r"custom_call @([\w.$-]+)", text))
            | set(re.findall(r'call_target_name = "([^"]+)"', text)))


def test_a_cpu_only_custom_call_is_seen():
    """The check itself: a matrix inverse lowered for the CPU calls LAPACK."""
    exported = jax.export.export(jax.jit(jnp.linalg.inv), platforms=("cpu",))(
        jax.ShapeDtypeStruct((3, 3), jnp.float32))
    assert any("lapack" in name for name in custom_calls(exported) - PORTABLE_CALLS)


@pytest.mark.parametrize("fields", [
    dict(),  # d2l's layers
    dict(bottleneck=True, conv_bias=False, global_pool="avg", remat=True, dtype="bfloat16"),
], ids=["d2l", "bc-remat-bf16"])
def test_train_and_eval_steps_lower_for_gpus_and_tpus(fields):
    model = densenet_jax.preset("d2l", block_config=(2, 2), growth_rate=8, stem_channels=8,
                                kernels="reference", **fields)
    run = RunConfig(model=model, recipe=RECIPES["strong"],
                    train=TrainConfig(batch_size=32, resize=32))
    mesh = data_mesh()
    config = step_config(run, 1000)
    state = state_shapes(config, mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def shape(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    images, labels = shape((1000, 28, 28, 1), jnp.uint8), shape((1000,), jnp.int32)
    indices = shape((32,), jnp.int32)
    metrics = jax.tree.map(lambda leaf: shape(leaf.shape, leaf.dtype), zero_metrics())
    key = shape((), jax.random.key(0).dtype)
    lowered = {
        "train": jax.export.export(train_step, platforms=ACCELERATORS)(
            state, metrics, images, labels, indices, key, shape((), np.float32),
            config=config, mesh=mesh),
        "eval": jax.export.export(eval_step, platforms=ACCELERATORS)(
            state.eval_variables, shape((10, 10), jnp.int32), images, labels, indices,
            model=model, resize=32, flip=True, mesh=mesh)}
    for name, exported in lowered.items():
        assert exported.platforms == ACCELERATORS, name
        assert "stablehlo.convolution" in exported.mlir_module(), name
        assert custom_calls(exported) <= PORTABLE_CALLS, (name, custom_calls(exported))


def test_the_exported_model_runs_on_cpus_gpus_and_tpus(trained, tmp_path):
    assert export.main(["--workdir", str(trained), "--out", str(tmp_path / "model.jax")]) == 0
    exported = jax.export.deserialize((tmp_path / "model.jax").read_bytes())
    assert exported.platforms == ("cpu", "cuda", "tpu")
    assert custom_calls(exported) <= PORTABLE_CALLS, custom_calls(exported)
