"""Checkpoints with orbax: after each epoch, the train state, the epoch, the RNG key and
the metrics so far. Orbax writes into a temporary folder and renames it when complete, so
an interrupted save leaves the previous checkpoint as the latest."""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from train.config import without_computation_fields
from train.steps import TrainState, checkpoint_tree, replace_from_tree


class CheckpointError(Exception):
    """No checkpoint to resume, or one of another run; the message says what to do."""


def manager(workdir: Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def save(mngr: ocp.CheckpointManager, epoch: int, state: TrainState, key: jax.Array,
         history: list[dict], run_fields: dict) -> None:
    meta = {"epoch": epoch, "history": history, "config": run_fields,
            "key": jax.random.key_data(key).tolist()}
    mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(checkpoint_tree(state)),
                                             meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, state: TrainState, run_fields: dict
            ) -> tuple[TrainState, int, jax.Array, list[dict]]:
    """(state, last complete epoch, RNG key, metrics history) of the latest checkpoint."""
    epoch = mngr.latest_step()
    if epoch is None:
        raise CheckpointError(f"--resume: no checkpoint in {mngr.directory}; start without "
                              f"--resume, or point --workdir at the run to continue")
    meta = mngr.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = without_computation_fields(meta["config"])
    if saved != run_fields:
        differences = _differences(saved, run_fields)
        raise CheckpointError(f"--resume: the checkpoint in {mngr.directory} is of another "
                              f"configuration ({'; '.join(differences[:3])}); rerun with the "
                              f"same settings or use another --workdir")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpoint_tree(state))
    tree = mngr.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
    key = jax.random.wrap_key_data(jax.numpy.asarray(meta["key"], dtype="uint32"))
    return replace_from_tree(state, tree), epoch, key, meta["history"]


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for name in sorted(set(saved) | set(current)):
        a, b = saved.get(name), current.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{name}.")
        elif a != b:
            out.append(f"{prefix}{name} was {a!r}, now {b!r}")
    return out
