"""The reference kernels: plain JAX, differentiated by JAX in forward and reverse mode,
fused by XLA as it sees fit. What GPUs and TPUs run."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from densenet_jax.kernels.base import Kernels


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float,
               relu: bool, feeds_1x1_conv: bool = False
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm (then ReLU) over the batch and both spatial axes.

    x: (N, H, W, C) → y (N, H, W, C), mean (C,), biased variance (C,). The variance takes
    two passes, as PyTorch's: E[x²] − E[x]² cancels when |mean| >> std.
    """
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    y = normalize(x, mean, var, scale, bias, epsilon)
    return (jax.nn.relu(y) if relu else y), mean, var


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
              bias: jax.Array, epsilon: float) -> jax.Array:
    """(x − mean) / √(var + ε) · scale + bias over the last axis. (x − mean) first, as
    PyTorch: folding the mean into the shift cancels when |mean| >> std."""
    return (x - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias


def concatenate(x: jax.Array, y: jax.Array, *, train: bool) -> jax.Array:
    """x: (N, H, W, C₁), y: (N, H, W, C₂) → (N, H, W, C₁ + C₂)."""
    return jnp.concatenate([x, y], axis=-1)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """x: (N, H, W, C) → (N, H', W', C), padded with -inf. JAX's derivative of XLA's
    reduce-window gives each window's gradient to its first maximum, as PyTorch does."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1),
                                 ((0, 0), *padding, (0, 0)))


def remat(module_class: type[nn.Module]) -> type[nn.Module]:
    """`jax.checkpoint` of the module's `__call__(x, train)` (`train` static), saving only
    the values named "bottleneck" (a DenseNet-BC layer's bottleneck output, as torchvision's
    memory-efficient DenseNet keeps it)."""
    return nn.remat(module_class, static_argnums=(2,),
                    policy=jax.checkpoint_policies.save_only_these_names("bottleneck"))


def finish_gradients(grads):
    """Unchanged: XLA may fuse the gradients into the optimiser's update as it likes."""
    return grads


KERNELS = Kernels(name="reference", batch_norm=batch_norm, concatenate=concatenate,
                  conv_general_dilated=jax.lax.conv_general_dilated, max_pool=max_pool,
                  remat=remat, finish_gradients=finish_gradients)
