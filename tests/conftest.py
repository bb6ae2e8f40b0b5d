"""Shared fixtures: the real Fashion-MNIST folder, named by $FASHION_MNIST_DIR, a tiny
network for tests of the trainer, trained runs for the tools that read them, and the names
of the programs JAX compiles. The tests compile as the entry points do: with XLA:CPU's YNNPACK
fusions (set before JAX starts)."""
import logging
import os
import re
from pathlib import Path

import pytest

from train import data
from train.host import use_ynnpack_fusions

# Every kind of layer of d2l's network (the stem, two dense blocks, a transition, the head)
# at a small fraction of its cost: for tests of the trainer, not of the network.
TINY = ("--model", "block_config=2,2", "growth_rate=8", "stem_channels=8")


def pytest_configure(config):
    use_ynnpack_fusions()


class _Compilations(logging.Handler):
    """The name of each program JAX compiles (or reads from the persistent compilation
    cache), from its compile log."""

    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        if match := re.match(r"Compiling jit\((\w+)\)", record.getMessage()):
            self.names.append(match[1])


@pytest.fixture
def compilations():
    """A function giving the names of the programs compiled since the test began, in order
    ("train_step", "eval_step", ...)."""
    import jax

    handler = _Compilations()
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield lambda: list(handler.names)
    finally:
        logger.removeHandler(handler)


def memory_maps() -> tuple[int, int]:
    """(memory regions this process maps, the most Linux allows it); (0, 1) elsewhere."""
    try:
        with open("/proc/self/maps") as maps, open("/proc/sys/vm/max_map_count") as limit:
            return sum(1 for _ in maps), int(limit.read())
    except OSError:
        return 0, 1


@pytest.fixture(autouse=True)
def bounded_compiled_code():
    """XLA:CPU maps about 1,100 memory regions per compiled training step of d2l's network
    and keeps them while JAX caches the program; past Linux's per-process limit
    (vm.max_map_count, 65,530 by default) LLVM crashes in the next compilation. Should the
    suite compile more than that holds, JAX's caches are dropped once half of it is used."""
    yield
    used, limit = memory_maps()
    if used > limit // 2:
        import jax

        jax.clear_caches()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    folder = os.environ.get(data.ENV_VAR)
    if not folder:
        pytest.fail(f"set {data.ENV_VAR} to the folder holding the four Fashion-MNIST .gz "
                    f"files (README: the test command)")
    return Path(folder)


@pytest.fixture(scope="session")
def splits(data_dir):
    return data.load(data.DataConfig(data_dir=str(data_dir)))


def train_cli(data_dir, workdir, *args) -> int:
    """`python -m train.main` in this process, on the tiny network at 32×32."""
    from train import main as cli

    return cli.main(["--data-dir", str(data_dir), "--workdir", str(workdir), "--resize", "32",
                     *TINY, *args])


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory) -> Path:
    """A finished three-epoch run's workdir (the tiny network, batch 128 of 1,024 examples
    at 32×32, 256 held out for validation), for the tools that read runs; tests must not
    change it."""
    workdir = tmp_path_factory.mktemp("trained")
    assert train_cli(data_dir, workdir, "--limit-train", "1024", "--batch-size", "128",
                     "--epochs", "3", "--validation", "256") == 0
    return workdir
