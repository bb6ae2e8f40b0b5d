"""scripts/gpu_check.sh: its smoke mode runs every step end to end on the CPU and prints the
block for docs/RESULTS.md; bad input gets one line."""
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
