"""train.evaluate on a trained run: the accuracy training logged, per class, and the picture."""
import json

import numpy as np
import pytest

from train import evaluate
from train.data import CLASS_NAMES


def logged(workdir, epoch: int) -> float:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return records[epoch - 1]["test_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [None, 2])
def test_evaluation_repeats_the_logged_accuracy(trained, tmp_path, capsys, epoch):
    out = tmp_path / "confusion.png"
    args = ["--workdir", str(trained), "--out", str(out)]
    assert evaluate.main(args + (["--epoch", str(epoch)] if epoch else [])) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = logged(trained, epoch or 3)
    assert lines[0] == (f"test acc {expected:.4f} after epoch {epoch or 3} of {trained} "
                        f"(training logged {expected:.4f})")
    rows = [line.rsplit(None, 2) for line in lines[2:12]]
    assert [name.strip() for name, _, _ in rows] == list(CLASS_NAMES)
    assert sum(int(count) for _, _, count in rows) == 10_000  # the whole test split
    correct = sum(float(acc) * int(count) for _, acc, count in rows)
    assert abs(correct / 10_000 - expected) < 0.002  # per-class figures are rounded
    assert lines[-1] == f"confusion matrix: {out}" and out.read_bytes()[:4] == b"\x89PNG"


def test_confusion_matrix_counts_true_by_predicted():
    confusion = np.array([[3, 1], [0, 4]])
    assert evaluate.class_table(confusion, ["a", "b"]) == [
        "class  accuracy  examples", "a         0.750         4", "b         1.000         4"]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--epoch", "1"], "--epoch 1 is not saved in"),  # two are kept: 2 and 3
    (["--out", "/proc/x.png"], "cannot write /proc/x.png"),
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
