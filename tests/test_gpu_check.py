"""scripts/gpu_check.sh: its smoke mode runs every step end to end on the CPU and prints the
block for docs/RESULTS.md; bad input gets one line."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def run(*args, out=None):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    if out:
        env["OUT"] = str(out)
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=3000)


@pytest.mark.slow
def test_smoke_mode_runs_every_step(data_dir, tmp_path):
    result = run("--smoke", data_dir, out=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    block = result.stdout
    assert block.startswith("### Smoke test: cpu")
    assert (tmp_path / "gpu_check.md").read_text() == block
    # Two recipe rows, four benchmark rows (both kernel sets, fp32 and bf16), two remat rows.
    assert block.count("\n| fp32 | ") == 1 and block.count("\n| bf16 | ") == 1
    for kernels in ("reference", "xla_cpu"):
        for precision in ("fp32", "bf16"):
            assert f"\n| {kernels} | {precision} | " in block
    assert "\n| False | " in block and "\n| True | " in block and "less memory for" in block
    logs = sorted(p.name for p in (tmp_path / "gpu_check_logs").iterdir())
    assert len(logs) == 9 and "recipe_fp32.log" in logs


@pytest.mark.slow
def test_accuracy_smoke_mode_trains_both_networks_on_a_validation_split(data_dir, tmp_path):
    result = run("--accuracy", "--smoke", data_dir, out=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    block = result.stdout
    assert block.startswith("### Smoke test (accuracy): cpu")
    assert ("--recipe strong --recipe-fields ema_decay=0.999 test_flip=true --validation 5000"
            in block)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in block.splitlines()
            if line.startswith(("| d2l |", "| densenet_bc_100 |"))}
    assert sorted(rows) == ["d2l", "densenet_bc_100"]
    # every epoch finished, and each reports validation and test accuracy
    assert rows["d2l"][2] == "2" and rows["densenet_bc_100"][2] == "1"
    for cells in rows.values():
        assert 0.0 <= float(cells[5]) <= 1.0 and 0.0 <= float(cells[6]) <= 1.0
    assert rows["d2l"][9].count(" / ") == 2
    logs = sorted(p.name for p in (tmp_path / "gpu_check_logs").iterdir())
    assert logs == ["accuracy_d2l.log", "accuracy_densenet_bc_100.log", "environment.log"]


@pytest.fixture
def gpu_check(monkeypatch):
    """scripts/gpu_check.py as a module (dataclasses look their module up in sys.modules)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT.with_suffix(".py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)
    spec.loader.exec_module(module)
    return module


def test_an_accuracy_run_stopped_by_its_limit_reports_the_epochs_it_finished(gpu_check,
                                                                             tmp_path):
    record = {"loss": 0.7, "train_acc": 0.9, "val_acc": 0.91, "test_acc": 0.905,
              "examples_per_sec": 12345.6}

    def fake_run(name, args, timeout):  # d2l's run finishes 2 epochs of 30, then stops
        workdir = Path(args[args.index("--workdir") + 1])
        workdir.mkdir()
        if name == "accuracy_d2l":
            (workdir / "metrics.jsonl").write_text(2 * (json.dumps(record) + "\n"))
            return gpu_check.Step(name, None, 270.0, "epoch 2/30: ...\ntimed out")
        return gpu_check.Step(name, 1, 3.0, "error: out of memory")

    rows = gpu_check.accuracy_rows(fake_run, tmp_path / "data", tmp_path, gpu_check.FULL)
    assert rows[2] == ("| d2l | `--resize 96` | 2 of 30 (stopped by its time limit) | 0.700 | "
                       "0.900 | 0.910 | 0.905 | 12,346 | 270 s | 0.910 / 0.905, 0.910 / 0.905 |")
    assert rows[3].startswith("| densenet_bc_100 | `--preset densenet_bc_100 --resize 32` | "
                              "failed: error: out of memory |")
    assert all(row.count("|") == 11 for row in rows)


def test_missing_data_is_one_line(tmp_path):
    result = run("--smoke", tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path} lacks train-images-idx3-ubyte.gz")
    assert result.stderr.count("\n") == 1 and not result.stdout


def test_the_full_check_needs_an_accelerator(data_dir):
    result = run(data_dir)  # this machine's JAX has the CPU only
    assert result.returncode == 1
    assert "JAX sees no accelerator here, only the CPU" in result.stderr
    assert "Traceback" not in result.stderr
