"""Train d2l's DenseNet on Fashion-MNIST, or on --dataset (a tensorflow-datasets data set
by name, or folder:PATH): `python -m train.main --help`.

Defaults reproduce the source's recipe: preset d2l, 10 epochs, batch 256, lr 0.1,
resize 96, plain SGD: quick on a GPU, hours on a small CPU; there, add --resize 32.
Each batch is split over every local device (data parallel); with
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, over every device of
every process. On glibc, each step reuses the memory of the last (train/host.py). The
last two lines are d2l's:
    loss 0.154, train acc 0.943, test acc 0.880
    5506.9 examples/sec on cuda:0
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
from pathlib import Path

import jax

import densenet_jax
from train import data, datasets, supervise
from train.build import use_compilation_cache
from train.checkpoint import CheckpointError, hold, require_run, saved_epochs, saved_run
from train.config import RECIPES, RecipeConfig, RunConfig, TrainConfig
from train.host import configure_host
from train.loop import NonFiniteLossError, fit, summary
from train.parallel import initialize_distributed, process_index_before_joining

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}
MAX_SEED = 2**32 - 1  # JAX's default PRNG keeps 32 bits of a seed: larger ones would collide


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default where it has one."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.main", description=__doc__,
                                     formatter_class=HelpFormatter)
    defaults = TrainConfig()
    add_model_flags(parser)
    parser.add_argument("--recipe", default="d2l", choices=sorted(RECIPES),
                        help="d2l: plain SGD as the source; strong: Nesterov momentum, weight "
                             "decay, cosine schedule with warm-up, crop+flip, label smoothing")
    parser.add_argument("--recipe-fields", nargs="+", metavar="FIELD=VALUE", default=[],
                        help="set any RecipeConfig field over --recipe and --lr, e.g. "
                             "random_erasing=0.25 ema_decay=0.999 test_flip=true")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="examples per SGD step, split over all devices")
    parser.add_argument("--lr", type=float, help="learning rate (default: the recipe's, 0.1)")
    parser.add_argument("--resize", type=int,
                        help="images are resized to RESIZE×RESIZE (bilinear) (default: 96, "
                             "d2l's, for Fashion-MNIST and data sets of varying image size; "
                             "the images' own size for others); on a CPU, 32 trains about "
                             "9× faster than 96")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"0..{MAX_SEED}")
    parser.add_argument("--init-from", metavar="FILE",
                        help="start from PyTorch weights (.pth, .pt or .safetensors; "
                             "torchvision's DenseNet files too); a stem made for other input "
                             "channels is adapted, a classifier for other classes replaced")
    parser.add_argument("--limit-train", type=int, metavar="N",
                        help="train on the first N training examples only (a quick run)")
    parser.add_argument("--validation", type=int, default=defaults.validation, metavar="N",
                        help="hold the last N training examples out and report their "
                             "accuracy (val acc) each epoch: choose settings on it, not on "
                             "the test set")
    parser.add_argument("--dataset", default="fashion_mnist", metavar="NAME",
                        help="fashion_mnist; any image-classification data set of "
                             "tensorflow-datasets prepared in --data-dir (cifar10, svhn_cropped, "
                             "imagenette, imagenet2012, ...); or folder:PATH, a folder with "
                             "one sub-folder of images per class (optionally below train/ and "
                             "test/). Channels, classes and class names follow the data set")
    parser.add_argument("--data-source", default="idx", choices=data.SOURCES,
                        help="Fashion-MNIST's files: idx: read directly; tfds: through "
                             "tensorflow-datasets")
    parser.add_argument("--data-dir", help=f"Fashion-MNIST: the folder with its four .gz files "
                                           f"(default: ${data.ENV_VAR}, else a cache folder "
                                           f"they are downloaded into); a tensorflow-datasets "
                                           f"data set: the folder it is prepared in (default: "
                                           f"$TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    parser.add_argument("--download", action="store_true",
                        help="let tensorflow-datasets download and prepare --dataset into "
                             "--data-dir (never done otherwise)")
    parser.add_argument("--normalize", default="auto", metavar="HOW",
                        help="per-channel normalisation after ÷255: none; dataset (mean and "
                             "std of the training images); imagenet (torchvision's, which its "
                             "weights expect); or MEAN/STD, e.g. 0.5,0.5,0.5/0.25,0.25,0.25. "
                             "auto: imagenet with --init-from, none for Fashion-MNIST (d2l's), "
                             "dataset otherwise")
    parser.add_argument("--input", default="auto", choices=data.INPUTS,
                        help="device: each split held on the devices; stream: read in batches "
                             "through grain as training goes (same results); auto: stream "
                             "what exceeds --device-limit")
    parser.add_argument("--device-limit", type=float, metavar="MIB",
                        help="the most MiB of images --input auto holds on the devices "
                             "(default: a quarter of one device's memory)")
    parser.add_argument("--workdir", default="runs/default",
                        help="where metrics.jsonl, curves.png, config.json and checkpoints go")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last complete epoch saved in --workdir")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --workdir (its checkpoints, metrics "
                             "and plot are deleted)")
    parser.add_argument("--keep", type=int, default=2, metavar="N",
                        help="keep the checkpoints of the last N epochs (0: of every epoch)")
    parser.add_argument("--compilation-cache", metavar="DIR",
                        help="keep compiled programs in DIR across runs (JAX's persistent "
                             "compilation cache; also $JAX_COMPILATION_CACHE_DIR): a second "
                             "run of the same network and recipe starts without compiling")
    return parser.parse_args(argv)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The network (`model_config`), and how it is computed: kernels and remat change how,
    not what, with the same results either way."""
    parser.add_argument("--preset", default="d2l", choices=sorted(densenet_jax.PRESETS),
                        help="d2l: the chapter's network; densenet*: torchvision's DenseNet-BC")
    parser.add_argument("--global-pool", choices=("max", "avg"), help="override the preset's")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                        help="bf16: bfloat16 compute, float32 parameters and statistics")
    parser.add_argument("--kernels", default="auto", choices=densenet_jax.kernels.KERNEL_SETS,
                        help="the model's kernel set: reference (plain JAX), xla_cpu, or auto "
                             "(xla_cpu on the CPU backend, reference elsewhere)")
    parser.add_argument("--remat", action="store_true",
                        help="recompute each dense layer in the backward pass (less memory)")
    parser.add_argument("--model", nargs="+", metavar="FIELD=VALUE", default=[],
                        help="set any DenseNetConfig field over the preset (and over "
                             "--global-pool, --precision, --kernels, --remat), e.g. "
                             "growth_rate=12 block_config=6,12,24,16 stem_channels=24")


