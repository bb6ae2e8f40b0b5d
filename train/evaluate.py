"""Evaluate a trained run: test accuracy, per class, and the confusion matrix.

    python -m train.evaluate --workdir runs/x [--epoch N] [--split val] [--no-ema] [--no-flip]

Loads the run's last saved epoch (or epoch N) and measures, in evaluation mode, what
training logged for it as `test acc` (or `val acc`), then each class's accuracy under
its data set's class names, and writes the confusion matrix as a picture (`confusion.png` in the
workdir, or --out). --ema/--no-ema and --flip/--no-flip evaluate otherwise than the run did:
what its moving average and test-time flip buy, measured on the validation split.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

import densenet_jax
from train import data, datasets, stream
from train.build import Compiled, compile_eval_step
from train.checkpoint import CheckpointError, load_run
from train.config import RunConfig
from train.host import configure_host
from train.parallel import data_mesh, replicate
from train.datasets import Source, materialize, split_for_validation
from train.pipeline import evaluation_batch_sizes, sequential_batches
from train.plots import confusion_figure
from train.steps import TrainState


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A split in an order that never changes, placed on the devices once or read anew
    each time (train.stream), with the eval step compiled for its batches: what the trainer
    measures after each epoch and this command measures after training."""

    step: Compiled
    num_examples: int
    batch_size: int
    num_classes: int
    mesh: Mesh
    images: jax.Array | None = None  # the split on the devices, or None where streamed
    labels: jax.Array | None = None
    indices: list | None = None      # each batch's, on the devices
    source: object = None            # where streamed: the split to read

    @classmethod
    def prepare(cls, split: Source, variables: dict, model: densenet_jax.DenseNetConfig,
                resize: int, flip: bool, batch_size: int, mesh: Mesh, normalize=None,
                streamed: bool = False) -> "Evaluation":
        """`split` on `mesh` (or, `streamed`, read each time), evaluated in batches of
        `batch_size` as `model` at `resize` (`flip`: test-time flip; `normalize`: the run's
        (mean, std)) with variables shaped as `variables`."""
        confusion = replicate(np.zeros((model.num_classes,) * 2, np.int32), mesh)
        sizes = evaluation_batch_sizes(len(split), batch_size)
        if streamed:
            images, labels = split.read(np.arange(1))
        else:
            split = materialize(split)
            images, labels = replicate((split.images, split.labels), mesh)
        step = compile_eval_step(model, resize, flip, mesh, variables, confusion, images,
                                 labels, sizes, normalize, streamed)
        if streamed:
            return cls(step, len(split), batch_size, model.num_classes, mesh, source=split)
        return cls(step, len(split), batch_size, model.num_classes, mesh, images, labels,
                   sequential_batches(len(split), batch_size, mesh))

    def batches(self):
        """(images, labels, indices) of each batch, as the step takes them."""
        if self.source is None:
            for indices in self.indices:
                yield self.images, self.labels, indices
            return
        for images, labels in stream.reader(self.source, stream.evaluation_batches(
                self.num_examples, self.batch_size, self.mesh), self.mesh):
            yield images, labels, None

    def confusion(self, variables: dict) -> np.ndarray:
        """(true class, predicted class) counts over the split, in evaluation mode
        (`variables`: a state's `eval_variables`)."""
        confusion = replicate(np.zeros((self.num_classes,) * 2, np.int32), self.mesh)
        for images, labels, indices in self.batches():
            confusion = self.step(variables, confusion, images, labels, indices)
        return np.asarray(confusion)

    def accuracy(self, variables: dict) -> float:
        return float(np.trace(self.confusion(variables))) / self.num_examples


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/default", help="the run to evaluate")
    parser.add_argument("--epoch", type=int, help="a saved epoch (default: the last one)")
    parser.add_argument("--data-dir", help="where the run's data set lies (default: where "
                                           "it lay for training)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="test: the test set; val: the training examples the run held "
                             "out with --validation (default: test)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction,
                        help="the weights' moving average (--ema) or the trained weights "
                             "(--no-ema) (default: as the run evaluated)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction,
                        help="average each image's logits with its mirror image's, or not "
                             "(default: as the run evaluated)")
    parser.add_argument("--out", help="where the confusion matrix picture goes (default: "
                                      "confusion.png in the workdir)")
    return parser.parse_args(argv)


