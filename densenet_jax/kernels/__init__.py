"""Kernel sets: the operations of a DenseNet that a backend may compute its own way.

The model (`densenet_jax.modules`) reads as d2l's and asks a `Kernels` for these few
operations; everything else is plain Flax. Two sets exist:

- `reference`: plain JAX, differentiated by JAX (forward and reverse mode); what GPUs and
  TPUs run.
- `xla_cpu`: custom derivatives and matrix-product convolutions that route around slow
  paths of XLA:CPU (docs/performance.md has what each one buys). Reverse mode only.

`DenseNetConfig.kernels` names one, or "auto": `xla_cpu` on the CPU backend, `reference`
elsewhere. Both sets compute the same function (tests/test_kernels.py).
"""
from __future__ import annotations

import jax

from densenet_jax.kernels import reference, xla_cpu
from densenet_jax.kernels.base import Kernels

KERNEL_SETS = ("auto", "reference", "xla_cpu")
__all__ = ["KERNEL_SETS", "Kernels", "get_kernels"]


def get_kernels(name: str, backend: str | None = None) -> Kernels:
    """The kernel set `name`; "auto" is `xla_cpu` on the CPU backend (default: JAX's
    default backend), `reference` elsewhere."""
    if name == "auto":
        name = "xla_cpu" if (backend or jax.default_backend()) == "cpu" else "reference"
    sets = {"reference": reference.KERNELS, "xla_cpu": xla_cpu.KERNELS}
    if name not in sets:
        raise ValueError(f"unknown kernel set {name!r}; choose one of {', '.join(KERNEL_SETS)}")
    return sets[name]
