"""Train d2l's DenseNet on Fashion-MNIST: `python -m train.main --help`.

Defaults reproduce the source's recipe: preset d2l, 10 epochs, batch 256, lr 0.1,
resize 96, plain SGD. Each batch is split over every local device (data parallel); with
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, over every device of
every process. On glibc, each step reuses the memory of the last (train/host.py). The
last two lines are d2l's:
    loss 0.154, train acc 0.943, test acc 0.880
    5506.9 examples/sec on cuda:0
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax

import densenet_jax
from train import data
from train.checkpoint import CheckpointError
from train.config import RECIPES, RunConfig, TrainConfig
from train.host import configure_host
from train.loop import NonFiniteLossError, fit, summary
from train.parallel import initialize_distributed

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    parser.add_argument("--preset", default="d2l", choices=sorted(densenet_jax.PRESETS))
    parser.add_argument("--global-pool", choices=("max", "avg"), help="override the preset's")
    parser.add_argument("--recipe", default="d2l", choices=sorted(RECIPES),
                        help="d2l: plain SGD as the source; strong: Nesterov momentum, weight "
                             "decay, cosine schedule with warm-up, crop+flip, label smoothing")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, help="learning rate (default: the recipe's, 0.1)")
    parser.add_argument("--resize", type=int, default=defaults.resize,
                        help="images are resized to RESIZE×RESIZE (bilinear)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                        help="bf16: bfloat16 compute, float32 parameters and statistics")
    add_model_flags(parser)
    parser.add_argument("--limit-train", type=int, metavar="N",
                        help="train on the first N training examples only (a quick run)")
    parser.add_argument("--data-source", default="idx", choices=data.SOURCES)
    parser.add_argument("--data-dir", help=f"folder with the four Fashion-MNIST .gz files "
                                           f"(default: ${data.ENV_VAR}, else a cache folder "
                                           f"they are downloaded into)")
    parser.add_argument("--workdir", default="runs/default",
                        help="where metrics.jsonl, curves.png, config.json and checkpoints go")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last complete epoch saved in --workdir")
    return parser.parse_args(argv)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """How the network is computed, not what it computes: the same results either way."""
    parser.add_argument("--kernels", default="auto", choices=densenet_jax.kernels.KERNEL_SETS,
                        help="the model's kernel set: reference (plain JAX), xla_cpu, or auto "
                             "(xla_cpu on the CPU backend, reference elsewhere)")
    parser.add_argument("--remat", action="store_true",
                        help="recompute each dense layer in the backward pass (less memory)")


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """ValueError naming the first of the flags `names` whose value is not positive."""
    for name in names:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run the arguments describe; ValueError with a one-line message if invalid."""
    require_positive(args, "epochs", "batch_size")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.limit_train is not None and args.limit_train <= 0:
        raise ValueError(f"--limit-train must be positive, got {args.limit_train}")
    overrides = {"dtype": PRECISIONS[args.precision], "kernels": args.kernels,
                 "remat": args.remat}
    if args.global_pool:
        overrides["global_pool"] = args.global_pool
    model = densenet_jax.preset(args.preset, **overrides)
    model.require_input_size(args.resize, "--resize")
    recipe = RECIPES[args.recipe]
    if args.lr is not None:
        recipe = dataclasses.replace(recipe, learning_rate=args.lr)
    return RunConfig(
        model=model, recipe=recipe,
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, resize=args.resize,
                          seed=args.seed, limit_train=args.limit_train),
        data=data.DataConfig(source=args.data_source, data_dir=args.data_dir))


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    try:
        run = run_config(args)
        initialize_distributed()
        splits = data.load(run.data)
        history = fit(run, splits, workdir, resume=args.resume)
    except (ValueError, data.DataError, CheckpointError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: every completed epoch is saved in {workdir / 'checkpoints'}; "
              f"continue with the same command plus --resume", file=sys.stderr)
        return 130
    if history and jax.process_index() == 0:
        print(summary(history))
    return 0


if __name__ == "__main__":
    configure_host()  # before JAX starts
    sys.exit(main())
