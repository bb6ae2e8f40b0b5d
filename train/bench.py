"""Benchmark: our `train_step` against the PyTorch reference, in one process.

    python -m train.bench --preset d2l --batch 256 --resize 32
    python -m train.bench --end-to-end --data-dir DIR     # one epoch of train.main's work

Times full training steps (forward, backward, SGD update, BatchNorm update; the batch
gathered, converted and resized on the device) after warm-up and compilation, alternating
JAX and PyTorch (eager, same batch, resize, threads and precision) over several repeats,
and reports medians. The last line is JSON.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import densenet_jax
from train import data
from train.config import RECIPES, RunConfig, TrainConfig
from train.host import configure_host
from train.loop import device_name, fit
from train.main import PRECISIONS, add_model_flags, require_positive
from train.parallel import data_mesh, initialize_distributed, replicate
from train.steps import create_train_state, make_optimizer, train_step, zero_metrics


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="d2l", choices=sorted(densenet_jax.PRESETS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--resize", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    add_model_flags(parser)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="time JAX only")
    parser.add_argument("--end-to-end", action="store_true",
                        help="one epoch of train.main (data pipeline included) instead")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder, for --end-to-end")
    return parser.parse_args(argv)


class JaxSteps:
    """`steps` calls of the project's train_step on a batch held on the devices, split
    over all of them as train.main splits it."""

    def __init__(self, config: densenet_jax.DenseNetConfig, batch: int, resize: int, mesh):
        rng = np.random.default_rng(0)
        recipe = RECIPES["d2l"]
        optimizer = make_optimizer(recipe, 1, 1)
        state = create_train_state(densenet_jax.DenseNet(config), optimizer, jax.random.key(0),
                                   resize)
        (self.state, self.metrics, self.images, self.labels, self.indices,
         self.key) = replicate((state, zero_metrics(),
                                rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8),
                                rng.integers(0, 10, batch, dtype=np.int32),
                                np.arange(batch, dtype=np.int32), jax.random.key(0)), mesh)
        args = (self.state, self.metrics, self.images, self.labels, self.indices, self.key)
        start = time.perf_counter()
        self.compiled = train_step.lower(*args, resize=resize, recipe=recipe,
                                         mesh=mesh).compile()
        self.compile_seconds = time.perf_counter() - start
        memory = self.compiled.memory_analysis()
        self.peak_bytes = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                           + memory.output_size_in_bytes - memory.alias_size_in_bytes)
        self.run(1)  # warm-up

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, self.metrics = self.compiled(self.state, self.metrics, self.images,
                                                     self.labels, self.indices, self.key)
        jax.block_until_ready(self.metrics)
        return time.perf_counter() - start


class TorchSteps:
    """The same step in PyTorch eager (on the GPU when there is one; bf16 under autocast,
    PyTorch's mixed precision): convert, resize, forward, backward, SGD."""

    def __init__(self, config: densenet_jax.DenseNetConfig, batch: int, resize: int):
        import torch

        from densenet_jax.torch_reference import reference_model, xavier_init_

        self.torch, self.resize = torch, resize
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        torch.manual_seed(0)
        self.model = xavier_init_(reference_model(config)).train().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        rng = np.random.default_rng(0)
        self.images = torch.from_numpy(
            rng.integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)).to(device)
        self.labels = torch.from_numpy(rng.integers(0, 10, batch)).to(device)
        self.autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16,
                                          enabled=config.dtype == "bfloat16")
        self.run(1)  # warm-up

    def run(self, steps: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        for _ in range(steps):
            x = torch.nn.functional.interpolate(self.images.float() / 255, size=self.resize,
                                                mode="bilinear", align_corners=False)
            with self.autocast():
                loss = torch.nn.functional.cross_entropy(self.model(x), self.labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.synchronize()
        return time.perf_counter() - start


def examples_per_sec(framework: JaxSteps | TorchSteps, steps: int, batch: int) -> float:
    """One untimed step, then `steps` timed ones. The untimed step is the first after the
    other framework's: it meets that one's leftovers in the caches and in malloc's free
    lists."""
    framework.run(1)
    return steps * batch / framework.run(steps)


def step_benchmark(args, config) -> dict:
    ours = JaxSteps(config, args.batch, args.resize, data_mesh())
    theirs = None if args.no_torch else TorchSteps(config, args.batch, args.resize)
    jax_rates, torch_rates = [], []
    for _ in range(args.repeats):  # A/B alternated, so drifts hit both alike
        jax_rates.append(examples_per_sec(ours, args.steps, args.batch))
        if theirs:
            torch_rates.append(examples_per_sec(theirs, args.steps, args.batch))
    result = {"jax_examples_per_sec": statistics.median(jax_rates),
              "torch_examples_per_sec": statistics.median(torch_rates) if theirs else None,
              "compile_seconds": ours.compile_seconds, "peak_bytes": ours.peak_bytes}
    result["ratio"] = (result["jax_examples_per_sec"] / result["torch_examples_per_sec"]
                       if theirs else None)
    print(f"{'framework':<10}{'median ex/s':>12}  per repeat")
    print(f"{'jax':<10}{result['jax_examples_per_sec']:>12.1f}  "
          + " ".join(f"{r:.1f}" for r in jax_rates))
    if theirs:
        print(f"{'torch':<10}{result['torch_examples_per_sec']:>12.1f}  "
              + " ".join(f"{r:.1f}" for r in torch_rates))
        print(f"ratio jax/torch {result['ratio']:.2f}")
    print(f"compile {ours.compile_seconds:.1f} s, compiled step memory {ours.peak_bytes / 2**20:.1f} MiB")
    return result


def end_to_end_benchmark(args, config) -> dict:
    run = RunConfig(model=config, recipe=RECIPES["d2l"],
                    train=TrainConfig(epochs=1, batch_size=args.batch, resize=args.resize),
                    data=data.DataConfig(data_dir=args.data_dir))
    splits = data.load(run.data)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        history = fit(run, splits, Path(workdir))
        wall = time.perf_counter() - start
    rate = history[-1]["examples_per_sec"]
    print(f"one epoch: {rate:.1f} examples/sec in the training steps, {wall:.1f} s wall "
          f"(compilation, evaluation and checkpoint included)")
    return {"jax_examples_per_sec": rate, "torch_examples_per_sec": None, "ratio": None,
            "compile_seconds": None, "peak_bytes": None, "epoch_wall_seconds": wall}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        require_positive(args, "batch", "resize", "steps", "repeats")
        config = densenet_jax.preset(args.preset, dtype=PRECISIONS[args.precision],
                                     remat=args.remat, kernels=args.kernels)
        config.require_input_size(args.resize, "--resize")
        initialize_distributed()
        kernels = densenet_jax.kernels.get_kernels(config.kernels).name
        print(f"{args.preset}, batch {args.batch}, resize {args.resize}, {args.precision}, "
              f"{kernels} kernels{', remat' if args.remat else ''}, {os.cpu_count()} CPU "
              f"threads, {device_name()}")
        result = (end_to_end_benchmark if args.end_to_end else step_benchmark)(args, config)
    except (ValueError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"device": device_name(), "preset": args.preset, "batch": args.batch,
                      "resize": args.resize, "precision": args.precision, "kernels": kernels,
                      "remat": args.remat, **result}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    configure_host()  # before JAX starts
    sys.exit(main())
