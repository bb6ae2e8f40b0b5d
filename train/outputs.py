"""What a run writes for people to read, in its workdir: `config.json`, `metrics.jsonl`
(rewritten whole after each epoch, so that it always matches the checkpoint), d2l's plot
(`curves.png`) and TensorBoard's event files (`tensorboard --logdir runs/` shows every run;
written by tensorboardX, without TensorFlow)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator

from tensorboardX import SummaryWriter

from train.config import RunConfig
from train.plots import plot_curves

# TensorBoard's, per epoch (val_acc where the run holds a validation split)
SCALARS = ("loss", "train_acc", "test_acc", "val_acc", "examples_per_sec")


@contextlib.contextmanager
def run_files(workdir: Path, run: RunConfig, history: list[dict], enabled: bool = True
              ) -> Iterator[Callable[[list[dict]], None]]:
    """Writes `run`'s config and `history` so far, then yields a function that records the
    history after each epoch. `enabled=False` (processes other than 0 of a multi-process
    run) writes nothing."""
    if not enabled:
        yield lambda history: None
        return
    (workdir / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    write_metrics(workdir, history)
    writer = SummaryWriter(logdir=str(workdir))

    def record(history: list[dict]) -> None:
        write_metrics(workdir, history)
        plot_curves(history, workdir / "curves.png")
        for name in SCALARS:
            if name in history[-1]:
                writer.add_scalar(name, history[-1][name], history[-1]["epoch"])
        writer.flush()

    try:
        yield record
    finally:
        writer.close()


def write_metrics(workdir: Path, history: list[dict]) -> None:
    """metrics.jsonl, one record per epoch, replaced atomically."""
    tmp = workdir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
    tmp.replace(workdir / "metrics.jsonl")
