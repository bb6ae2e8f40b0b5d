"""The training loop: epochs of `train_step` over the split held on the device, an
evaluation after each, metrics, plot and checkpoint after each epoch."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import densenet_jax
from train import checkpoint
from train.config import RunConfig
from train.data import Split
from train.pipeline import epoch_batches, sequential_batches
from train.plots import plot_curves
from train.steps import create_train_state, eval_step, make_optimizer, train_step, zero_metrics


class NonFiniteLossError(Exception):
    """Training diverged; the last good checkpoint is kept."""


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{device.id} ({device.device_kind})"


def evaluate(state, images: jax.Array, labels: jax.Array, batch_size: int, resize: int) -> float:
    """Test accuracy in evaluation mode (BatchNorm running statistics)."""
    correct = jnp.zeros((), jnp.int32)
    for indices in sequential_batches(len(labels), batch_size):
        correct = eval_step(state, correct, images, labels, indices, resize=resize)
    return int(correct) / len(labels)


def warm_up(state, images: jax.Array, labels: jax.Array, run: RunConfig) -> float:
    """Compile `train_step` for both batch shapes of an epoch (full and last partial) on a
    copy of the state, so that no epoch's timing includes compilation; returns seconds."""
    start = time.perf_counter()
    full = min(run.train.batch_size, len(labels))
    shapes = {full, len(labels) % full or full}
    for batch in sorted(shapes):
        copy = jax.tree.map(jnp.copy, state)  # train_step donates its state
        out = train_step(copy, zero_metrics(), images, labels, jnp.arange(batch),
                         jax.random.key(0), resize=run.train.resize, recipe=run.recipe)
        jax.block_until_ready(out)
    return time.perf_counter() - start


def fit(run: RunConfig, splits: dict[str, Split], workdir: Path, resume: bool = False,
        log=print) -> list[dict]:
    """Train as `run` says; returns one record per epoch (also in workdir/metrics.jsonl)."""
    cfg, model_cfg = run.train, run.model
    train_split = splits["train"].head(cfg.limit_train) if cfg.limit_train else splits["train"]
    num_train = len(train_split)
    steps_per_epoch = math.ceil(num_train / cfg.batch_size)
    model = densenet_jax.DenseNet(model_cfg)
    optimizer = make_optimizer(run.recipe, steps_per_epoch, cfg.epochs)
    init_key, data_key = jax.random.split(jax.random.key(cfg.seed))
    state = create_train_state(model, optimizer, init_key, cfg.resize)

    workdir.mkdir(parents=True, exist_ok=True)
    mngr = checkpoint.manager(workdir)
    run_fields = run.result_fields()
    history, start_epoch = [], 0
    if resume:
        state, start_epoch, data_key, history = checkpoint.restore(mngr, state, run_fields)
        log(f"resumed from epoch {start_epoch} in {mngr.directory}")
    (workdir / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    _write_metrics(workdir, history)

    # The whole split goes to the device once, as uint8.
    train_images, train_labels = jnp.asarray(train_split.images), jnp.asarray(train_split.labels)
    test_images, test_labels = jnp.asarray(splits["test"].images), jnp.asarray(splits["test"].labels)
    show_progress = sys.stderr.isatty()
    compile_seconds = warm_up(state, train_images, train_labels, run)
    log(f"train_step compiled in {compile_seconds:.1f} s")

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        epoch_key = jax.random.fold_in(data_key, epoch)
        batches = epoch_batches(epoch_key, num_train, cfg.batch_size)
        metrics = zero_metrics()
        jax.block_until_ready(state)
        start = time.perf_counter()
        for step, indices in enumerate(tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}",
                                            leave=False, disable=not show_progress)):
            state, metrics = train_step(state, metrics, train_images, train_labels, indices,
                                        jax.random.fold_in(epoch_key, step), resize=cfg.resize,
                                        recipe=run.recipe)
        metrics = jax.device_get(metrics)  # waits for the last step
        train_seconds = time.perf_counter() - start
        loss = float(metrics["loss_sum"]) / int(metrics["count"])
        if not np.isfinite(loss):
            kept = (f"the last good checkpoint (epoch {epoch - 1}) is kept in {mngr.directory}"
                    if epoch > 1 else "no epoch completed, so nothing was saved")
            raise NonFiniteLossError(f"the loss became {loss} in epoch {epoch}, training "
                                     f"stopped; {kept}; lower --lr and start again")
        record = {"epoch": epoch, "loss": loss,
                  "train_acc": int(metrics["correct"]) / int(metrics["count"]),
                  "test_acc": evaluate(state, test_images, test_labels, cfg.batch_size, cfg.resize),
                  "examples_per_sec": num_train / train_seconds,
                  "train_seconds": train_seconds}
        history.append(record)
        checkpoint.save(mngr, epoch, state, data_key, history, run_fields)
        _write_metrics(workdir, history)
        plot_curves(history, workdir / "curves.png")
        log(f"epoch {epoch}/{cfg.epochs}: loss {loss:.3f}, train acc {record['train_acc']:.3f}, "
            f"test acc {record['test_acc']:.3f}, {record['examples_per_sec']:.1f} examples/sec")
    return history


def summary(history: list[dict]) -> str:
    """d2l's two closing lines: the last epoch's figures, and training examples per second
    of training-step time over all epochs (compilation excluded)."""
    last = history[-1]
    examples = sum(r["examples_per_sec"] * r["train_seconds"] for r in history)
    seconds = sum(r["train_seconds"] for r in history)
    return (f"loss {last['loss']:.3f}, train acc {last['train_acc']:.3f}, "
            f"test acc {last['test_acc']:.3f}\n"
            f"{examples / seconds:.1f} examples/sec on {device_name()}")


def _write_metrics(workdir: Path, history: list[dict]) -> None:
    """metrics.jsonl, rewritten whole from the history so it always matches the checkpoint."""
    tmp = workdir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
    tmp.replace(workdir / "metrics.jsonl")
