"""Shared fixtures: the real Fashion-MNIST folder, named by $FASHION_MNIST_DIR. The tests
compile as the entry points do: with XLA:CPU's YNNPACK fusions (set before JAX starts)."""
import os
from pathlib import Path

import pytest

from train import data
from train.host import use_ynnpack_fusions


def pytest_configure(config):
    use_ynnpack_fusions()


def memory_maps() -> tuple[int, int]:
    """(memory regions this process maps, the most Linux allows it); (0, 1) elsewhere."""
    try:
        with open("/proc/self/maps") as maps, open("/proc/sys/vm/max_map_count") as limit:
            return sum(1 for _ in maps), int(limit.read())
    except OSError:
        return 0, 1


@pytest.fixture(autouse=True)
def bounded_compiled_code():
    """XLA:CPU maps about 1,100 memory regions per compiled training step and keeps them
    while JAX caches the program; past Linux's per-process limit (vm.max_map_count, 65,530
    by default) LLVM crashes in the next compilation. The suite compiles more programs than
    that holds, so JAX's caches are dropped once half of it is used."""
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


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory) -> Path:
    """A finished three-epoch run's workdir (batch 128 of 512 examples at 32×32, 256
    held out for validation), for the tools that read runs; tests must not change it."""
    from train import main as cli

    workdir = tmp_path_factory.mktemp("trained")
    assert cli.main(["--data-dir", str(data_dir), "--workdir", str(workdir), "--resize", "32",
                     "--limit-train", "512", "--batch-size", "128", "--epochs", "3",
                     "--validation", "256"]) == 0
    return workdir

