"""The benchmark runs (quick mode) and ends with its JSON line; timings are not asserted."""
import json

import pytest

from train import bench


@pytest.mark.slow
def test_quick_benchmark_prints_its_json_line(capsys):
    assert bench.main(["--batch", "8", "--resize", "32", "--steps", "1", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"device", "preset", "batch", "resize", "precision", "kernels",
                           "remat", "jax_examples_per_sec", "torch_examples_per_sec", "ratio",
                           "compile_seconds", "peak_bytes"}
    assert result["batch"] == 8 and result["preset"] == "d2l" and result["precision"] == "fp32"
    assert result["kernels"] == "xla_cpu" and result["remat"] is False  # auto, on the CPU
    assert result["jax_examples_per_sec"] > 0 and result["torch_examples_per_sec"] > 0
    assert abs(result["ratio"] - result["jax_examples_per_sec"]
               / result["torch_examples_per_sec"]) < 1e-9
    assert result["peak_bytes"] > 0 and result["compile_seconds"] > 0


@pytest.mark.slow
def test_benchmark_with_reference_kernels_remat_and_bf16(capsys):
    assert bench.main(["--preset", "densenet121", "--batch", "4", "--resize", "32", "--steps",
                       "1", "--repeats", "1", "--kernels", "reference", "--remat",
                       "--precision", "bf16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["kernels"], result["remat"], result["precision"]) == ("reference", True, "bf16")
    assert result["jax_examples_per_sec"] > 0 and result["torch_examples_per_sec"] > 0


def test_benchmark_rejects_bad_input(capsys):
    assert bench.main(["--resize", "20", "--no-torch"]) == 1
    assert "--resize 20 is below this network's minimum input size 29" in capsys.readouterr().err
    assert bench.main(["--batch", "0"]) == 1
    assert "--batch must be positive" in capsys.readouterr().err
