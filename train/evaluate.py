"""Evaluate a trained run: test accuracy, per class, and the confusion matrix.

    python -m train.evaluate --workdir runs/x [--epoch N]

Loads the run's last saved epoch (or epoch N) and measures, in evaluation mode, what
training logged for it as `test acc`, then each class's accuracy under Fashion-MNIST's names,
and writes the confusion matrix as a picture (`confusion.png` in the workdir, or --out).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from train import data
from train.checkpoint import CheckpointError, load_run
from train.host import configure_host
from train.loop import confusion_matrix
from train.parallel import data_mesh, replicate
from train.pipeline import sequential_batches
from train.plots import confusion_figure


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/default", help="the run to evaluate")
    parser.add_argument("--epoch", type=int, help="a saved epoch (default: the last one)")
    parser.add_argument("--data-dir", help="folder with the four Fashion-MNIST .gz files "
                                           "(default: the run's)")
    parser.add_argument("--out", help="where the confusion matrix picture goes (default: "
                                      "confusion.png in the workdir)")
    return parser.parse_args(argv)


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
    try:
        run, state, epoch, history = load_run(workdir, args.epoch)
        source = dataclasses.replace(run.data, data_dir=args.data_dir or run.data.data_dir)
        test = data.load(source)["test"]
        mesh = data_mesh()
        images, labels = replicate((test.images, test.labels), mesh)
        batches = sequential_batches(len(test), run.train.batch_size, mesh)
        confusion = confusion_matrix(replicate(state, mesh), images, labels, batches, run, mesh)
    except (CheckpointError, data.DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    accuracy = np.trace(confusion) / confusion.sum()
    print(f"test acc {accuracy:.4f} after epoch {epoch} of {workdir} (training logged "
          f"{history[-1]['test_acc']:.4f})")
    names = data.class_names(run.model.num_classes)
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
