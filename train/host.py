"""Process-wide settings of the host for training on the CPU, applied by one explicit call
in the entry points (`configure_host`), never on import. docs/performance.md gives what
each one buys."""
from __future__ import annotations

import ctypes
import os
import sys

import jax

# mallopt(3) parameters of glibc.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# XLA:CPU hands dots, elementwise ops and reductions to YNNPACK fusions; the xla_cpu kernels
# are tuned with them. Other platforms ignore xla_cpu_* flags.
YNNPACK_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"


def configure_host() -> None:
    """Every setting below; call it first thing in an entry point, before JAX starts."""
    use_ynnpack_fusions()
    reuse_step_memory()


def use_ynnpack_fusions(environ=os.environ) -> bool:
    """Add `YNNPACK_FLAG` to XLA_FLAGS in `environ` unless the flag is set there already (a
    value the user sets wins); returns whether it did. Takes effect only before JAX starts
    its CPU backend."""
    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNNPACK_FLAG}".strip()
    return True


def reuse_step_memory() -> bool:
    """Let each execution on the CPU reuse the memory of the last one. Returns whether it
    changed anything; call it before JAX starts (before the first array).

    Why: XLA:CPU allocates an execution's temporaries as one block, often above 32 MiB, and
    glibc serves any such block with a fresh mmap and unmaps it on free, so every training
    step faults its pages in again, zeroed by the kernel. Two settings together keep it:
    - JAX runs CPU computations on the calling thread (`jax_cpu_enable_async_dispatch`
      off) instead of a worker's, so the block comes from glibc's main arena;
    - there, no mmap and no trimming of the heap's top (mallopt M_MMAP_MAX=0,
      M_TRIM_THRESHOLD=2³¹−1).
    Other threads keep arenas of their own (one arena for all would also move the block,
    but every thread then takes one lock to allocate, much slower). Steps of a computation
    split over several devices still run on workers, and keep their mmap. The process keeps
    its peak heap until it exits. Nothing changes on other C libraries, nor where the
    environment configures malloc or preloads another allocator.
    """
    if not _glibc() or malloc_configured(os.environ):
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def malloc_configured(environ) -> bool:
    """Whether the environment configures malloc (GLIBC_TUNABLES, MALLOC_*) or preloads
    another allocator (tcmalloc, jemalloc): where it does, it wins."""
    return any(name in ("GLIBC_TUNABLES", "LD_PRELOAD") or name.startswith("MALLOC_")
               for name in environ)


def _glibc() -> bool:
    try:
        return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no such name here, or no value
        return False
