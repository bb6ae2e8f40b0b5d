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