def evaluated_as(run: RunConfig, state: TrainState, ema: bool | None, flip: bool | None
                 ) -> tuple[RunConfig, TrainState]:
    """The run and state as evaluation should see them: the moving average dropped for
    `ema=False`, the recipe's test-time flip replaced by `flip`; None keeps the run's.
    ValueError, in one line, for `ema=True` on a run that kept no moving average."""
    if ema and state.ema is None:
        raise ValueError("this run kept no moving average of its weights (ema_decay 0): "
                         "drop --ema")
    if ema is False:
        state = state.replace(ema=None)
    if flip is not None:
        run = dataclasses.replace(run, recipe=dataclasses.replace(run.recipe, test_flip=flip))
    return run, state


def split_of(run: RunConfig, splits: dict[str, Source], name: str) -> Source:
    """The test split, or ("val") the training examples the run held out. ValueError, in
    one line, for "val" on a run trained without --validation."""
    if name == "test":
        return splits["test"]
    if not run.train.validation:
        raise ValueError("this run held out no validation split (trained without "
                         "--validation): use --split test")
    return split_for_validation(splits["train"], run.train.validation)[1]


def settings(run: RunConfig, state: TrainState) -> str:
    """How the accuracy was measured, e.g. "trained weights, no flip"."""
    weights = "trained weights" if state.ema is None else "moving average"
    return f"{weights}, {'flip-averaged' if run.recipe.test_flip else 'no flip'}"


def class_table(confusion: np.ndarray, names) -> list[str]:
    """One line per class: its name, accuracy and number of examples."""
    width = max(len(name) for name in ("class", *names))
    lines = [f"{'class':<{width}}  accuracy  examples"]
    for name, row, correct in zip(names, confusion, np.diag(confusion)):
        lines.append(f"{name:<{width}}  {correct / max(row.sum(), 1):8.3f}  {row.sum():8d}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    say = functools.partial(print, flush=True)  # each phase can take a while on a CPU
    try:
        say(f"loading {f'epoch {args.epoch}' if args.epoch else 'the last epoch'} of {workdir}")
        run, state, epoch, history = load_run(workdir, args.epoch)
        run, state = evaluated_as(run, state, args.ema, args.flip)
        source = dataclasses.replace(run.data, data_dir=args.data_dir or run.data.data_dir)
        say(f"loading {datasets.describe(source)}")
        split = split_of(run, datasets.open_dataset(source, run.data.image_shape[0]).splits,
                         args.split)
        mesh = data_mesh()
        streamed = stream.input_path(source, [split], mesh, say) == "stream"
        variables = replicate(state.eval_variables, mesh)
        say("compiling the eval step")
        evaluation = Evaluation.prepare(split, variables, run.model, run.train.resize,
                                        run.recipe.test_flip, run.train.batch_size, mesh,
                                        run.data.normalize, streamed)
        say(f"evaluating {len(split):,} {args.split} images")
        confusion = evaluation.confusion(variables)
    except (CheckpointError, data.DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    accuracy = np.trace(confusion) / confusion.sum()
    print(f"{args.split} acc {accuracy:.4f} after epoch {epoch} of {workdir} with the "
          f"{settings(run, state)} (training logged {history[-1][args.split + '_acc']:.4f})")
    names = datasets.class_names(run.data, run.model.num_classes)
    print("\n".join(class_table(confusion, names)))
    out = Path(args.out) if args.out else workdir / "confusion.png"
    try:
        confusion_figure(confusion, names).savefig(out, dpi=120)
    except OSError as error:
        print(f"error: cannot write {out} ({error.strerror or error}); choose another --out",
              file=sys.stderr)
        return 1
    print(f"confusion matrix: {out}")
    return 0


if __name__ == "__main__":
    configure_host()  # before JAX starts
    sys.exit(main())
