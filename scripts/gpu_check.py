"""The accelerator check: d2l's recipe, the benchmark against PyTorch with both kernel sets,
and densenet121's memory with and without remat, in one call; prints a markdown block for
docs/RESULTS.md (also written to $OUT/gpu_check.md when OUT is set, with every log).

    scripts/gpu_check.sh DATA_DIR                # on a machine with a GPU or TPU, ~8 minutes
    scripts/gpu_check.sh --accuracy DATA_DIR     # the long runs instead, ~9 minutes
    scripts/gpu_check.sh --smoke DATA_DIR        # either at tiny sizes, on any machine

`--accuracy` runs the recipe that the validation split chose on the CPU (docs/RESULTS.md:
`--recipe strong`, weight average, test-time flip, resolution over erasing) for longer and at
higher resolution than a small CPU affords, with d2l's network at 96×96 and with the paper's
densenet_bc_100 at 32×32, each reporting validation and test accuracy per epoch. A run stopped
by its time limit still reports the epochs it finished (its cosine schedule then did not end).

DATA_DIR holds the four Fashion-MNIST .gz files. Every step runs as its own process (as a
user would run it), with a time limit; a step that fails or runs out of time is reported
in the block and the others still run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
ENVIRONMENT = """
import json, platform, jax, jaxlib, flax, optax, orbax.checkpoint
try:
    import torch
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    torch_version = f"{torch.__version__} ({accelerator or 'CPU'})"
except ImportError:
    torch_version = "not installed"
devices = jax.devices()
print(json.dumps({"backend": jax.default_backend(), "devices": [str(d) for d in devices],
                  "device_kind": devices[0].device_kind, "python": platform.python_version(),
                  "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                  "optax": optax.__version__, "orbax": orbax.checkpoint.__version__,
                  "torch": torch_version}))
"""


@dataclasses.dataclass(frozen=True)
class AccuracyRun:
    """One run of --accuracy: a network and resolution, trained with ACCURACY_RECIPE."""

    name: str
    flags: tuple[str, ...]          # train.main flags beyond ACCURACY_RECIPE (network, size)
    epochs: int
    timeout: float                  # seconds, compilation and evaluation included


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each step runs: the real sizes, or the smoke test's."""

    train: tuple[str, ...]          # train.main flags beyond d2l's defaults
    bench: tuple[str, ...]          # train.bench flags for d2l at batch 256, 96×96
    densenet121: tuple[str, ...]    # train.bench flags for densenet121 at batch 64, 224×224
    accuracy: tuple[AccuracyRun, ...]  # --accuracy's runs
    budget_seconds: float           # start no step after this much time
    accuracy_seconds: float         # the same, for --accuracy
    slack: float = 1.0              # times each step's time limit (compiling on a small CPU)


# The recipe the validation split chose on the CPU (docs/RESULTS.md), held-out split included.
ACCURACY_RECIPE = ("--recipe", "strong", "--recipe-fields", "ema_decay=0.999", "test_flip=true",
                   "--validation", "5000")

FULL = Sizes(train=(), bench=("--batch", "256", "--resize", "96", "--steps", "10",
                              "--repeats", "3"),
             densenet121=("--batch", "64", "--resize", "224", "--steps", "5", "--repeats", "3"),
             accuracy=(AccuracyRun("d2l", ("--resize", "96"), epochs=30, timeout=270),
                       AccuracyRun("densenet_bc_100",
                                   ("--preset", "densenet_bc_100", "--resize", "32"),
                                   epochs=20, timeout=270)),
             budget_seconds=450, accuracy_seconds=480)
