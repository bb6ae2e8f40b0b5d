"""The one train step and eval step, used by the CLI, the benchmark and the tests.

Both are jitted with only what shapes their program as static arguments, so that equal
runs share one compiled program: a `StepConfig` (the network, the recipe, the image size)
for training; the network, image size and test-time flip for evaluation. The learning rate
and the random keys are arguments: a new --lr or --seed compiles nothing.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import densenet_jax
from train.config import RecipeConfig
from train.parallel import shard_batch
from train.pipeline import augment, preprocess


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What a compiled train step depends on: hashable, a static argument of `train_step`.

    The recipe's learning rate is set aside (the step takes it as an argument), and the
    schedule's length, (steps per epoch, epochs), is kept only where a schedule spans the
    run (cosine): two runs that differ in neither share one program.
    """

    model: densenet_jax.DenseNetConfig
    recipe: RecipeConfig
    resize: int
    schedule_steps: tuple[int, int] = (0, 0)
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std)

    def __post_init__(self):
        object.__setattr__(self, "recipe", dataclasses.replace(
            self.recipe, learning_rate=RecipeConfig.learning_rate))
        if self.recipe.schedule == "constant":
            object.__setattr__(self, "schedule_steps", (0, 0))


class TrainState(struct.PyTreeNode):
    """What training changes, arrays only: the step, parameters, BatchNorm's running
    statistics, the optimiser's state and, if the recipe keeps one, the weights' moving
    average ({"params", "batch_stats"}). How to compute with them is the `StepConfig`'s."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any = None

    @property
    def variables(self) -> dict:
        """What the model applies: {"params", "batch_stats"}."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def eval_variables(self) -> dict:
        """What evaluation, prediction and export apply: the moving average if kept."""
        return self.variables if self.ema is None else self.ema


def learning_rate_schedule(recipe: RecipeConfig, steps_per_epoch: int, epochs: int,
                           learning_rate=None):
    """The learning rate (default: the recipe's; a traced value inside the step), constant
    or per step. A warm-up as long as the run or longer (the strong recipe's one epoch in a
    one-epoch run) ends one step before it, so that the cosine keeps a step to decay over."""
    learning_rate = recipe.learning_rate if learning_rate is None else learning_rate
    if recipe.schedule == "constant":
        return learning_rate
    # "cosine", the only other one RecipeConfig admits (config.SCHEDULES)
    total = max(epochs * steps_per_epoch, 1)
    warmup = min(int(recipe.warmup_epochs * steps_per_epoch), total - 1)
    # optax.warmup_cosine_decay_schedule(0, learning_rate, warmup, total), built from its two
    # pieces as it builds them: it compares its peak with 0 in Python, which a traced rate
    # cannot be.
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup),
                                 optax.cosine_decay_schedule(learning_rate, total - warmup)],
                                [warmup])


def make_optimizer(recipe: RecipeConfig, steps_per_epoch: int, epochs: int, learning_rate=None):
    """SGD (plain for d2l); weight decay added to the gradient, as torch.optim.SGD does."""
    schedule = learning_rate_schedule(recipe, steps_per_epoch, epochs, learning_rate)
    sgd = optax.sgd(schedule, momentum=recipe.momentum or None, nesterov=recipe.nesterov)
    if recipe.weight_decay:
        return optax.chain(optax.add_decayed_weights(recipe.weight_decay), sgd)
    return sgd


def init_variables(key: jax.Array, *, model: densenet_jax.DenseNetConfig, resize: int) -> dict:
    """Initialised {"params", "batch_stats"} (Xavier-uniform conv and linear kernels, as
    d2l) for images of resize × resize."""
    x = jnp.zeros((1, resize, resize, model.in_channels), model.param_dtype)
    return densenet_jax.DenseNet(model).init(key, x, train=False)


# Initialisation runs once a run. XLA:CPU's optimisation of its random-number code takes
# longer than the unoptimised program ever runs, so there it is compiled unoptimised (the
# same values: integer hashing, then exact conversions; docs/performance.md).
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


@functools.cache
def _jitted_init(backend: str):
    return jax.jit(init_variables, static_argnames=("model", "resize"),
                   compiler_options=INIT_COMPILER_OPTIONS.get(backend))


def initial_variables(model: densenet_jax.DenseNetConfig, key: jax.Array, resize: int) -> dict:
    """`init_variables`, compiled once per network (and backend) in a process."""
    return _jitted_init(jax.default_backend())(key, model=model, resize=resize)


def create_train_state(config: StepConfig, variables: dict) -> TrainState:
    """A fresh state from initialised `variables` (`initial_variables`): them, the
    optimiser's initial state and, if the recipe keeps a moving average, that average
    starting at them."""
    optimizer = make_optimizer(config.recipe, *config.schedule_steps)
    # step: an int32 array, not Python's 0, so the first step hits the same compiled program.
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"],
                      opt_state=optimizer.init(variables["params"]),
                      ema=jax.tree.map(jnp.copy, variables) if config.recipe.ema_decay else None)


