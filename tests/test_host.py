"""train.host: reusing freed memory removes the page faults of repeated executions."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import host

# Runs a jitted function with temporaries above glibc's 32 MiB mmap threshold and prints
# whether the setting applied and the minor page faults of one later execution.
SCRIPT = """
import resource
from train.host import reuse_freed_memory
applied = reuse_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ x))  # 64 MiB temporaries
x = jnp.ones((4096, 4096))
f(x).block_until_ready(); f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def run(**environment):
    env = {name: value for name, value in os.environ.items()
           if name not in host.MALLOC_ENVIRONMENT}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            env={**env, **environment}, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    applied, faults = result.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_reusing_freed_memory_removes_the_page_faults():
    applied, faults = run()
    untouched, faults_by_default = run(MALLOC_ARENA_MAX="8")  # the user's setting wins
    assert applied and not untouched
    assert faults * 10 < faults_by_default, (faults, faults_by_default)
