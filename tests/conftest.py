"""Shared fixtures: the real Fashion-MNIST folder, named by $FASHION_MNIST_DIR. The tests
compile as the entry points do: with XLA:CPU's YNNPACK fusions (set before JAX starts)."""
import os
from pathlib import Path

import pytest

from train import data
from train.host import use_ynnpack_fusions


def pytest_configure(config):
    use_ynnpack_fusions()


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