def model_config(args: argparse.Namespace) -> densenet_jax.DenseNetConfig:
    """The network `add_model_flags`' flags describe; ValueError, in one line, if invalid."""
    overrides = {"dtype": PRECISIONS[args.precision], "kernels": args.kernels,
                 "remat": args.remat}
    if args.global_pool:
        overrides["global_pool"] = args.global_pool
    try:
        overrides.update(densenet_jax.config.parse_fields(args.model))
    except ValueError as error:
        raise ValueError(f"--model {error}") from None
    if overrides["dtype"] == "float64":
        raise ValueError("--model dtype=float64: training computes in float32 or bfloat16 "
                         "(--precision); float64 is the cross-check's (python -m "
                         "densenet_jax.crosscheck --x64)")
    return densenet_jax.preset(args.preset, **overrides)


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """ValueError naming the first of the flags `names` whose value is not positive."""
    for name in names:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run the arguments describe; ValueError with a one-line message if invalid."""
    require_positive(args, "epochs", "batch_size")
    if args.keep < 0:
        raise ValueError(f"--keep must be 0 (every epoch) or positive, got {args.keep}")
    if args.lr is not None and not 0 < args.lr < math.inf:
        raise ValueError(f"--lr must be positive and finite, got {args.lr}")
    if args.limit_train is not None and args.limit_train <= 0:
        raise ValueError(f"--limit-train must be positive, got {args.limit_train}")
    if args.validation < 0:
        raise ValueError(f"--validation must not be negative, got {args.validation}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if args.resize is not None and args.resize <= 0:
        raise ValueError(f"--resize must be positive, got {args.resize}")
    if args.device_limit is not None and not 0 <= args.device_limit < math.inf:
        raise ValueError(f"--device-limit must be a number of MiB, got {args.device_limit}")
    if args.init_from is not None and not Path(args.init_from).is_file():
        raise ValueError(f"--init-from {args.init_from}: no such file; pass a .pth, .pt or "
                         f".safetensors weights file")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --workdir and --overwrite replaces it; "
                         "pass one of them")
    model = model_config(args)
    if args.resize is not None:
        model.require_input_size(args.resize, "--resize")
    recipe = RECIPES[args.recipe]
    if args.lr is not None:
        recipe = dataclasses.replace(recipe, learning_rate=args.lr)
    try:
        recipe = dataclasses.replace(recipe, **densenet_jax.config.parse_fields(
            args.recipe_fields, RecipeConfig))
    except ValueError as error:
        raise ValueError(f"--recipe-fields {error}") from None
    return RunConfig(
        model=model, recipe=recipe,
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                          resize=args.resize or TrainConfig.resize, seed=args.seed,
                          limit_train=args.limit_train, validation=args.validation,
                          init_from=args.init_from),
        data=data.DataConfig(
            dataset=args.dataset, source=args.data_source, data_dir=args.data_dir,
            download=(args.download if args.dataset != "fashion_mnist"
                      else not (args.data_dir or os.environ.get(data.ENV_VAR))),
            input=args.input, device_limit_mib=args.device_limit))


def explicit_model_fields(args: argparse.Namespace) -> set[str]:
    """The DenseNetConfig fields --model sets (the data set sets the others it shapes)."""
    return set(densenet_jax.config.parse_fields(args.model))


def for_dataset(run: RunConfig, info: datasets.DatasetInfo, args: argparse.Namespace,
                stats, log=print) -> RunConfig:
    """`run` fitted to its data set: the network's input channels and classes (unless
    --model sets them: ValueError, in one line, where they cannot fit), the image size
    (unless --resize sets it), the normalisation --normalize asks for (`stats()`: the
    training split's (mean, std), measured only where asked for), the data set's image shape
    and class names."""
    explicit = explicit_model_fields(args)
    model = run.model
    label = f"--dataset {info.name}"
    if "in_channels" in explicit and model.in_channels != info.channels:
        raise ValueError(f"--model in_channels={model.in_channels}, but {label} has "
                         f"{info.channels}-channel images; drop in_channels=, the data set "
                         f"sets it")
    if "num_classes" in explicit and model.num_classes < info.num_classes:
        raise ValueError(f"the network has num_classes={model.num_classes} outputs but the "
                         f"data has {info.num_classes} classes; set --model "
                         f"num_classes={info.num_classes}, or leave it at the preset's")
    if "num_classes" in explicit and model.num_classes > info.num_classes:
        log(f"note: --model num_classes={model.num_classes}, but {label} has "
            f"{info.num_classes} classes; the other outputs are never a right answer")
    model = dataclasses.replace(
        model, in_channels=model.in_channels if "in_channels" in explicit else info.channels,
        num_classes=model.num_classes if "num_classes" in explicit else info.num_classes)
    resize = args.resize or (TrainConfig.resize if info.name == "fashion_mnist"
                             else info.image_shape[0])
    model.require_input_size(resize, "--resize" if args.resize else
                             f"{label}'s image size ({resize}, add --resize)")
    mean, std = normalization(args.normalize, info, run.train.init_from, stats)
    return dataclasses.replace(
        run, model=model, train=dataclasses.replace(run.train, resize=resize),
        data=dataclasses.replace(run.data, mean=mean, std=std, image_shape=info.image_shape,
                                 class_names=info.class_names))


def normalization(how: str, info: datasets.DatasetInfo, init_from: str | None, stats
                  ) -> tuple[tuple | None, tuple | None]:
    """(mean, std) per channel for --normalize `how`, or (None, None) for none."""
    if how == "auto":
        how = ("imagenet" if init_from else "none" if info.name == "fashion_mnist"
               else "dataset")
    if how == "none":
        return None, None
    if how == "imagenet":
        return datasets.imagenet_stats(info.channels)
    if how == "dataset":
        return stats()
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in how.split("/"))
    except ValueError:
        raise ValueError(f"--normalize {how}: expected none, dataset, imagenet, auto or "
                         f"MEAN/STD with one comma-separated value per channel, e.g. "
                         f"0.5,0.5,0.5/0.25,0.25,0.25") from None
    if not len(mean) == len(std) == info.channels or min(std) <= 0:
        raise ValueError(f"--normalize {how}: give {info.channels} mean and {info.channels} "
                         f"positive std values, one per channel of {info.name}")
    return mean, std


def resumed(run: RunConfig, args: argparse.Namespace, workdir: Path) -> RunConfig:
    """`run` fitted to its data set as the run in `workdir` was (`for_dataset`, from its
    config.json, without reading the data), where that run is of the same data set."""
    saved = saved_run(workdir)
    if saved is None or saved.data.dataset != run.data.dataset:
        return run
    info = datasets.DatasetInfo(saved.data.dataset, saved.data.image_shape,
                                saved.data.class_names)
    return for_dataset(run, info, args, lambda: (saved.data.mean, saved.data.std),
                       log=lambda line: None)


def check_folder(folder: Path, flag: str = "--workdir") -> None:
    """ValueError, in one line naming `flag`, unless `folder` is (or can be made) a
    writable folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{flag} {folder} is a file, not a folder; choose another "
                         f"{flag}") from None
    except OSError as error:  # below a file, not permitted, read-only file system
        raise ValueError(f"cannot create {flag} {folder} ({error.strerror}); choose "
                         f"another {flag}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder} is not writable; choose another {flag}")


