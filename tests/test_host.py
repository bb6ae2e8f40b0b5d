"""train.host: executions on the CPU reuse the memory of the last one, without the page
faults of a fresh mapping each time."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import host

# Runs d2l's training step (batch 64 at 32×32: 55 MiB of temporaries, above glibc's 32 MiB
# mmap threshold) and prints whether the setting applied, whether JAX then dispatches
# asynchronously, and the minor page faults of one later step.
SCRIPT = """
import resource
import jax
from train.host import reuse_step_memory
applied = reuse_step_memory()
import densenet_jax
from train.bench import JaxSteps
from train.parallel import data_mesh
steps = JaxSteps(densenet_jax.preset("d2l"), 64, 32, data_mesh())
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
