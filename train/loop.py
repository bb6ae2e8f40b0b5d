"""The training loop: epochs of `train_step` over the split held on the device, an
evaluation after each, metrics, plot and checkpoint after each epoch."""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

import densenet_jax
from train import checkpoint
from train.config import RunConfig
from train.data import Split
from train.parallel import data_mesh, replicate
from train.pipeline import epoch_batches, sequential_batches
from train.plots import plot_curves
from train.steps import create_train_state, eval_step, make_optimizer, train_step, zero_metrics


class NonFiniteLossError(Exception):
    """Training diverged; the last good checkpoint is kept."""


def diverged(loss: float, num_classes: int) -> bool:
    """Whether an epoch's mean training loss says training has diverged: not finite, or
    above 10 · ln(classes) (23 for 10 classes), ten times the loss of a uniform guess,
    which no classifier that is still learning averages over a whole epoch."""
    return not np.isfinite(loss) or loss > 10 * math.log(num_classes)


def device_name(mesh=None) -> str:
    """"cpu:0 (cpu)" for one device; "4 × cpu (cpu), 2 processes" for a mesh of several."""
    devices = list((mesh or data_mesh()).devices.flat)
    first = devices[0]
    if len(devices) == 1:
        return f"{first.platform}:{first.id} ({first.device_kind})"
    processes = len({d.process_index for d in devices})
    return (f"{len(devices)} × {first.platform} ({first.device_kind})"
            + (f", {processes} processes" if processes > 1 else ""))


def confusion_matrix(state, images: jax.Array, labels: jax.Array, batches: list[jax.Array],
                     run: RunConfig, mesh) -> np.ndarray:
    """(true class, predicted class) counts in evaluation mode (BatchNorm running
    statistics), as `run` evaluates, over `batches`, which hold every example once
    (`sequential_batches`)."""
    classes = run.model.num_classes
    confusion = replicate(np.zeros((classes, classes), np.int32), mesh)
    for indices in batches:
        confusion = eval_step(state, confusion, images, labels, indices, resize=run.train.resize,
                              flip=run.recipe.test_flip, mesh=mesh)
    return np.asarray(confusion)


def evaluate(state, images: jax.Array, labels: jax.Array, batches: list[jax.Array],
             run: RunConfig, mesh) -> float:
    """Accuracy in evaluation mode over `batches` (see `confusion_matrix`)."""
    return int(np.trace(confusion_matrix(state, images, labels, batches, run, mesh))) / len(labels)


def warm_up(state, images: jax.Array, labels: jax.Array, run: RunConfig, mesh) -> float:
    """Compile `train_step` for both batch shapes of an epoch (full and last partial) on a
    copy of the state, so that no epoch's timing includes compilation; returns seconds."""
    start = time.perf_counter()
    full = min(run.train.batch_size, len(labels))
    shapes = {full, len(labels) % full or full}
    key = replicate(jax.random.key(0), mesh)
    for batch in sorted(shapes):
        copy = jax.tree.map(jnp.copy, state)  # train_step donates its state
        out = train_step(copy, replicate(zero_metrics(), mesh), images, labels,
                         replicate(np.arange(batch, dtype=np.int32), mesh), key,
                         resize=run.train.resize, recipe=run.recipe, mesh=mesh)
        jax.block_until_ready(out)
    return time.perf_counter() - start


