"""Benchmark: our `train_step` against the PyTorch reference, in one process.

    python -m train.bench --preset d2l --batch 256 --resize 32
    python -m train.bench --end-to-end --data-dir DIR     # one epoch of train.main's work

Times full training steps (forward, backward, SGD update, BatchNorm update; the batch
gathered, converted and resized on the device) after warm-up and compilation, alternating
ours with PyTorch (same batch, resize, threads and precision) in each of its settings: eager
in NCHW, eager in channels-last and `torch.compile`, over several repeats, and reports
medians, each one's ratio against the fastest and its share of this machine's matrix-product
peak. The last line is JSON: `ratio` is ours over PyTorch eager NCHW, `ratio_best` ours over
the fastest PyTorch setting.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import densenet_jax
from train import data, datasets
from train.config import RECIPES, RunConfig, TrainConfig
from train.host import configure_host
from train.loop import device_name, fit
from train.main import PRECISIONS, add_model_flags, model_config, require_positive
from train.parallel import data_mesh, initialize_distributed, replicate
from train.build import compile_train_step, initial_state, learning_rate, step_config
from train.steps import zero_metrics


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--resize", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch", nargs="*", default=list(TORCH_SETTINGS),
                        choices=TORCH_SETTINGS, metavar="SETTING",
                        help="PyTorch settings to time: eager (NCHW), channels_last (eager), "
                             "compile (torch.compile, inductor); none: time ours only "
                             "(default: all)")
    parser.add_argument("--no-torch", dest="torch", action="store_const", const=[],
                        help="time ours only (as --torch with no setting)")
    parser.add_argument("--peak-size", type=int, default=4096,
                        help="side of the square matrix product that measures the peak")
    parser.add_argument("--end-to-end", action="store_true",
                        help="one epoch of train.main (data pipeline included) instead")
    parser.add_argument("--data-dir", help="--end-to-end: the Fashion-MNIST folder, or where "
                                           "--dataset is prepared")
    parser.add_argument("--dataset", default="fashion_mnist",
                        help="--end-to-end: the data set, as train.main's --dataset")
    parser.add_argument("--data-source", default="idx", choices=data.SOURCES,
                        help="--end-to-end: as train.main's --data-source")
    parser.add_argument("--input", default="device", choices=data.INPUTS,
                        help="--end-to-end: hold the splits on the devices, or stream them "
                             "(train.stream)")
    return parser.parse_args(argv)


class JaxSteps:
    """`steps` calls of the project's train_step on a batch held on the devices, split
    over all of them as train.main splits it."""

    def __init__(self, config: densenet_jax.DenseNetConfig, batch: int, resize: int, mesh):
        rng = np.random.default_rng(0)
        run = RunConfig(model=config, recipe=RECIPES["d2l"],
                        train=TrainConfig(epochs=1, batch_size=batch, resize=resize))
        step = step_config(run, batch)
        (self.state, self.metrics, self.images, self.labels, self.indices, self.key,
         self.learning_rate) = replicate(
            (initial_state(step, jax.random.key(0)), zero_metrics(),
             rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8),
             rng.integers(0, 10, batch, dtype=np.int32), np.arange(batch, dtype=np.int32),
             jax.random.key(0), learning_rate(run)), mesh)
        compiled = compile_train_step(step, mesh, self.state, self.metrics, self.images,
                                      self.labels, self.key, self.learning_rate, [batch])
        self.step, self.compile_seconds = compiled.steps[batch], compiled.seconds
        self.peak_bytes = compiled.memory_bytes
        # The compiled program is one device's share of the batch.
        self.flops_per_example = (self.step.cost_analysis()["flops"]
                                  / (batch / mesh.devices.size))
        self.run(1)  # warm-up

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, self.metrics = self.step(self.state, self.metrics, self.images,
                                                 self.labels, self.indices, self.key,
                                                 self.learning_rate)
        jax.block_until_ready(self.metrics)
        return time.perf_counter() - start


TORCH_SETTINGS = ("eager", "channels_last", "compile")
TORCH_NAMES = {"eager": "torch eager NCHW", "channels_last": "torch eager channels-last",
               "compile": "torch.compile"}


class TorchSteps:
    """The same step in PyTorch (on the GPU when there is one; bf16 under autocast,
    PyTorch's mixed precision): convert, resize, forward, backward, SGD. `setting`: "eager"
    (NCHW), "channels_last" (eager, parameters and input in NHWC memory order, oneDNN's own
    layout) or "compile" (`torch.compile` of the model, inductor, compiled on the first step,
    `compile_seconds`)."""

    def __init__(self, config: densenet_jax.DenseNetConfig, batch: int, resize: int,
                 setting: str = "eager"):
        import torch

        from densenet_jax.torch_reference import reference_model, xavier_init_

        self.torch, self.resize = torch, resize
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.memory_format = (torch.channels_last if setting == "channels_last"
                              else torch.contiguous_format)
        torch.manual_seed(0)
        model = xavier_init_(reference_model(config)).train().to(device)
        model = model.to(memory_format=self.memory_format)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.model = torch.compile(model) if setting == "compile" else model
        rng = np.random.default_rng(0)
        self.images = torch.from_numpy(
            rng.integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)).to(device)
        self.labels = torch.from_numpy(rng.integers(0, 10, batch)).to(device)
        self.autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16,
                                          enabled=config.dtype == "bfloat16")
        self.compile_seconds = self.run(1)  # warm-up (and compilation)

    def run(self, steps: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        for _ in range(steps):
            x = torch.nn.functional.interpolate(self.images.float() / 255, size=self.resize,
                                                mode="bilinear", align_corners=False)
            x = x.contiguous(memory_format=self.memory_format)
            with self.autocast():
                loss = torch.nn.functional.cross_entropy(self.model(x), self.labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.synchronize()
        return time.perf_counter() - start


def torch_steps(config, batch: int, resize: int, setting: str) -> TorchSteps | None:
    """`TorchSteps` in `setting`, or None (with a line saying why) where this PyTorch
    cannot run it, e.g. `torch.compile` without a C++ compiler."""
    try:
        return TorchSteps(config, batch, resize, setting)
    except Exception as error:  # noqa: BLE001 -- any failure of an optional backend
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"{TORCH_NAMES[setting]}: not available here ({type(error).__name__}: "
              f"{reason[:200]})")
        return None


def matmul_peak(size: int, dtype: str, with_torch: bool) -> float:
    """FLOP/s of the fastest size×size matrix product this machine runs in `dtype`: JAX's
    and, when asked, PyTorch's, best of three each after one untimed product."""
    a = jax.numpy.ones((size, size), dtype)
    product = jax.jit(jax.numpy.dot).lower(a, a).compile()
    runs = [lambda: product(a, a).block_until_ready()]
    if with_torch:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        b = torch.ones((size, size), dtype=getattr(torch, dtype), device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        runs.append(lambda: (b @ b, sync()))
    best = float("inf")
    for run in runs:
        run()
        for _ in range(3):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def examples_per_sec(framework: JaxSteps | TorchSteps, steps: int, batch: int) -> float:
    """One untimed step, then `steps` timed ones. The untimed step is the first after the
    other framework's: it meets that one's leftovers in the caches and in malloc's free
    lists."""
    framework.run(1)
    return steps * batch / framework.run(steps)


def step_benchmark(args, config) -> dict:
    mesh = data_mesh()
    ours = JaxSteps(config, args.batch, args.resize, mesh)
    settings = {setting: torch_steps(config, args.batch, args.resize, setting)
                for setting in args.torch}
    settings = {setting: steps for setting, steps in settings.items() if steps}
    frameworks = {"jax": ours, **settings}
    rates = {name: [] for name in frameworks}
    for _ in range(args.repeats):  # alternated, so drifts hit all alike
        for name, framework in frameworks.items():
            rates[name].append(examples_per_sec(framework, args.steps, args.batch))
    peak = matmul_peak(args.peak_size, config.dtype, with_torch=bool(args.torch))
    median = {name: statistics.median(values) for name, values in rates.items()}
    result = {**ratios(median, ours.flops_per_example, peak * mesh.devices.size),
              "compile_seconds": ours.compile_seconds,
              "torch_compile_seconds": (settings["compile"].compile_seconds
                                        if "compile" in settings else None),
              "peak_bytes": ours.peak_bytes, "flops_per_example": ours.flops_per_example,
              "matmul_peak_flops": peak}
    print_report(rates, median, result, args.peak_size, config.dtype)
    return result


def ratios(median: dict[str, float], flops_per_example: float, peak_flops: float) -> dict:
    """From each framework's median examples/sec ("jax" and the PyTorch settings timed):
    ours and each PyTorch setting's rate, `ratio` (ours over eager NCHW), `best_torch` (the
    fastest setting), `ratio_best` (ours over it), and each one's share of `peak_flops`
    (the peak of every device together) at `flops_per_example`."""
    torch_rates = {name: rate for name, rate in median.items() if name != "jax"}
    best_torch = max(torch_rates, key=torch_rates.get) if torch_rates else None
    return {"jax_examples_per_sec": median["jax"],
            "torch_examples_per_sec": median.get("eager"),
            "torch_channels_last_examples_per_sec": median.get("channels_last"),
            "torch_compile_examples_per_sec": median.get("compile"),
            "ratio": median["jax"] / median["eager"] if "eager" in median else None,
            "best_torch": best_torch,
            "ratio_best": median["jax"] / median[best_torch] if best_torch else None,
            "peak_fraction": {name: rate * flops_per_example / peak_flops
                              for name, rate in median.items()}}


def print_report(rates: dict[str, list[float]], median: dict[str, float], result: dict,
                 peak_size: int, dtype: str) -> None:
    """The table (each setting's median, its ratio to the fastest, its share of the peak,
    every repeat) and the summary lines."""
    fastest = max(median.values())
    print(f"{'':<27}{'median ex/s':>12}{'× fastest':>10}{'of peak':>9}  per repeat")
    for name, values in rates.items():
        print(f"{'ours (jax)' if name == 'jax' else TORCH_NAMES[name]:<27}{median[name]:>12.1f}"
              f"{median[name] / fastest:>10.2f}{result['peak_fraction'][name]:>9.0%}  "
              + " ".join(f"{r:.1f}" for r in values))
    if result["ratio"]:
        print(f"ratio ours/torch eager NCHW {result['ratio']:.2f}")
    if result["best_torch"]:
        print(f"ratio_best ours/{TORCH_NAMES[result['best_torch']]} {result['ratio_best']:.2f}")
    print(f"compile {result['compile_seconds']:.1f} s"
          + (f" (torch.compile {result['torch_compile_seconds']:.1f} s)"
             if result["torch_compile_seconds"] else "")
          + f", compiled step memory {result['peak_bytes'] / 2**20:.1f} MiB")
    print(f"matrix-product peak {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s ({peak_size}², "
          f"{dtype}); our step {result['flops_per_example'] / 1e6:.1f} MFLOP per example "
          f"(XLA's count)")


def end_to_end_benchmark(args, config) -> dict:
    run = RunConfig(model=config, recipe=RECIPES["d2l"],
                    train=TrainConfig(epochs=1, batch_size=args.batch, resize=args.resize),
                    data=data.DataConfig(data_dir=args.data_dir, input=args.input,
                                         dataset=args.dataset, source=args.data_source,
                                         download=False))
    splits = datasets.open_dataset(run.data, args.resize).splits
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        history = fit(run, splits, Path(workdir))
        wall = time.perf_counter() - start
    rate = history[-1]["examples_per_sec"]
    print(f"one epoch: {rate:.1f} examples/sec in the training steps, {wall:.1f} s wall "
          f"(compilation, evaluation and checkpoint included)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak resident memory of this process: {peak:,.0f} MiB")
    return {"jax_examples_per_sec": rate, "epoch_wall_seconds": wall, "input": args.input,
            "peak_rss_mib": peak}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        require_positive(args, "batch", "resize", "steps", "repeats", "peak_size")
        config = model_config(args)
        config.require_input_size(args.resize, "--resize")
        initialize_distributed()
        kernels = densenet_jax.kernels.get_kernels(config.kernels).name
        precision = {dtype: name for name, dtype in PRECISIONS.items()}.get(config.dtype,
                                                                           config.dtype)
        print(f"{args.preset}{' ' + ' '.join(args.model) if args.model else ''}, batch "
              f"{args.batch}, resize {args.resize}, {precision}, {kernels} kernels"
              f"{', remat' if config.remat else ''}, {os.cpu_count()} CPU threads, "
              f"{device_name()}")
        result = (end_to_end_benchmark if args.end_to_end else step_benchmark)(args, config)
    except (ValueError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"device": device_name(), "preset": args.preset, "batch": args.batch,
                      "resize": args.resize, "precision": precision, "kernels": kernels,
                      "remat": config.remat, **result}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    configure_host()  # before JAX starts
    sys.exit(main())
