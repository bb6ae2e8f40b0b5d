"""train.evaluate on a trained run: the accuracy training logged, per class, and the picture."""
import json

import numpy as np
import pytest

from train import evaluate
from train.config import RecipeConfig, RunConfig, TrainConfig
from train.data import CLASS_NAMES, Split
from train.steps import TrainState


def logged(workdir, epoch: int, split: str = "test") -> float:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return records[epoch - 1][f"{split}_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [None, 2])
def test_evaluation_repeats_the_logged_accuracy(trained, tmp_path, capsys, epoch):
    out = tmp_path / "confusion.png"
    args = ["--workdir", str(trained), "--out", str(out)]
    assert evaluate.main(args + (["--epoch", str(epoch)] if epoch else [])) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = logged(trained, epoch or 3)
    assert lines[2].startswith("input: 7.5 MiB of images, held on the devices (the device limit")
    assert lines[:2] + lines[3:5] == [
        f"loading {f'epoch {epoch}' if epoch else 'the last epoch'} of {trained}",
        "loading Fashion-MNIST (idx)", "compiling the eval step",
        "evaluating 10,000 test images"]  # what each wait is
    lines = lines[5:]
    assert lines[0] == (f"test acc {expected:.4f} after epoch {epoch or 3} of {trained} with "
                        f"the trained weights, no flip (training logged {expected:.4f})")
    rows = [line.rsplit(None, 2) for line in lines[2:12]]
    assert [name.strip() for name, _, _ in rows] == list(CLASS_NAMES)
    assert sum(int(count) for _, _, count in rows) == 10_000  # the whole test split
    correct = sum(float(acc) * int(count) for _, acc, count in rows)
    assert abs(correct / 10_000 - expected) < 0.002  # per-class figures are rounded
    assert lines[-1] == f"confusion matrix: {out}" and out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_second_evaluation_compiles_nothing(trained, tmp_path, compilations):
    assert evaluate.main(["--workdir", str(trained), "--out", str(tmp_path / "first.png")]) == 0
    compiled = len(compilations())
    assert evaluate.main(["--workdir", str(trained), "--out", str(tmp_path / "again.png")]) == 0
    assert compilations()[compiled:] == []


@pytest.mark.slow
def test_the_validation_split_repeats_the_logged_val_acc(trained, tmp_path, capsys):
    assert evaluate.main(["--workdir", str(trained), "--split", "val",
                          "--out", str(tmp_path / "c.png")]) == 0
    lines = capsys.readouterr().out.splitlines()[5:]  # after what each wait is
    expected = logged(trained, 3, "val")
    assert lines[0].startswith(f"val acc {expected:.4f} after epoch 3 of {trained} with")
    assert sum(int(line.rsplit(None, 1)[1]) for line in lines[2:12]) == 256  # held out


def a_state(ema: bool) -> TrainState:
    params = {"w": np.ones(2, np.float32)}
    return TrainState(step=np.int32(0), params=params, batch_stats={}, opt_state=(),
                      ema={"params": params} if ema else None)


def test_evaluation_overrides_the_runs_moving_average_and_flip():
    run = RunConfig(recipe=RecipeConfig(ema_decay=0.9, test_flip=True))
    same_run, same_state = evaluate.evaluated_as(run, state := a_state(ema=True), None, None)
    assert same_run == run and same_state.ema is state.ema
    assert evaluate.settings(same_run, same_state) == "moving average, flip-averaged"
    raw_run, raw_state = evaluate.evaluated_as(run, state, False, False)
    assert raw_state.ema is None and raw_state.eval_variables["params"] is state.params
    assert not raw_run.recipe.test_flip and raw_run.recipe.ema_decay == 0.9
    assert evaluate.settings(raw_run, raw_state) == "trained weights, no flip"
    assert evaluate.evaluated_as(RunConfig(), a_state(ema=False), None, True)[0].recipe.test_flip


def test_evaluation_refuses_what_the_run_does_not_hold():
    with pytest.raises(ValueError, match="kept no moving average of its weights .*drop --ema"):
        evaluate.evaluated_as(RunConfig(), a_state(ema=False), True, None)
    splits = {"train": Split(np.zeros((10, 28, 28, 1), np.uint8), np.arange(10)),
              "test": Split(np.zeros((4, 28, 28, 1), np.uint8), np.arange(4))}
    with pytest.raises(ValueError, match="held out no validation split .*use --split test"):
        evaluate.split_of(RunConfig(), splits, "val")
    held_out = evaluate.split_of(RunConfig(train=TrainConfig(validation=3)), splits, "val")
    assert held_out.labels.tolist() == [7, 8, 9]
    assert evaluate.split_of(RunConfig(), splits, "test") is splits["test"]


def test_confusion_matrix_counts_true_by_predicted():
    confusion = np.array([[3, 1], [0, 4]])
    assert evaluate.class_table(confusion, ["a", "b"]) == [
        "class  accuracy  examples", "a         0.750         4", "b         1.000         4"]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--epoch", "1"], "--epoch 1 is not saved in"),  # two are kept: 2 and 3
    (["--out", "/proc/x.png"], "cannot write /proc/x.png"),
    (["--ema"], "this run kept no moving average of its weights"),
])
def test_bad_evaluation_requests_are_one_line(trained, capsys, args, message):
    assert evaluate.main(["--workdir", str(trained), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    assert evaluate.main(["--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} holds no readable training run") and \
        err.count("\n") == 1