def fit(run: RunConfig, splits: dict[str, Split], workdir: Path, resume: bool = False,
        log=print, mesh=None, overwrite: bool = False) -> list[dict]:
    """Train as `run` says, data-parallel over `mesh` (default: every device); returns one
    record per epoch (also in workdir/metrics.jsonl). A workdir holding another run's
    checkpoints is refused unless `resume` (continue it) or `overwrite` (replace it).

    In a multi-process run every process calls this alike; process 0 logs and writes the
    files, and all of them take part in the checkpoints."""
    cfg, model_cfg = run.train, run.model
    mesh = mesh or data_mesh()
    lead = jax.process_index() == 0
    log = log if lead else _silent
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.claim(workdir, resume, overwrite, delete=lead)  # every process: all refuse alike
    train_split, held_out = split_for_validation(splits["train"], cfg.validation)
    train_split = train_split.head(cfg.limit_train) if cfg.limit_train else train_split
    num_train = len(train_split)
    steps_per_epoch = math.ceil(num_train / cfg.batch_size)
    model = densenet_jax.DenseNet(model_cfg)
    optimizer = make_optimizer(run.recipe, steps_per_epoch, cfg.epochs)
    init_key, data_key = jax.random.split(jax.random.key(cfg.seed))
    state = create_train_state(model, optimizer, init_key, cfg.resize,
                               ema=bool(run.recipe.ema_decay))
    if cfg.init_from and not resume:
        state = load_initial_weights(state, cfg.init_from, model_cfg, log)
    state = replicate(state, mesh)

    mngr = checkpoint.manager(workdir)
    run_fields = run.result_fields()
    history, start_epoch = [], 0
    if resume:
        state, start_epoch, data_key, history = checkpoint.restore(mngr, state, run_fields,
                                                                   log=log)
        log(f"resumed from epoch {start_epoch} in {mngr.directory}")
    data_key = replicate(data_key, mesh)
    if lead:
        (workdir / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
        _write_metrics(workdir, history)

    # The whole split goes to every device once, as uint8.
    train_images, train_labels = replicate((train_split.images, train_split.labels), mesh)
    # Evaluated after each epoch, in an order that never changes: placed on the devices once.
    evaluated = {"test": splits["test"], **({"val": held_out} if cfg.validation else {})}
    evaluated = {name: (*replicate((split.images, split.labels), mesh),
                        sequential_batches(len(split), cfg.batch_size, mesh))
                 for name, split in evaluated.items()}
    show_progress = lead and sys.stderr.isatty()
    log("compiling train_step (tens of seconds)")
    compile_seconds = warm_up(state, train_images, train_labels, run, mesh)
    log(f"train_step compiled in {compile_seconds:.1f} s")

    with tensorboard(workdir, enabled=lead) as write_scalars:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            epoch_key = jax.random.fold_in(data_key, epoch)
            batches = epoch_batches(epoch_key, num_train, cfg.batch_size)
            metrics = replicate(zero_metrics(), mesh)
            jax.block_until_ready(state)
            start = time.perf_counter()
            # The epoch runs on the devices alone: any host transfer in it is an error.
            with jax.transfer_guard("disallow"):
                for indices in tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                                    disable=not show_progress):
                    state, metrics = train_step(state, metrics, train_images, train_labels,
                                                indices, data_key, resize=cfg.resize,
                                                recipe=run.recipe, mesh=mesh)
            metrics = jax.device_get(metrics)  # waits for the last step
            train_seconds = time.perf_counter() - start
            loss = float(metrics["loss_sum"]) / int(metrics["count"])
            if diverged(loss, model_cfg.num_classes):
                kept = (f"the last good checkpoint (epoch {epoch - 1}) is kept in "
                        f"{mngr.directory}" if epoch > 1 else
                        "no epoch completed, so nothing was saved")
                raise NonFiniteLossError(f"the loss became {loss:.4g} in epoch {epoch}, "
                                         f"training stopped; {kept}; training diverged: lower "
                                         f"--lr and start again")
            record = {"epoch": epoch, "loss": loss,
                      "train_acc": int(metrics["correct"]) / int(metrics["count"]),
                      **{f"{name}_acc": evaluate(state, images, labels, batches, run, mesh)
                         for name, (images, labels, batches) in evaluated.items()},
                      "examples_per_sec": num_train / train_seconds,
                      "train_seconds": train_seconds}
            history.append(record)
            checkpoint.save(mngr, epoch, state, data_key, history, run_fields)
            if lead:
                _write_metrics(workdir, history)
                plot_curves(history, workdir / "curves.png")
                write_scalars(record)
            log(f"epoch {epoch}/{cfg.epochs}: {accuracies(record)}, "
                f"{record['examples_per_sec']:.1f} examples/sec")
    return history


def split_for_validation(train: Split, validation: int) -> tuple[Split, Split]:
    """(training, validation) splits: the last `validation` training examples held out.
    ValueError, in one line, if that leaves nothing to train on."""
    if not 0 <= validation < len(train):
        raise ValueError(f"--validation {validation} must lie in 0..{len(train) - 1}: the "
                         f"training split has {len(train)} examples")
    return train.hold_out(validation)


def accuracies(record: dict) -> str:
    """"loss 0.154, train acc 0.943, test acc 0.880" (d2l's figures), then val acc if any."""
    text = (f"loss {record['loss']:.3f}, train acc {record['train_acc']:.3f}, "
            f"test acc {record['test_acc']:.3f}")
    return text + (f", val acc {record['val_acc']:.3f}" if "val_acc" in record else "")


def load_initial_weights(state, path: str, config: densenet_jax.DenseNetConfig, log=print):
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


# TensorBoard's, per epoch (val_acc where the run holds a validation split)
SCALARS = ("loss", "train_acc", "test_acc", "val_acc", "examples_per_sec")


@contextlib.contextmanager
def tensorboard(workdir: Path, enabled: bool = True):
    """A function that writes an epoch's record as TensorBoard scalars into `workdir`
    (`tensorboard --logdir runs/` shows every run), through tensorboardX: event files
    without TensorFlow."""
    if not enabled:
        yield lambda record: None
        return
    writer = SummaryWriter(logdir=str(workdir))

    def write(record: dict) -> None:
        for name in SCALARS:
            if name in record:
                writer.add_scalar(name, record[name], record["epoch"])
        writer.flush()

    try:
        yield write
    finally:
        writer.close()


def _silent(line: str) -> None:
    """The log of processes other than 0: one voice per run."""


def _write_metrics(workdir: Path, history: list[dict]) -> None:
    """metrics.jsonl, rewritten whole from the history so it always matches the checkpoint."""
    tmp = workdir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
    tmp.replace(workdir / "metrics.jsonl")
