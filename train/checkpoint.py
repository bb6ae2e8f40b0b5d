"""Checkpoints with orbax: after each epoch, the train state, the epoch, the RNG key and
the metrics so far. Orbax writes into a temporary folder and renames it when complete, so
an interrupted save leaves the previous checkpoint as the latest."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.build import state_shapes, step_config
from train.config import RunConfig, without_computation_fields
from train.parallel import data_mesh
from train.steps import TrainState, checkpoint_tree, replace_from_tree


class CheckpointError(Exception):
    """No checkpoint to resume, or one of another run; the message says what to do."""


class DamagedCheckpointError(Exception):
    """A checkpoint whose arrays are not the ones saved."""


_HELD: set[Path] = set()  # the lock files this process holds


@contextlib.contextmanager
def hold(workdir: Path, process: int | None = None):
    """`workdir` held by this process for the length of a run, so that a second trainer
    started on it is refused in one line (CheckpointError) instead of mixing two runs.
    An OS lock (flock) on workdir/.lock-P, P the process's index in its run (`process`, by
    default jax.process_index()): the OS releases it when the process ends, however it
    ends, so a killed run leaves nothing stuck, and every process of a second multi-process
    run is refused alike. Holding it again inside the first hold does nothing."""
    path = (workdir / f".lock-{jax.process_index() if process is None else process}").absolute()
    if path in _HELD:
        yield
        return
    with open(path, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip()
            raise CheckpointError(
                f"{workdir} is in use by another training run"
                f"{f' (process {holder})' if holder.isdigit() else ''}; wait for it to end, "
                f"or choose another --workdir") from None
        file.truncate(0)
        file.write(str(os.getpid()))
        file.flush()
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)
            fcntl.flock(file, fcntl.LOCK_UN)


def require_run(workdir: Path, run_fields: dict) -> None:
    """CheckpointError, in one line, where `workdir` cannot hold a run to --resume with
    `run_fields` (`RunConfig.result_fields`): it does not exist, or its config.json is of
    another run. Cheap: checked before anything is built (the checkpoints are checked
    when restored)."""
    if not workdir.is_dir():
        raise CheckpointError(f"--resume: {workdir} does not exist; point --workdir at the "
                              f"run to continue, or start without --resume")
    if (saved := saved_run(workdir)) is None:
        return  # no run's files yet (stopped while compiling): the checkpoints will say
    require_same_run(saved.result_fields(), run_fields, f"the run in {workdir}")


def saved_run(workdir: Path) -> RunConfig | None:
    """The run a workdir's config.json describes, or None where there is none to read."""
    try:
        return RunConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def require_same_run(saved: dict, run_fields: dict, what: str) -> None:
    """CheckpointError, in one line naming `what` and the first differences, unless the
    saved run's fields equal `run_fields` (its epochs changed as `with_epochs` allows)."""
    saved = with_epochs(saved, run_fields)
    if saved != run_fields:
        differences = _differences(saved, run_fields)
        raise CheckpointError(f"--resume: {what} is of another configuration "
                              f"({'; '.join(differences[:3])}); rerun with the same settings "
                              f"or use another --workdir")


