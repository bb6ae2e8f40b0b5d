"""The one train step and eval step, used by the CLI, the benchmark and the tests."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import densenet_jax
from train.config import RecipeConfig
from train.parallel import shard_batch
from train.pipeline import augment, preprocess


class TrainState(train_state.TrainState):
    """params, optimiser state and step, plus BatchNorm's running statistics and the
    model's kernel set (static)."""

    batch_stats: Any = None
    ema: Any = None  # {"params", "batch_stats"} averaged over steps, if the recipe keeps them
    kernels: densenet_jax.kernels.Kernels = struct.field(pytree_node=False, default=None)

    @property
    def variables(self) -> dict:
        """What the model applies: {"params", "batch_stats"}."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def eval_variables(self) -> dict:
        """What evaluation, prediction and export apply: the moving average if kept."""
        return self.variables if self.ema is None else self.ema


def learning_rate_schedule(recipe: RecipeConfig, steps_per_epoch: int, epochs: int):
    """The learning rate, constant or per step. A warm-up as long as the run or longer (the
    strong recipe's one epoch in a one-epoch run) ends one step before it, so that the cosine
    keeps a step to decay over."""
    if recipe.schedule == "constant":
        return recipe.learning_rate
    # "cosine", the only other one RecipeConfig admits (config.SCHEDULES)
    total = max(epochs * steps_per_epoch, 1)
    warmup = min(int(recipe.warmup_epochs * steps_per_epoch), total - 1)
    return optax.warmup_cosine_decay_schedule(0.0, recipe.learning_rate, warmup, total)


def make_optimizer(recipe: RecipeConfig, steps_per_epoch: int, epochs: int):
    """SGD (plain for d2l); weight decay added to the gradient, as torch.optim.SGD does."""
    schedule = learning_rate_schedule(recipe, steps_per_epoch, epochs)
    sgd = optax.sgd(schedule, momentum=recipe.momentum or None, nesterov=recipe.nesterov)
    if recipe.weight_decay:
        return optax.chain(optax.add_decayed_weights(recipe.weight_decay), sgd)
    return sgd


def create_train_state(model: densenet_jax.DenseNet, optimizer, key: jax.Array,
                       resize: int, ema: bool = False) -> TrainState:
    """Initialised variables (Xavier-uniform conv and linear kernels, as d2l); with `ema`,
    their moving average starts at them."""
    x = jnp.zeros((1, resize, resize, model.config.in_channels), model.config.param_dtype)
    variables = jax.jit(functools.partial(model.init, train=False))(key, x)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optimizer,
                              batch_stats=variables["batch_stats"],
                              ema=jax.tree.map(jnp.copy, variables) if ema else None,
                              kernels=densenet_jax.kernels.get_kernels(model.config.kernels))
    # An int32 array, not Python's 0, so the first step hits the same compiled program.
    return state.replace(step=jnp.zeros((), jnp.int32))


def zero_metrics() -> dict[str, jax.Array]:
    return {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
            "count": jnp.zeros((), jnp.int32)}


@functools.partial(jax.jit, static_argnames=("resize", "recipe", "mesh"), donate_argnums=(0, 1))
def train_step(state: TrainState, metrics: dict, images: jax.Array, labels: jax.Array,
               indices: jax.Array, key: jax.Array, *, resize: int, recipe: RecipeConfig,
               mesh: Mesh) -> tuple[TrainState, dict]:
    """One SGD step on the examples `indices` of the split held on the devices.

    images: (N, 28, 28, 1) uint8, labels: (N,) int32, indices: (B,) int32, all replicated
    on `mesh`; the batch is split over its `data` axis. key: the run's data key; this
    step's augmentation key is it folded with the step number, so a resumed run draws the
    same crops. metrics accumulate the loss sum and correct count on the devices.
    """
    batch, y = shard_batch(images[indices], mesh), shard_batch(labels[indices], mesh)
    x = preprocess(augment(batch, jax.random.fold_in(key, state.step), recipe), resize)

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                         x, train=True, mutable=["batch_stats"])
        targets = jax.nn.one_hot(y, logits.shape[-1])
        if recipe.label_smoothing:
            targets = optax.smooth_labels(targets, recipe.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = state.kernels.finish_gradients(grads)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if recipe.ema_decay:
        state = state.replace(ema=moving_average(state.ema, state.variables, state.step,
                                                 recipe.ema_decay))
    metrics = {"loss_sum": metrics["loss_sum"] + loss * y.shape[0],
               "correct": metrics["correct"] + jnp.sum(jnp.argmax(logits, -1) == y),
               "count": metrics["count"] + y.shape[0]}
    return state, metrics


def moving_average(average: dict, variables: dict, step: jax.Array, decay: float) -> dict:
    """The weights' exponential moving average after `step` steps. Its decay grows as
    (1 + step) / (10 + step) up to `decay`, so the start's random weights fade fast."""
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return optax.incremental_update(variables, average, step_size=1.0 - decay)


def infer(variables: dict, images: jax.Array, *, apply_fn, resize: int,
          flip: bool = False) -> jax.Array:
    """Logits (B, classes) in evaluation mode for uint8 images (B, H, W, C), preprocessed as
    in training: what evaluation, prediction and export compute. `flip`: the mean of the
    logits of each image and of its mirror image (test-time augmentation)."""
    x = preprocess(images, resize)
    if flip:
        return (apply_fn(variables, x, train=False)
                + apply_fn(variables, x[:, :, ::-1], train=False)) / 2
    return apply_fn(variables, x, train=False)


@functools.partial(jax.jit, static_argnames=("resize", "flip", "mesh"), donate_argnums=(1,))
def eval_step(state: TrainState, confusion: jax.Array, images: jax.Array, labels: jax.Array,
              indices: jax.Array, *, resize: int, flip: bool, mesh: Mesh) -> jax.Array:
    """Running confusion matrix (classes, classes), int32, in evaluation mode (running
    statistics, the moving average if kept; `flip`: see `infer`): row = true class,
    column = predicted class."""
    logits = infer(state.eval_variables, shard_batch(images[indices], mesh),
                   apply_fn=state.apply_fn, resize=resize, flip=flip)
    confusion = confusion.at[shard_batch(labels[indices], mesh), jnp.argmax(logits, -1)].add(1)
    # replicated, as it came: every process can read it
    return jax.lax.with_sharding_constraint(confusion, NamedSharding(mesh, P()))


def checkpoint_tree(state: TrainState) -> dict:
    """The arrays of a TrainState (what a checkpoint holds)."""
    tree = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}
    return tree if state.ema is None else {**tree, "ema": state.ema}


def replace_from_tree(state: TrainState, tree: dict) -> TrainState:
    return state.replace(step=tree["step"], params=tree["params"],
                         batch_stats=tree["batch_stats"], opt_state=tree["opt_state"],
                         ema=tree.get("ema"))

