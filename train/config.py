"""What a training run is: one frozen dataclass per concern, bundled in `RunConfig`.

The model is a `densenet_jax.DenseNetConfig`; the data source a `train.data.DataConfig`.
"""
from __future__ import annotations

import dataclasses
import json
import math

import densenet_jax
from train.data import DataConfig


SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """Optimiser, schedule, loss and augmentation. `RECIPES["d2l"]` is d2l's train_ch6."""

    learning_rate: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # or "cosine" (with linear warm-up)
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = False       # random crop (padding 2) and horizontal flip, on the device
    random_erasing: float = 0.0  # probability of erasing a random box (Zhong et al., 2020)
    ema_decay: float = 0.0      # evaluate an exponential moving average of the weights
    test_flip: bool = False     # evaluate on each image and its mirror image, logits averaged

    def __post_init__(self):
        problems = list(_recipe_problems(self))
        if problems:
            raise ValueError("invalid RecipeConfig: " + "; ".join(problems))


def _recipe_problems(recipe: RecipeConfig):
    if not 0 < recipe.learning_rate < math.inf:
        yield f"learning_rate must be positive and finite, got {recipe.learning_rate}"
    for name in ("momentum", "ema_decay"):
        if not 0 <= getattr(recipe, name) < 1:
            yield f"{name} must lie in [0, 1), got {getattr(recipe, name)}"
    for name in ("random_erasing", "label_smoothing"):
        if not 0 <= getattr(recipe, name) <= 1:
            yield f"{name} must lie in [0, 1], got {getattr(recipe, name)}"
    for name in ("weight_decay", "warmup_epochs"):
        if not 0 <= getattr(recipe, name) < math.inf:
            yield f"{name} must be finite and not negative, got {getattr(recipe, name)}"
    if recipe.schedule not in SCHEDULES:
        yield f"schedule must be one of {SCHEDULES}, got {recipe.schedule!r}"


RECIPES = {
    "d2l": RecipeConfig(),
    # What it takes to beat d2l by far on Fashion-MNIST (target: test acc ≥ 0.95).
    "strong": RecipeConfig(momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
                           warmup_epochs=1.0, label_smoothing=0.1, augment=True),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: d2l's defaults (10 epochs of batch 256 at 96×96)."""

    epochs: int = 10
    batch_size: int = 256
    resize: int = 96
    seed: int = 0
    limit_train: int | None = None  # train on the first N examples only
    validation: int = 0  # hold the last N training examples out, to choose a recipe on
    init_from: str | None = None  # PyTorch weights to start from (fine-tuning)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: densenet_jax.DenseNetConfig = densenet_jax.DenseNetConfig()
    recipe: RecipeConfig = RecipeConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "RunConfig":
        """The run a workdir's `config.json` (`to_dict`) describes; fields added since it was
        written take their defaults."""
        return cls(model=densenet_jax.DenseNetConfig(**fields["model"]),
                   recipe=RecipeConfig(**fields["recipe"]), train=TrainConfig(**fields["train"]),
                   data=DataConfig(**fields["data"]))

    def result_fields(self) -> dict:
        """Everything that shapes the results (not where the data lies, nor how the model
        is computed: kernels and remat): a checkpoint resumes only a run whose fields are
        all equal."""
        fields = json.loads(json.dumps(self.to_dict()))  # as config.json holds them
        fields["data"] = {name: fields["data"][name] for name in DATA_RESULT_FIELDS}
        return without_computation_fields(fields)


# What of the data's configuration shapes the results (not where it lies, nor how it
# reaches the devices)
DATA_RESULT_FIELDS = ("source", "dataset", "mean", "std")


def without_computation_fields(fields: dict) -> dict:
    """`result_fields` (also as saved by earlier versions, where fields added since take
    their defaults) without the model's fields that change how it is computed but not what."""
    model = {**_defaults(densenet_jax.DenseNetConfig), **fields.get("model", {})}
    model = {k: v for k, v in model.items() if k not in ("kernels", "remat")}
    data = {**{name: _defaults(DataConfig)[name] for name in DATA_RESULT_FIELDS},
            **fields.get("data", {})}
    return {**fields, "model": model, "data": data,
            "recipe": {**_defaults(RecipeConfig), **fields.get("recipe", {})},
            "train": {**_defaults(TrainConfig), **fields.get("train", {})}}


def _defaults(config_class) -> dict:
    """A config dataclass's fields with their defaults, sequences as JSON has them."""
    return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
            for f in dataclasses.fields(config_class)}
