"""The benchmark runs (quick mode) and ends with its JSON line; timings are not asserted."""
import json

from train import bench


def test_quick_benchmark_prints_its_json_line(capsys):
    assert bench.main(["--batch", "8", "--resize", "32", "--steps", "1", "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"device", "preset", "batch", "resize", "precision",
                           "jax_examples_per_sec", "torch_examples_per_sec", "ratio",
                           "compile_seconds", "peak_bytes"}
    assert result["batch"] == 8 and result["preset"] == "d2l" and result["precision"] == "fp32"
    assert result["jax_examples_per_sec"] > 0 and result["torch_examples_per_sec"] > 0
    assert abs(result["ratio"] - result["jax_examples_per_sec"]
               / result["torch_examples_per_sec"]) < 1e-9
    assert result["peak_bytes"] > 0 and result["compile_seconds"] > 0


def test_benchmark_rejects_bad_input(capsys):
    assert bench.main(["--resize", "20", "--no-torch"]) == 1
    assert "--resize 20 is below this network's minimum input size 29" in capsys.readouterr().err
    assert bench.main(["--batch", "0"]) == 1
    assert "--batch must be positive" in capsys.readouterr().err
