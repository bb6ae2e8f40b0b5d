"""The training loop. `fit` holds the workdir for the run, claims it and builds or restores
the state (`begin`); `train` compiles the steps (`Trainer.prepare`, `Evaluation.prepare`),
then runs the epochs: the steps over the split held on the devices (`Trainer.epoch`), an
evaluation, a checkpoint and the run's files (train.outputs) after each."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

import densenet_jax
from train import checkpoint
from train.build import (Compiled, compile_train_step, initial_state, learning_rate,
                         state_shapes, step_config)
from train import stream
from train.config import RunConfig
from train.data import Split
from train.datasets import Source, materialize, split_for_validation
from train.evaluate import Evaluation
from train.outputs import run_files
from train.parallel import data_mesh, replicate
from train.pipeline import epoch_batches, training_batch_sizes
from train.steps import StepConfig, TrainState, zero_metrics


class NonFiniteLossError(Exception):
    """Training diverged; the last good checkpoint is kept."""


def fit(run: RunConfig, splits: dict[str, Source], workdir: Path, resume: bool = False,
        log=print, mesh=None, overwrite: bool = False, keep: int | None = 2) -> list[dict]:
    """Train as `run` says on `splits` ("train", "test": `Split`s in host memory or any
    random-access source, train.datasets), data-parallel over `mesh` (default: every
    device); returns one record per epoch (also in workdir/metrics.jsonl). The splits are
    held on the devices or streamed as `run.data.input` says (`input_path`). A workdir
    holding another run's checkpoints is refused unless `resume` (continue it) or
    `overwrite` (replace it). The last `keep` epochs' checkpoints are kept (None: every
    epoch's).

    In a multi-process run every process calls this alike; process 0 logs and writes the
    files, and all of them take part in the checkpoints."""
    mesh = mesh or data_mesh()
    lead = jax.process_index() == 0
    log = log if lead else _silent
    train_split, evaluated = run_splits(run, splits)
    streamed = stream.input_path(run.data, [train_split, *evaluated.values()], mesh, log) == "stream"
    if not streamed:
        train_split = materialize(train_split)
        evaluated = {name: materialize(split) for name, split in evaluated.items()}
        require_classes(run.model, {"train": train_split, **evaluated})
    config = step_config(run, len(train_split))
    if resume:
        checkpoint.require_run(workdir, run.result_fields())
    workdir.mkdir(parents=True, exist_ok=True)
    with checkpoint.hold(workdir):  # every process its own lock: all refuse a second run alike
        mngr, state, start_epoch, data_key, history, reader_state = begin(
            run, config, workdir, resume, overwrite, mesh, log, lead, keep)
        if start_epoch >= run.train.epochs:
            log(f"nothing to train: {workdir} already holds all {run.train.epochs} epochs of "
                f"this run (python -m train.evaluate --workdir {workdir} measures it)")
            return history
        if start_epoch:
            log(f"resumed from epoch {start_epoch} in {mngr.directory}")
        train(run, config, train_split, evaluated, state, data_key, mngr, history, workdir,
              mesh, log, lead, streamed, reader_state)
    return history


def train(run: RunConfig, config: StepConfig, train_split: Source, evaluated: dict[str, Source],
          state: TrainState, data_key: jax.Array, mngr, history: list[dict], workdir: Path,
          mesh: Mesh, log, lead: bool, streamed: bool = False, reader_state: dict | None = None
          ) -> None:
    """Compile the steps, then train from the epoch after `history`'s last to the run's
    last, evaluating, saving and recording (into `history` too) after each. `streamed`:
    the splits are read as training goes (train.stream), from `reader_state` (the saved
    reader's position) where resumed."""
    if training_batch_sizes(len(train_split), run.train.batch_size)[-1] > run.train.batch_size:
        log(f"the last batch of each epoch would hold 1 example, which BatchNorm cannot train "
            f"on: it joins the batch before ({run.train.batch_size + 1} examples)")
    log("compiling the train and eval steps")
    trainer = Trainer.prepare(run, config, train_split, state, data_key, mesh, streamed,
                              len(history), reader_state)
    evaluations = {name: Evaluation.prepare(split, state.eval_variables, run.model,
                                            run.train.resize, run.recipe.test_flip,
                                            run.train.batch_size, mesh, run.data.normalize,
                                            streamed)
                   for name, split in evaluated.items()}
    seconds = trainer.step.seconds + sum(e.step.seconds for e in evaluations.values())
    log(f"compiled in {seconds:.1f} s; the train step takes "
        f"{trainer.step.memory_bytes / 2**20:,.0f} MiB per device")

    run_fields = run.result_fields()
    with run_files(workdir, run, history, enabled=lead) as record_files:
        for epoch in range(len(history) + 1, run.train.epochs + 1):
            state, loss, train_acc, seconds = trainer.epoch(state, epoch, progress=lead)
            if diverged(loss, run.model.num_classes):
                raise NonFiniteLossError(divergence_message(loss, epoch, mngr.directory))
            history.append({"epoch": epoch, "loss": loss, "train_acc": train_acc,
                            **{f"{name}_acc": evaluation.accuracy(state.eval_variables)
                               for name, evaluation in evaluations.items()},
                            "examples_per_sec": len(train_split) / seconds,
                            "train_seconds": seconds})
            checkpoint.save(mngr, epoch, state, data_key, history, run_fields,
                            trainer.reader_state())
            record_files(history)
            log(f"epoch {epoch}/{run.train.epochs}: {accuracies(history[-1])}, "
                f"{history[-1]['examples_per_sec']:.1f} examples/sec")


def require_classes(model: densenet_jax.DenseNetConfig, splits: dict[str, Split]) -> None:
    """ValueError, in one line, where the labels name more classes than the network has
    outputs (its logits would have no place for some of them)."""
    classes = 1 + max(int(np.max(split.labels)) for split in splits.values())
    if classes > model.num_classes:
        raise ValueError(f"the network has num_classes={model.num_classes} outputs but the data "
                         f"has {classes} classes; set --model num_classes={classes}, or leave "
                         f"it at the preset's")


def run_splits(run: RunConfig, splits: dict[str, Source]) -> tuple[Source, dict[str, Source]]:
    """The examples `run` trains on, and the splits it evaluates after each epoch: "test",
    and "val" where it holds training examples out (`--validation`)."""
    train, held_out = split_for_validation(splits["train"], run.train.validation)
    if run.train.limit_train:
        train = split_for_validation(train, max(len(train) - run.train.limit_train, 0))[0]
    return train, {"test": splits["test"], **({"val": held_out} if run.train.validation else {})}


def begin(run: RunConfig, config: StepConfig, workdir: Path, resume: bool, overwrite: bool,
          mesh: Mesh, log, lead: bool, keep: int | None = 2):
    """The workdir claimed for this run, and where training starts: a fresh state (with
    --init-from's weights if given) at epoch 0, or with `resume` the newest checkpoint
    that restores. Returns (checkpoint manager, state, epoch, data key, history so far,
    the streaming reader's saved position or None), the state and key on `mesh`."""
    checkpoint.claim(workdir, resume, overwrite, delete=lead)  # every process: all refuse alike
    mngr = checkpoint.manager(workdir, keep)
    init_key, data_key = jax.random.split(jax.random.key(run.train.seed))
    if resume:
        state, epoch, data_key, history, reader_state = checkpoint.restore(
            mngr, state_shapes(config, mesh), run.result_fields(), log=log)
        return mngr, state, epoch, replicate(data_key, mesh), history, reader_state
    state = initial_state(config, init_key)
    if run.train.init_from:
        state = load_initial_weights(state, run.train.init_from, run.model, log)
    return mngr, replicate(state, mesh), 0, replicate(data_key, mesh), [], None


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A run's training batches, from its split placed on the devices once as uint8 or read
    as training goes (train.stream), with the train step compiled for them."""

    step: Compiled
    key: jax.Array            # the run's data key: each epoch's order and each step's crops
    learning_rate: jax.Array
    num_examples: int
    batch_size: int
    epochs: int
    mesh: Mesh
    images: jax.Array | None = None   # the split on the devices, or None where streamed
    labels: jax.Array | None = None
    reader: object = None     # where streamed: grain's iterator over the run's batches

    @classmethod
    def prepare(cls, run: RunConfig, config: StepConfig, split: Source, state: TrainState,
                key: jax.Array, mesh: Mesh, streamed: bool = False, epochs_done: int = 0,
                reader_state: dict | None = None) -> "Trainer":
        """`split` on the devices, or (`streamed`) a reader of it positioned after
        `epochs_done` epochs (at `reader_state`, a saved reader's, where given)."""
        sizes = training_batch_sizes(len(split), run.train.batch_size)
        rate, metrics = replicate((learning_rate(run), zero_metrics()), mesh)
        if streamed:
            reader = iter(stream.reader(split, stream.TrainingBatches(
                key, len(split), run.train.batch_size, run.train.epochs, mesh
            ).start(epochs_done), mesh))
            reader.set_state(reader_state or {"next_index": epochs_done * len(sizes)})
            if reader.get_state().get("next_index") != epochs_done * len(sizes):
                raise checkpoint.CheckpointError(
                    f"--resume: the saved input position {reader_state} is not the end of "
                    f"epoch {epochs_done}; the checkpoint is not this run's: use another "
                    f"--workdir, or --overwrite")
            images, labels = split.read(np.arange(1))
            step = compile_train_step(config, mesh, state, metrics, images, labels, key, rate,
                                      sizes, streamed=True)
            return cls(step, key, rate, len(split), run.train.batch_size, run.train.epochs,
                       mesh, reader=reader)
        images, labels = replicate((split.images, split.labels), mesh)
        step = compile_train_step(config, mesh, state, metrics, images, labels, key, rate, sizes)
        return cls(step, key, rate, len(split), run.train.batch_size, run.train.epochs, mesh,
                   images, labels)

    @property
    def batch_sizes(self) -> list[int]:
        """The sizes of an epoch's batches, in order."""
        return training_batch_sizes(self.num_examples, self.batch_size)

    def batches(self, epoch: int):
        """Epoch `epoch`'s (images, labels, indices) as the step takes them: read as they
        are taken where streamed."""
        if self.reader is not None:
            return ((*next(self.reader), None) for _ in self.batch_sizes)
        return [(self.images, self.labels, indices) for indices in epoch_batches(
            jax.random.fold_in(self.key, epoch), self.num_examples, self.batch_size)]

    def reader_state(self) -> dict | None:
        """The streaming reader's position (saved with each checkpoint), or None."""
        return None if self.reader is None else self.reader.get_state()

    def epoch(self, state: TrainState, epoch: int, progress: bool = True
              ) -> tuple[TrainState, float, float, float]:
        """Epoch `epoch`'s steps, in its own order of the split: (state, mean loss, train
        accuracy, seconds in the steps). `progress`: a bar where stderr is a terminal."""
        metrics = replicate(zero_metrics(), self.mesh)
        batches = self.batches(epoch)
        jax.block_until_ready(state)
        start = time.perf_counter()
        # The epoch runs on the devices alone: any implicit host transfer in it is an error
        # (the streaming path places its batches explicitly).
        with jax.transfer_guard("disallow"):
            for images, labels, indices in tqdm(
                    batches, total=len(self.batch_sizes),
                    desc=f"epoch {epoch}/{self.epochs}", leave=False,
                    disable=not (progress and sys.stderr.isatty())):
                state, metrics = self.step(state, metrics, images, labels, indices, self.key,
                                           self.learning_rate)
        metrics = jax.device_get(metrics)  # waits for the last step
        seconds = time.perf_counter() - start
        count = int(metrics["count"])
        return state, float(metrics["loss_sum"]) / count, int(metrics["correct"]) / count, seconds


def diverged(loss: float, num_classes: int) -> bool:
    """Whether an epoch's mean training loss says training has diverged: not finite, or
    above 10 · ln(classes) (23 for 10 classes), ten times the loss of a uniform guess,
    which no classifier that is still learning averages over a whole epoch."""
    return not np.isfinite(loss) or loss > 10 * math.log(num_classes)


def divergence_message(loss: float, epoch: int, checkpoints) -> str:
    kept = (f"the last good checkpoint (epoch {epoch - 1}) is kept in {checkpoints}"
            if epoch > 1 else "no epoch completed, so nothing was saved")
    return (f"the loss became {loss:.4g} in epoch {epoch}, training stopped; {kept}; training "
            f"diverged: lower --lr and start again")


def device_name(mesh=None) -> str:
    """"cpu:0 (cpu)" for one device; "4 × cpu (cpu), 2 processes" for a mesh of several."""
    devices = list((mesh or data_mesh()).devices.flat)
    first = devices[0]
    if len(devices) == 1:
        return f"{first.platform}:{first.id} ({first.device_kind})"
    processes = len({d.process_index for d in devices})
    return (f"{len(devices)} × {first.platform} ({first.device_kind})"
            + (f", {processes} processes" if processes > 1 else ""))


def accuracies(record: dict) -> str:
    """"loss 0.154, train acc 0.943, test acc 0.880" (d2l's figures), then val acc if any."""
    text = (f"loss {record['loss']:.3f}, train acc {record['train_acc']:.3f}, "
            f"test acc {record['test_acc']:.3f}")
    return text + (f", val acc {record['val_acc']:.3f}" if "val_acc" in record else "")


def load_initial_weights(state: TrainState, path: str, config: densenet_jax.DenseNetConfig,
                         log=print) -> TrainState:
    """`state` with the PyTorch weights in `path`, adapted to `config` where they were made
    for other input channels or classes (densenet_jax.fine_tune_variables); says so."""
    variables, notes = densenet_jax.fine_tune_variables(path, config, state.variables)
    log(f"started from the weights in {path}" + "".join(f"; {note}" for note in notes))
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                         ema=None if state.ema is None else jax.tree.map(jnp.copy, variables))


def summary(history: list[dict], mesh=None) -> str:
    """d2l's two closing lines: the last epoch's figures, and training examples per second
    of training-step time over all epochs (compilation excluded)."""
    examples = sum(r["examples_per_sec"] * r["train_seconds"] for r in history)
    seconds = sum(r["train_seconds"] for r in history)
    return (f"{accuracies(history[-1])}\n"
            f"{examples / seconds:.1f} examples/sec on {device_name(mesh)}")


def _silent(line: str) -> None:
    """The log of processes other than 0: one voice per run."""