# The smoke test's networks keep each one's layout with two layers per block (and d2l's a
# narrower stem and growth): the same code paths at a fraction of the compile time.
SMALL = ("--model", "block_config=2,2", "growth_rate=8", "stem_channels=8")
SMOKE = Sizes(train=("--resize", "32", "--limit-train", "512", "--batch-size", "64",
                     "--epochs", "1", *SMALL),
              bench=("--batch", "8", "--resize", "32", "--steps", "1", "--repeats", "1",
                     "--peak-size", "256", *SMALL),
              densenet121=("--batch", "2", "--resize", "32", "--steps", "1", "--repeats", "1",
                           "--peak-size", "256", "--model", "block_config=2,2"),
              accuracy=(AccuracyRun("d2l", ("--resize", "32", "--limit-train", "512",
                                               "--batch-size", "64", *SMALL), epochs=2,
                                    timeout=600),
                        AccuracyRun("densenet_bc_100",
                                    ("--preset", "densenet_bc_100", "--resize", "32",
                                     "--limit-train", "256", "--batch-size", "64",
                                     "--model", "block_config=2,2,2"), epochs=1, timeout=600)),
              budget_seconds=2400, accuracy_seconds=2400, slack=3.0)


@dataclasses.dataclass
class Step:
    name: str
    returncode: int | None  # None: not started (out of time) or timed out
    seconds: float
    output: str


class Runner:
    """Runs each step as `python ...` in the checkout, within the overall budget, and keeps
    its log (in `logs`, when given)."""

    def __init__(self, budget_seconds: float, logs: Path | None, slack: float = 1.0):
        self.deadline = time.monotonic() + budget_seconds
        self.logs = logs
        self.slack = slack

    def __call__(self, name: str, args: list[str], timeout: float) -> Step:
        left = self.deadline - time.monotonic()
        if left <= 0:
            return Step(name, None, 0.0, "not run: out of time")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        start = time.monotonic()
        try:
            done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=min(timeout * self.slack, left + 60))
            step = Step(name, done.returncode, time.monotonic() - start, done.stdout)
        except subprocess.TimeoutExpired as expired:
            output = expired.stdout or ""
            output = output.decode() if isinstance(output, bytes) else output
            step = Step(name, None, time.monotonic() - start, output + "\ntimed out")
        if self.logs:
            (self.logs / f"{name}.log").write_text(step.output)
        status = "ok" if step.returncode == 0 else "FAILED"
        print(f"[{step.seconds:6.1f} s] {name}: {status}", file=sys.stderr, flush=True)
        return step


