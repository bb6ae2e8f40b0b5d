"""The benchmark runs (quick mode) and ends with its JSON line; timings are not asserted."""
import functools
import json

import pytest

from train import bench


QUICK = ["--batch", "8", "--resize", "32", "--steps", "1", "--repeats", "2", "--peak-size", "256"]


@pytest.mark.slow
def test_quick_benchmark_prints_every_setting_and_its_json_line(capsys, monkeypatch):
    import torch

    # torch.compile as the benchmark calls it, with TorchDynamo's capture but without
    # inductor's code generation (most of a minute on 2 cores, and PyTorch's to test).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    assert bench.main(QUICK) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"device", "preset", "batch", "resize", "precision", "kernels",
                           "remat", "jax_examples_per_sec", "torch_examples_per_sec",
                           "torch_channels_last_examples_per_sec",
                           "torch_compile_examples_per_sec", "ratio", "best_torch", "ratio_best",
                           "compile_seconds", "torch_compile_seconds", "peak_bytes",
                           "flops_per_example", "matmul_peak_flops", "peak_fraction"}
    assert result["batch"] == 8 and result["preset"] == "d2l" and result["precision"] == "fp32"
    assert result["kernels"] == "xla_cpu" and result["remat"] is False  # auto, on the CPU
    rates = {"eager": result["torch_examples_per_sec"],
             "channels_last": result["torch_channels_last_examples_per_sec"],
             "compile": result["torch_compile_examples_per_sec"]}
    assert result["jax_examples_per_sec"] > 0 and all(rate > 0 for rate in rates.values())
    assert result["best_torch"] in rates and result["ratio_best"] <= result["ratio"]
    assert result["peak_bytes"] > 0 and result["compile_seconds"] > 0
    assert result["torch_compile_seconds"] > 0
    # d2l's step at 32×32: about 62 MFLOP per example (forward and backward).
    assert 40e6 < result["flops_per_example"] < 90e6
    assert set(result["peak_fraction"]) == {"jax", *rates}
    assert 0 < result["peak_fraction"]["jax"] < 1
    table = "\n".join(lines)
    for name in ("ours (jax)", "torch eager NCHW", "torch eager channels-last", "torch.compile",
                 "ratio_best ours/", "matrix-product peak"):
        assert name in table


def test_ratios_of_the_medians():
    median = {"jax": 100.0, "eager": 50.0, "channels_last": 80.0, "compile": 20.0}
    result = bench.ratios(median, flops_per_example=2e6, peak_flops=1e9)
    assert (result["ratio"], result["best_torch"], result["ratio_best"]) == (2.0, "channels_last",
                                                                              1.25)
    assert result["torch_channels_last_examples_per_sec"] == 80.0
    assert result["peak_fraction"] == {"jax": 0.2, "eager": 0.1, "channels_last": 0.16,
                                       "compile": 0.04}
    alone = bench.ratios({"jax": 100.0}, flops_per_example=2e6, peak_flops=1e9)
    assert (alone["ratio"], alone["best_torch"], alone["ratio_best"]) == (None, None, None)
    compiled_only = bench.ratios({"jax": 30.0, "compile": 60.0}, 1.0, 1.0)
    assert (compiled_only["ratio"], compiled_only["ratio_best"]) == (None, 0.5)


@pytest.mark.slow
def test_a_setting_pytorch_cannot_run_is_left_out_with_one_line(capsys, monkeypatch):
    import torch

    def no_compiler(model):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", no_compiler)
    assert bench.main([*QUICK, "--torch", "eager", "compile"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert ("torch.compile: not available here (RuntimeError: no C++ compiler found)"
            in lines)
    result = json.loads(lines[-1])
    assert result["torch_compile_examples_per_sec"] is None
    assert result["torch_channels_last_examples_per_sec"] is None  # not asked for
    assert result["best_torch"] == "eager" and result["ratio_best"] == result["ratio"]


@pytest.mark.slow
def test_no_torch_times_ours_alone(capsys):
    assert bench.main([*QUICK, "--no-torch", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["torch_examples_per_sec"] is None and result["ratio_best"] is None
    assert set(result["peak_fraction"]) == {"jax"}


@pytest.mark.slow
def test_benchmark_with_reference_kernels_remat_and_bf16(capsys):
    assert bench.main(["--preset", "densenet121", "--model", "block_config=2,2", "--batch",
                       "4", "--resize", "32", "--steps", "1", "--repeats", "1", "--kernels",
                       "reference", "--remat", "--precision", "bf16", "--torch", "eager",
                       "--peak-size", "256"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("densenet121 block_config=2,2, batch 4, resize 32, bf16, "
                               "reference kernels, remat, ")
    result = json.loads(lines[-1])
    assert (result["kernels"], result["remat"], result["precision"]) == ("reference", True, "bf16")
    assert result["jax_examples_per_sec"] > 0 and result["torch_examples_per_sec"] > 0


def test_benchmark_rejects_bad_input(capsys):
    assert bench.main(["--resize", "20", "--no-torch"]) == 1
    assert "--resize 20 is below this network's minimum input size 29" in capsys.readouterr().err
    assert bench.main(["--batch", "0"]) == 1
    assert "--batch must be positive" in capsys.readouterr().err
    assert bench.main(["--peak-size", "0", "--no-torch"]) == 1
    assert "--peak-size must be positive" in capsys.readouterr().err
