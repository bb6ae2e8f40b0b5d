"""Process-wide settings of the host for training on the CPU."""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

# mallopt(3) parameters of glibc.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Variables by which the environment configures malloc: where one is set, it wins.
MALLOC_ENVIRONMENT = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
                       "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory mapped, so each training step reuses the pages
    of the last one. Returns whether it changed anything; call it before JAX starts.

    Why: XLA:CPU allocates a step's temporaries as one block per execution (230 MiB for d2l
    at batch 256, 32×32) from a worker thread. glibc serves any block above 32 MiB with a
    fresh mmap and unmaps it on free, so every step faults in zeroed pages: 59,000 faults
    and 0.12 s of kernel time on a 0.29 s step. One arena (so the worker threads' blocks
    come from the main heap), no mmap, no trimming of the heap's top: no page faults after
    warm-up, d2l steps at 32×32 1.1–1.2× faster. But every thread then takes one lock to
    allocate, and a network with many more operations pays for that: densenet121 at batch
    8, 224×224 runs 1.7× slower. Hence opt-in. The process also keeps its peak heap until
    it exits.
    Nothing changes on other C libraries, nor when the environment configures malloc or
    preloads another allocator (tcmalloc, jemalloc), and threads that have already
    allocated keep their arenas.
    """
    if not _glibc() or any(name in os.environ for name in MALLOC_ENVIRONMENT):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
                mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)])


def _glibc() -> bool:
    try:
        return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no such name here, or no value
        return False


def add_reuse_freed_memory_flag(parser: argparse.ArgumentParser) -> None:
    """`--reuse-freed-memory`, for the CLIs that train (train.main, train.bench)."""
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="glibc malloc keeps freed memory for the next step: faster d2l "
                             "steps on the CPU, slower for large networks (train/host.py)")


def apply_reuse_freed_memory(requested: bool) -> None:
    """`reuse_freed_memory()` if `requested`, with a one-line note when it cannot apply."""
    if requested and not reuse_freed_memory():
        print("note: --reuse-freed-memory needs glibc and no malloc settings in the "
              "environment; malloc left as it is", file=sys.stderr)
