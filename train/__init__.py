"""Training d2l's DenseNet on Fashion-MNIST: data, steps, loop, checkpoints, plots, CLI.

Importing the package tunes the host process for XLA:CPU, before JAX starts its backend
and its threads; both settings leave anything the user sets alone.
"""
import ctypes
import os
import sys

# XLA:CPU: hand dots, elementwise ops and reductions to YNNPACK fusions; d2l training steps
# run 1.3× faster on a 2-core AVX-512 CPU (train.bench, batch 256 at 32×32; numbers in the
# history). Other platforms ignore xla_cpu_* flags.
_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CPU_FLAG}".strip()

# mallopt(3) parameters of glibc.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_MALLOC_ENVIRONMENT = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
                       "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc keep freed memory mapped, so each training step reuses the
    pages of the last one. Returns whether it changed anything.

    Why: XLA:CPU allocates a step's temporaries as one block per execution (230 MiB for d2l
    at batch 256, 32×32), from a worker thread. glibc serves any block above 32 MiB with a
    fresh mmap and unmaps it on free, so every step faulted in 59,000 zeroed pages, 0.12 s
    of kernel time on a 0.29 s step. One arena (the worker threads' blocks come from the
    main heap), no mmap, and no trimming of the heap's top: no page faults after warm-up,
    1.2× faster steps. The cost: the process keeps its peak heap until it exits.
    Not on other C libraries, nor when the environment configures malloc (or preloads
    another allocator, such as tcmalloc). Must run before other threads first allocate.
    """
    if not _glibc() or any(name in os.environ for name in _MALLOC_ENVIRONMENT):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
                mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)])


def _glibc() -> bool:
    try:
        return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no such name here, or no value
        return False


keep_freed_memory_for_reuse()