def zero_metrics() -> dict[str, jax.Array]:
    return {"loss_sum": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
            "count": jnp.zeros((), jnp.int32)}


def batch_of(images: jax.Array, labels: jax.Array, indices: jax.Array | None, mesh: Mesh
             ) -> tuple[jax.Array, jax.Array]:
    """Inside jit: the batch a step computes on, split over the `data` axis: the examples
    `indices` of a split held on the devices, or (`indices` None) `images`, `labels` as they
    came from the streaming path."""
    if indices is not None:
        images, labels = images[indices], labels[indices]
    return shard_batch(images, mesh), shard_batch(labels, mesh)


@functools.partial(jax.jit, static_argnames=("config", "mesh"), donate_argnums=(0, 1))
def train_step(state: TrainState, metrics: dict, images: jax.Array, labels: jax.Array,
               indices: jax.Array | None, key: jax.Array, learning_rate: jax.Array, *,
               config: StepConfig, mesh: Mesh) -> tuple[TrainState, dict]:
    """One SGD step on the examples `indices` of the split held on the devices, or, with
    `indices` None, on the batch `images`, `labels` itself (the streaming path).

    images: (N, H, W, C) uint8, labels: (N,) int32, indices: (B,) int32, all replicated
    on `mesh`, or a batch (B, H, W, C), (B,) split over the `data` axis; the batch is
    split over that axis. key: the run's data key; this step's augmentation key is it
    folded with the step number, so a resumed run draws the same crops. learning_rate:
    () float32, the recipe's (or its schedule's peak). metrics accumulate the loss sum and
    correct count on the devices.
    """
    recipe = config.recipe
    batch, y = batch_of(images, labels, indices, mesh)
    x = preprocess(augment(batch, jax.random.fold_in(key, state.step), recipe), config.resize,
                   config.normalize)
    model = densenet_jax.DenseNet(config.model)

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                      x, train=True, mutable=["batch_stats"])
        targets = jax.nn.one_hot(y, logits.shape[-1])
        if recipe.label_smoothing:
            targets = optax.smooth_labels(targets, recipe.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = densenet_jax.kernels.get_kernels(config.model.kernels).finish_gradients(grads)
    optimizer = make_optimizer(recipe, *config.schedule_steps, learning_rate=learning_rate)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, batch_stats=batch_stats)
    if recipe.ema_decay:
        state = state.replace(ema=moving_average(state.ema, state.variables, state.step,
                                                 recipe.ema_decay))
    batch_metrics = {"loss_sum": loss * y.shape[0],
                     "correct": jnp.sum(jnp.argmax(logits, -1) == y),
                     "count": jnp.asarray(y.shape[0])}
    # summed in zero_metrics' dtypes, whatever the model's (float64 included): the next step
    # takes them as this one did
    metrics = jax.tree.map(lambda total, value: total + value.astype(total.dtype), metrics,
                           batch_metrics)
    # replicated, as they came: the next step takes them as they are
    return jax.lax.with_sharding_constraint((state, metrics), NamedSharding(mesh, P()))


def moving_average(average: dict, variables: dict, step: jax.Array, decay: float) -> dict:
    """The weights' exponential moving average after `step` steps. Its decay grows as
    (1 + step) / (10 + step) up to `decay`, so the start's random weights fade fast."""
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return optax.incremental_update(variables, average, step_size=1.0 - decay)


def infer(variables: dict, images: jax.Array, *, model: densenet_jax.DenseNetConfig,
          resize: int, flip: bool = False, normalize=None) -> jax.Array:
    """Logits (B, classes) in evaluation mode for uint8 images (B, H, W, C), preprocessed as
    in training (`normalize`: the run's (mean, std), or None): what evaluation, prediction
    and export compute. `flip`: the mean of the logits of each image and of its mirror
    image (test-time augmentation)."""
    apply = functools.partial(densenet_jax.DenseNet(model).apply, variables, train=False)
    x = preprocess(images, resize, normalize)
    return (apply(x) + apply(x[:, :, ::-1])) / 2 if flip else apply(x)


@functools.partial(jax.jit, static_argnames=("model", "resize", "flip", "mesh", "normalize"),
                   donate_argnums=(1,))
def eval_step(variables: dict, confusion: jax.Array, images: jax.Array, labels: jax.Array,
              indices: jax.Array | None, *, model: densenet_jax.DenseNetConfig, resize: int,
              flip: bool, mesh: Mesh, normalize=None) -> jax.Array:
    """Running confusion matrix (classes, classes), int32, in evaluation mode (`variables`:
    a state's `eval_variables`; `flip`, `normalize`: see `infer`): row = true class,
    column = predicted class. `indices` as in `train_step` (None: the batch itself)."""
    batch, y = batch_of(images, labels, indices, mesh)
    logits = infer(variables, batch, model=model, resize=resize, flip=flip, normalize=normalize)
    confusion = confusion.at[y, jnp.argmax(logits, -1)].add(1)
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