def manager(workdir: Path, keep: int | None = 2) -> ocp.CheckpointManager:
    """The checkpoints in workdir/checkpoints, of which saving keeps the last `keep`
    (None: every one)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
    with _quiet("absl"):  # as in `restore`
        return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def saved_epochs(workdir: Path) -> list[int]:
    """The epochs whose checkpoint folder is complete (orbax renames it when done)."""
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def claim(workdir: Path, resume: bool, overwrite: bool, delete: bool = True) -> None:
    """Make sure a new run never mixes with an old one in `workdir`: without --resume, a
    workdir holding checkpoints is refused, or emptied with --overwrite (by the process
    that `delete`s, one per run)."""
    epochs = saved_epochs(workdir)
    if resume or not epochs or (overwrite and not delete):
        return
    if not overwrite:
        raise CheckpointError(
            f"{workdir} already holds a run (checkpoints up to epoch {epochs[-1]}); continue "
            f"it with --resume, choose another --workdir, or replace it with --overwrite")
    shutil.rmtree(workdir / "checkpoints")
    for name in ("metrics.jsonl", "curves.png", "config.json"):
        (workdir / name).unlink(missing_ok=True)
    for events in workdir.glob("events.out.tfevents.*"):  # TensorBoard's
        events.unlink()


def save(mngr: ocp.CheckpointManager, epoch: int, state: TrainState, key: jax.Array,
         history: list[dict], run_fields: dict, reader_state: dict | None = None) -> None:
    """Epoch `epoch`'s checkpoint: the state's arrays, and beside them the epoch, the
    history, the run's fields, the data key, the arrays' digest and, for a streamed run,
    the input reader's position (grain's iterator state)."""
    tree = checkpoint_tree(state)
    meta = {"epoch": epoch, "history": history, "config": run_fields,
            "key": jax.random.key_data(key).tolist(), "digest": digest(tree),
            "reader": reader_state}
    ignore_late_callbacks()  # a failed save's writes end after the error is raised
    try:
        with _quiet("absl"):  # orbax logs a failed write once per thread; this says it once
            mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                     meta=ocp.args.JsonSave(meta)))
            mngr.wait_until_finished()
    except Exception as error:  # noqa: BLE001 (orbax, tensorstore, OS: all mean not saved)
        for partial in Path(mngr.directory).glob(f"{epoch}.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)  # it would hold the space
        raise CheckpointError(save_failure(epoch, error, Path(mngr.directory))) from None
    except BaseException:  # Ctrl-C or SIGTERM mid-save: the process ends as its writers fail
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        raise


def save_failure(epoch: int, error: BaseException, folder: Path) -> str:
    """One line: which checkpoint could not be written and why, what is saved, what to do."""
    text = str(error)
    why = ("the disk is full" if "No space left" in text or "os_error_code='28'" in text
           else "permission denied" if "Permission denied" in text or "os_error_code='13'" in text
           else _first_line(error))
    epochs = saved_epochs(folder.parent)
    then = (f"epochs up to {epochs[-1]} are saved there; make room or fix the folder, then "
            f"continue with the same command plus --resume" if epochs else
            "no epoch is saved yet; make room or fix the folder, then start again")
    return f"could not save epoch {epoch}'s checkpoint in {folder} ({why}); {then}"


def restore(mngr: ocp.CheckpointManager, state: TrainState, run_fields: dict, log=print
            ) -> tuple[TrainState, int, jax.Array, list[dict], dict | None]:
    """(state, last complete epoch, RNG key, metrics history, the input reader's position
    or None) of the newest checkpoint that
    restores, its arrays placed as `state`'s (shapes, `build.state_shapes`); each damaged
    one skipped is named in one line through `log`."""
    with _quiet("absl"):  # orbax logs each damaged checkpoint it meets; this says it once
        epochs = sorted(mngr.all_steps(), reverse=True)
        if not epochs:
            raise CheckpointError(f"--resume: no checkpoint in {mngr.directory}; start without "
                                  f"--resume, or point --workdir at the run to continue")
        for epoch in epochs:
            try:
                restored = _restore_epoch(mngr, epoch, state, run_fields)
            except CheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 (orbax, tensorstore, JSON: all mean damaged)
                # Moved aside, not deleted: orbax would refuse to save this epoch again.
                aside = Path(mngr.directory).parent / "damaged_checkpoints" / str(epoch)
                aside.parent.mkdir(exist_ok=True)
                shutil.rmtree(aside, ignore_errors=True)
                Path(mngr.directory, str(epoch)).rename(aside)
                log(f"skipped checkpoint {epoch}: it does not restore ({_first_line(error)}); "
                    f"moved to {aside}")
                continue
            mngr.reload()
            return restored
    raise CheckpointError(f"--resume: no checkpoint in {mngr.directory} restores (each one "
                          f"is now in {Path(mngr.directory).parent / 'damaged_checkpoints'}); "
                          f"start again without --resume")


def load_run(workdir: Path, epoch: int | None = None) -> tuple[RunConfig, TrainState, int,
                                                                list[dict]]:
    """A run's config (workdir/config.json) and its state after `epoch` (default: the last
    saved), replicated on every device, its history up to there; read only.
    CheckpointError, in one line, for a workdir without a run or without that epoch."""
    try:
        run = RunConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{workdir} holds no readable training run (config.json: "
                              f"{_first_line(error)}); pass the --workdir of a run") from None
    epochs = saved_epochs(workdir)
    if not epochs:
        raise CheckpointError(f"{workdir} holds no saved epoch yet; train first")
    if epoch is None:
        epoch = epochs[-1]
    elif epoch not in epochs:
        raise CheckpointError(f"--epoch {epoch} is not saved in {workdir / 'checkpoints'} (saved: "
                              f"{', '.join(map(str, epochs))})")
    # The schedule's length does not shape the state: one step per epoch will do.
    state = state_shapes(step_config(run, run.train.batch_size), data_mesh())
    with _quiet("absl"):
        mngr = manager(workdir)
        try:
            state, epoch, _, history, _ = _restore_epoch(mngr, epoch, state,
                                                         run.result_fields())
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 (orbax, tensorstore, JSON: all mean damaged)
            before = [e for e in epochs if e < epoch]
            other = (f"; pass --epoch {before[-1]} for the one before" if before else
                     "; no earlier epoch is saved")
            raise CheckpointError(f"checkpoint {mngr.directory / str(epoch)} does not restore "
                                  f"({_first_line(error)}){other}") from None
    return run, state, epoch, history


def with_epochs(saved: dict, run_fields: dict) -> dict:
    """The saved run's fields with this run's number of epochs, where that changes nothing
    already done: with a constant learning rate, a run continues for longer (or stops
    sooner) exactly as if started so. A schedule laid over the epochs (cosine) cannot:
    CheckpointError, in one line."""
    before, now = saved["train"]["epochs"], run_fields["train"]["epochs"]
    if before == now:
        return saved
    schedule = saved.get("recipe", {}).get("schedule", "constant")
    if schedule != "constant":
        raise CheckpointError(f"--resume with --epochs {now}: this run's {schedule} "
                              f"learning-rate schedule spans its {before} epochs, so it cannot "
                              f"be made longer or shorter; resume with --epochs {before}, or "
                              f"start a new run")
    return {**saved, "train": {**saved["train"], "epochs": now}}


def _restore_epoch(mngr: ocp.CheckpointManager, epoch: int, state: TrainState,
                   run_fields: dict) -> tuple[TrainState, int, jax.Array, list[dict],
                                              dict | None]:
    ignore_late_callbacks()  # a damaged checkpoint's reads end after the error is raised
    meta = mngr.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    require_same_run(without_computation_fields(meta["config"]), run_fields,
                     f"the checkpoint in {mngr.directory}")
    total = run_fields["train"]["epochs"]
    if meta["epoch"] == epoch == len(meta["history"]) and epoch > total:
        raise CheckpointError(f"--resume with --epochs {total}: this run already holds {epoch} "
                              f"epochs (in {mngr.directory}); resume with --epochs {epoch} or "
                              f"more, or start a new run in another --workdir")
    if not 0 < epoch <= total or meta["epoch"] != epoch or len(meta["history"]) != epoch:
        raise CheckpointError(f"--resume: checkpoint {mngr.directory / str(epoch)} claims "
                              f"epoch {meta['epoch']} of a {total}-epoch run; it is not this "
                              f"run's: use another --workdir, or --overwrite")
    tree = mngr.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(checkpoint_tree(state))))["state"]
    if "digest" in meta and digest(tree) != meta["digest"]:  # older checkpoints have none
        raise DamagedCheckpointError("its arrays are not the ones saved (their digest differs)")
    key = jax.random.wrap_key_data(jax.numpy.asarray(meta["key"], dtype="uint32"))
    return replace_from_tree(state, tree), epoch, key, meta["history"], meta.get("reader")


def digest(tree) -> str:
    """SHA-256 of `tree`'s arrays (replicated: each process reads its own copy), their
    paths, dtypes and shapes: saved with a checkpoint and checked when it is restored, so
    that damaged bytes which still decode are caught."""
    sha = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        sha.update(f"{jax.tree_util.keystr(path)}:{array.dtype}{array.shape}".encode())
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


# What orbax's reads and writes, left in flight by a failed restore or save (or by an
# interpreter shutting down), raise when they complete after its event loop has closed.
_LATE_CALLBACK_ERRORS = ("Event loop is closed", "cannot schedule new futures after shutdown",
                         "cannot schedule new futures after interpreter shutdown")


def ignore_late_callbacks() -> None:
    """From now on in this process, leave unprinted what orbax's reads and writes left in
    flight by a failed or interrupted restore or save raise when they end later: errors of
    callbacks into its closed event loop (`_LATE_CALLBACK_ERRORS`), of its abandoned
    coroutines, and the warnings about those never awaited.
    Python would print each as a traceback after the one line that says what failed;
    everything else is printed as before."""
    if getattr(sys.unraisablehook, "ignores_late_callbacks", False):
        return
    unraisable_hook, except_hook = sys.unraisablehook, sys.excepthook

    def late(error: BaseException | None, source=None) -> bool:
        code = getattr(source, "cr_code", None)
        return ((isinstance(error, RuntimeError) and str(error) in _LATE_CALLBACK_ERRORS)
                or (code is not None and "orbax" in code.co_filename))

    def on_unraisable(unraisable) -> None:
        if not late(unraisable.exc_value, unraisable.object):
            unraisable_hook(unraisable)

    def on_uncaught(kind, error, traceback) -> None:  # tensorstore's callbacks print so
        if not late(error):
            except_hook(kind, error, traceback)

    def on_thread_error(args) -> None:  # orbax's writer threads at shutdown
        if not late(args.exc_value):
            thread_hook(args)

    on_unraisable.ignores_late_callbacks = True
    # The coroutines and tasks of a failed or interrupted restore or save, collected later.
    # This project has none of its own.
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                            category=RuntimeWarning)
    logging.getLogger("asyncio").addFilter(
        lambda record: "exception was never retrieved" not in record.getMessage())
    thread_hook = threading.excepthook
    sys.unraisablehook, sys.excepthook = on_unraisable, on_uncaught
    threading.excepthook = on_thread_error


@contextlib.contextmanager
def _quiet(logger_name: str):
    """The named logger silenced below CRITICAL, for the duration."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for name in sorted(set(saved) | set(current)):
        a, b = saved.get(name), current.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{name}.")
        elif a != b:
            out.append(f"{prefix}{name} was {a!r}, now {b!r}")
    return out
