"""train.host: executions on the CPU reuse the memory of the last one, without the page
faults of a fresh mapping each time."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import host

# Runs a training step of the tests' tiny network (batch 768 at 32×32: 61 MiB of temporaries,
# above glibc's 32 MiB mmap threshold) and prints whether the setting applied, whether JAX
# then dispatches asynchronously, and the minor page faults of one later step.
SCRIPT = """
import resource
import jax
from train.host import reuse_step_memory
applied = reuse_step_memory()
import densenet_jax
from train.bench import JaxSteps
from train.parallel import data_mesh
tiny = densenet_jax.preset("d2l", block_config=(2, 2), growth_rate=8, stem_channels=8)
steps = JaxSteps(tiny, 768, 32, data_mesh())
assert steps.step.memory_analysis().temp_size_in_bytes > 48 * 2**20
steps.run(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps.run(3)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(applied, jax.config.read("jax_cpu_enable_async_dispatch"), faults)
"""


def run(**environment):
    env = {name: value for name, value in os.environ.items()
           if not host.malloc_configured([name])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            env={**env, **environment}, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    applied, asynchronous, faults = result.stdout.split()
    return applied == "True", asynchronous == "True", float(faults)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_executions_reuse_the_memory_of_the_last_one():
    applied, asynchronous, faults = run()
    # Where the environment configures malloc, it wins (an empty LD_PRELOAD changes nothing
    # else; any MALLOC_*_ variable would also fix glibc's mmap threshold).
    untouched, asynchronous_by_default, faults_by_default = run(LD_PRELOAD="")
    assert (applied, asynchronous) == (True, False)
    assert (untouched, asynchronous_by_default) == (False, True)
    assert faults * 10 < faults_by_default, (faults, faults_by_default)


@pytest.mark.parametrize("environ, configured", [
    ({"PATH": "/bin", "HOME": "/root"}, False),
    ({"MALLOC_ARENA_MAX": "2"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, True),
    ({"LD_PRELOAD": "libjemalloc.so.2"}, True),
])
def test_the_environment_configuring_malloc_wins(environ, configured):
    assert host.malloc_configured(environ) is configured


def test_ynnpack_flag_is_added_unless_set():
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert host.use_ynnpack_fusions(environ) is True
    assert environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {host.YNNPACK_FLAG}"
    assert host.use_ynnpack_fusions(environ) is False  # once only
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert host.use_ynnpack_fusions(mine) is False and mine["XLA_FLAGS"].endswith("=dot")


# Imports every module of both packages, then prints what global state they could touch.
IMPORTS = """
import os, jax
import densenet_jax, densenet_jax.crosscheck, densenet_jax.kernels.xla_cpu
import train, train.main, train.bench, train.loop, train.steps, train.host
from jax._src import xla_bridge
print(os.environ.get("XLA_FLAGS"), jax.config.read("jax_cpu_enable_async_dispatch"),
      xla_bridge.backends_are_initialized())
"""


def test_importing_the_packages_changes_no_global_state():
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True,
                            env=env, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "True", "False"]