def last_json(step: Step) -> dict | None:
    """The JSON line a benchmark ends with, if it got that far."""
    if step.returncode != 0:
        return None
    lines = [line for line in step.output.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def failure(step: Step) -> str:
    lines = [line for line in step.output.strip().splitlines() if line.strip()]
    return f"{'timed out' if step.returncode is None else 'failed'}: {lines[-1] if lines else ''}"


def epoch_records(workdir: Path) -> list[dict]:
    """The per-epoch records a train.main run wrote to its workdir (none if it wrote none)."""
    metrics = workdir / "metrics.jsonl"
    return ([json.loads(line) for line in metrics.read_text().splitlines()]
            if metrics.is_file() else [])


def no_records(step: Step) -> str:
    """Why a train.main step left no epoch to report."""
    return failure(step) if step.returncode != 0 else "failed: wrote no metrics.jsonl"


def recipe_rows(run, data_dir: Path, work: Path, sizes: Sizes) -> list[str]:
    """d2l's recipe (10 epochs, batch 256, lr 0.1, 96×96 unless smoke) in fp32 and bf16."""
    rows = ["| precision | loss | train acc | test acc | examples/sec | wall time | "
            "test acc per epoch |", "|---|---|---|---|---|---|---|"]
    for precision in ("fp32", "bf16"):
        workdir = work / f"recipe_{precision}"
        step = run(f"recipe_{precision}", ["-m", "train.main", "--data-dir", str(data_dir),
                                           "--workdir", str(workdir), "--precision", precision,
                                           *sizes.train], timeout=600)
        records = epoch_records(workdir)
        if step.returncode != 0 or not records:
            rows.append(f"| {precision} | {no_records(step)} | | | | | |")
            continue
        last = records[-1]
        rate = step.output.strip().splitlines()[-1].split(" examples/sec")[0]
        per_epoch = ", ".join(f"{record['test_acc']:.3f}" for record in records)
        rows.append(f"| {precision} | {last['loss']:.3f} | {last['train_acc']:.3f} | "
                    f"{last['test_acc']:.3f} | {rate} | {step.seconds:.0f} s | {per_epoch} |")
    return rows


BENCH_TORCH = ("--torch", "eager", "channels_last")


def bench_rows(run, sizes: Sizes) -> list[str]:
    """train.bench (d2l, a full SGD step) against PyTorch eager, NCHW and channels-last, on
    the same device (torch.compile left out: its compilation would take much of the check's
    time)."""
    rows = ["| kernels | precision | ours ex/s | PyTorch NCHW ex/s | PyTorch channels-last ex/s "
            "| ratio | ratio_best | compile | step memory |", "|---" * 9 + "|"]
    for precision in ("fp32", "bf16"):
        for kernels in ("reference", "xla_cpu"):
            step = run(f"bench_{kernels}_{precision}",
                       ["-m", "train.bench", "--preset", "d2l", "--precision", precision,
                        "--kernels", kernels, *BENCH_TORCH, *sizes.bench], timeout=300)
            result = last_json(step)
            if result is None:
                rows.append(f"| {kernels} | {precision} | {failure(step)} | | | | | | |")
                continue
            rows.append(f"| {kernels} | {precision} | {result['jax_examples_per_sec']:,.0f} | "
                        f"{result['torch_examples_per_sec']:,.0f} | "
                        f"{result['torch_channels_last_examples_per_sec']:,.0f} | "
                        f"{result['ratio']:.2f} | {result['ratio_best']:.2f} | "
                        f"{result['compile_seconds']:.0f} s | "
                        f"{result['peak_bytes'] / 2**20:,.0f} MiB |")
    return rows


def remat_rows(run, sizes: Sizes) -> list[str]:
    """densenet121 (fp32, default kernels): step time and compiled memory, with and without
    remat."""
    rows = ["| remat | step time | examples/sec | step memory |", "|---|---|---|---|"]
    results = {}
    for remat in (False, True):
        step = run(f"densenet121{'_remat' if remat else ''}",
                   ["-m", "train.bench", "--preset", "densenet121", "--no-torch",
                    *(["--remat"] if remat else []), *sizes.densenet121], timeout=300)
        result = results[remat] = last_json(step)
        if result is None:
            rows.append(f"| {remat} | {failure(step)} | | |")
            continue
        rate = result["jax_examples_per_sec"]
        rows.append(f"| {remat} | {1000 * result['batch'] / rate:.1f} ms | {rate:,.1f} | "
                    f"{result['peak_bytes'] / 2**20:,.0f} MiB |")
    if results[False] and results[True]:
        plain, remat = results[False], results[True]
        rows += ["", f"remat: {plain['peak_bytes'] / remat['peak_bytes']:.2f}× less memory for "
                     f"{plain['jax_examples_per_sec'] / remat['jax_examples_per_sec']:.2f}× the "
                     f"step time."]
    return rows


def accuracy_rows(run, data_dir: Path, work: Path, sizes: Sizes) -> list[str]:
    """Each --accuracy run's last epoch (validation and test accuracy), and both per epoch."""
    rows = ["| network | flags | epochs | loss | train acc | val acc | test acc | examples/sec | "
            "wall time | val / test acc per epoch |", "|---" * 10 + "|"]
    for spec in sizes.accuracy:
        workdir = work / f"accuracy_{spec.name}"
        step = run(f"accuracy_{spec.name}",
                   ["-m", "train.main", "--data-dir", str(data_dir), "--workdir", str(workdir),
                    *ACCURACY_RECIPE, "--epochs", str(spec.epochs), *spec.flags],
                   timeout=spec.timeout)
        records = epoch_records(workdir)
        flags = f"`{' '.join(spec.flags)}`"
        if not records:
            rows.append(f"| {spec.name} | {flags} | {no_records(step)} |" + " |" * 7)
            continue
        last = records[-1]
        # A run stopped by its time limit keeps the epochs it finished (checkpointed each epoch).
        stopped = "stopped by its time limit" if step.returncode is None else failure(step)
        epochs = (f"{len(records)}" if step.returncode == 0 else
                  f"{len(records)} of {spec.epochs} ({stopped})")
        per_epoch = ", ".join(f"{r['val_acc']:.3f} / {r['test_acc']:.3f}" for r in records)
        rows.append(f"| {spec.name} | {flags} | {epochs} | {last['loss']:.3f} | "
                    f"{last['train_acc']:.3f} | {last['val_acc']:.3f} | {last['test_acc']:.3f} | "
                    f"{last['examples_per_sec']:,.0f} | {step.seconds:.0f} s | {per_epoch} |")
    return rows


def command(module_and_flags: str, extra: tuple[str, ...]) -> str:
    return " ".join(["python -m", module_and_flags, *extra])


def check(data_dir: Path, smoke: bool, out: Path | None,
          accuracy: bool = False) -> tuple[str, bool]:
    """(the markdown block, whether every step succeeded): the check, or with `accuracy` the
    long runs."""
    sizes = SMOKE if smoke else FULL
    logs = out / "gpu_check_logs" if out else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    run = Runner(sizes.accuracy_seconds if accuracy else sizes.budget_seconds, logs, sizes.slack)
    env_step = run("environment", ["-c", ENVIRONMENT], timeout=300)
    env = last_json(env_step)
    if env is None:
        raise SystemExit(f"error: JAX does not start here ({failure(env_step)})")
    if env["backend"] == "cpu" and not smoke:
        raise SystemExit("error: JAX sees no accelerator here, only the CPU; the full check "
                         "needs a GPU or TPU (--smoke runs the same steps at tiny sizes)")
    recipe = command("train.main --data-dir DATA_DIR --precision P", sizes.train)
    bench = command("train.bench --preset d2l --precision P --kernels K",
                    BENCH_TORCH + sizes.bench)
    densenet121 = command("train.bench --preset densenet121 --no-torch", sizes.densenet121)
    long_runs = command("train.main --data-dir DATA_DIR", ACCURACY_RECIPE + ("--epochs", "E"))
    title = (f"{'Smoke test' if smoke else 'GPU check'}{' (accuracy)' if accuracy else ''}: "
             f"{env['device_kind']} ({len(env['devices'])} × {env['backend']}), "
             f"{time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as work:
        sections = [
            f"### {title}", "",
            f"Python {env['python']}, jax {env['jax']} (jaxlib {env['jaxlib']}), flax "
            f"{env['flax']}, optax {env['optax']}, orbax {env['orbax']}, torch {env['torch']}.",
            ""]
        if accuracy:
            sections += [
                f"The recipe chosen on the validation split, longer: `{long_runs} FLAGS` "
                f"(fp32; wall time: the whole command, compilation and evaluation included)",
                "", *accuracy_rows(run, data_dir, Path(work), sizes)]
        else:
            sections += [
                f"d2l's recipe: `{recipe}` (wall time: the whole command, compilation and "
                f"evaluation included)", "",
                *recipe_rows(run, data_dir, Path(work), sizes), "",
                f"Benchmark: `{bench}`", "",
                *bench_rows(run, sizes), "",
                f"densenet121: `{densenet121} [--remat]` (fp32)", "",
                *remat_rows(run, sizes)]
    block = "\n".join(sections) + "\n"
    ok = not any(sign in block for sign in ("failed:", "timed out", "not run",
                                            "stopped by its time limit"))
    return block, ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any machine")
    parser.add_argument("--accuracy", action="store_true",
                        help="the long runs of the validation-chosen recipe, not the check")
    parser.add_argument("data_dir", type=Path, metavar="DATA_DIR",
                        help="folder with the four Fashion-MNIST .gz files")
    args = parser.parse_args(argv)
    missing = [name for name in DATA_FILES if not (args.data_dir / name).is_file()]
    if missing:
        print(f"error: {args.data_dir} lacks {', '.join(missing)}; pass the folder that holds "
              f"the four Fashion-MNIST .gz files", file=sys.stderr)
        return 2
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    block, ok = check(args.data_dir.resolve(), args.smoke, out, args.accuracy)
    print(block, end="")
    if out:
        (out / "gpu_check.md").write_text(block)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