def out_of_memory(error: Exception) -> bool:
    return isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error)


def lost_peers(error: Exception) -> bool:
    """Whether a collective of a multi-process run failed: a peer stopped or the network broke."""
    return jax.distributed.is_initialized() and (
        isinstance(error, jax.errors.JaxRuntimeError) or "Gloo" in str(error))


def saved(workdir: Path) -> str | None:
    """"epochs up to N are saved in DIR", or None when no epoch is."""
    epochs = saved_epochs(workdir)
    return f"epochs up to {epochs[-1]} are saved in {workdir / 'checkpoints'}" if epochs else None


def interrupted_message(workdir: Path) -> str:
    """What an interruption leaves: the epochs saved, and how to go on."""
    if not (what := saved(workdir)):
        return "interrupted before any epoch was saved; start again with the same command"
    return f"interrupted: {what}; continue with the same command plus --resume"


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (what schedulers send before they kill) ends the run as Ctrl-C does."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def failure_message(error: Exception, args: argparse.Namespace, workdir: Path) -> str | None:
    """One line for a failure the user can act on; None for anything else."""
    if lost_peers(error):
        kept = saved(workdir)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        again = (f"{kept}; start every process again with --resume" if kept else
                 "no epoch was saved; start every process again")
        return f"this process lost contact with the others of the run ({first}); {again}"
    if isinstance(error, (ValueError, data.DataError, CheckpointError, NonFiniteLossError)):
        return str(error)
    if isinstance(error, OSError):  # the run's files (metrics, plot) could not be written
        kept = saved(workdir)
        return (f"cannot write {error.filename or workdir} ({error.strerror or error}); "
                + (f"{kept}; make room or fix the folder, then continue with --resume" if kept
                   else "no epoch is saved; make room or fix the folder, then start again"))
    if out_of_memory(error):
        kept = saved(workdir)
        return (f"out of memory at --batch-size {args.batch_size}, --resize {args.resize}; "
                f"lower them (or add --remat){'; ' + kept if kept else ''}")
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    try:
        with sigterm_as_interrupt():
            run = run_config(args)
            if args.resume:  # before anything is built or loaded
                run = resumed(run, args, workdir)
                require_run(workdir, run.result_fields())
            check_folder(workdir)
            if args.compilation_cache:
                check_folder(Path(args.compilation_cache), "--compilation-cache")
            use_compilation_cache(args.compilation_cache)
            # Held before joining, where this process's index is known: a process started
            # by mistake on a live run's workdir and coordinator must not join (and stop) it.
            index = process_index_before_joining()
            with contextlib.nullcontext() if index is None else hold(workdir, index):
                initialize_distributed()
                print(f"loading {datasets.describe(run.data)}", flush=True)
                dataset = datasets.open_dataset(run.data, run.train.resize)
                run = for_dataset(run, dataset.info, args,
                                  lambda: datasets.channel_stats(dataset.splits["train"]))
                history = fit(run, dataset.splits, workdir, resume=args.resume,
                              overwrite=args.overwrite, keep=args.keep or None)
    except KeyboardInterrupt:
        print(f"\n{interrupted_message(workdir)}", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001
        if (message := failure_message(error, args, workdir)) is None:
            raise  # a bug: its traceback is wanted
        print(f"error: {message}", file=sys.stderr)
        return 1
    if history and jax.process_index() == 0:
        print(summary(history))
    return 0


def run_command() -> int:
    """`python -m train.main`: a multi-process run is watched from a parent process
    (train.supervise); a failed one skips JAX's shutdown barrier, which would wait for peers
    that may be gone and then abort."""
    configure_host()  # before JAX starts
    if supervise.wanted():
        args = parse_args(sys.argv[1:])
        workdir = Path(args.workdir)
        return supervise.supervise("train.main", sys.argv[1:], workdir, lambda: saved(workdir))
    code = main()
    if code and jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(run_command())
