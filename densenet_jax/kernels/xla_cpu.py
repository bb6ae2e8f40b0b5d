"""Kernels for XLA:CPU: the same functions as `reference`, computed around the places where
XLA:CPU (with its YNNPACK fusions) is slow or keeps too much memory. docs/performance.md
gives what each one buys. Reverse-mode differentiation only (custom VJPs).

The statistics, normalisation and BatchNorm derivative below read x through different
views: (M, C) to normalise, (M', W, C) for the variance, (N, H, W, C) in the backward pass.
XLA merges identical broadcasts of a per-channel vector (the mean, the scale) wherever they
occur, forward and backward alike, and YNNPACK's fusions then write such a shared broadcast
out as a full-size array; a broadcast to a shape of its own stays inside its fusion.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax.kernels.base import Kernels

Padding = tuple[tuple[int, int], tuple[int, int]]


# Convolutions ---------------------------------------------------------------------------

def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, precision=None) -> jax.Array:
    """`jax.lax.conv_general_dilated`, except two kinds of 2-D NHWC convolution, run as
    matrix products:

    - 1×1 kernels, stride 1, no padding: a product over channels. XLA:CPU fuses the
      optimiser's update into a 1×1 convolution's weight gradient, and YNNPACK runs that
      fused convolution slowly; a product's weight gradient is a product and stays fast.
    - images with fewer pixels than the kernel has taps (3×3 kernels on the 2×2 and 1×1
      maps at the end of a DenseNet on 32×32 inputs): every output pixel sees the whole
      image, so the convolution is the linear map (H·W·C_in) → (H'·W'·C_out) whose matrix
      gathers the kernel's taps, no more multiplications than the convolution's own.

    lhs: (N, H, W, C_in), rhs: (kh, kw, C_in, C_out) → (N, H', W', C_out). Any other
    convolution goes to XLA.
    """
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    nhwc = dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                               ("NHWC", "HWIO", "NHWC"))
    plain = (lhs.ndim == 4 and not dilated and feature_group_count == 1
             and not isinstance(padding, str) and nhwc)
    if (plain and rhs.shape[:2] == (1, 1) and tuple(window_strides) == (1, 1)
            and all(tuple(side) == (0, 0) for side in padding)):
        return jnp.dot(lhs, rhs[0, 0], precision=precision)
    if not plain or lhs.shape[1] * lhs.shape[2] >= rhs.shape[0] * rhs.shape[1]:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision)
    (n, h, w, c), (kh, kw, _, features) = lhs.shape, rhs.shape
    (top, bottom), (left, right) = padding
    out_h, out_w = ((h + top + bottom - kh) // window_strides[0] + 1,
                    (w + left + right - kw) // window_strides[1] + 1)
    taps_h = _taps(h, out_h, kh, window_strides[0], top, rhs.dtype)
    taps_w = _taps(w, out_w, kw, window_strides[1], left, rhs.dtype)
    matrix = jnp.einsum("aiu,bjv,uvco->abcijo", taps_h, taps_w, rhs)
    y = jnp.dot(lhs.reshape(n, h * w * c), matrix.reshape(h * w * c, out_h * out_w * features),
                precision=precision)
    return y.reshape(n, out_h, out_w, features)


def _taps(size: int, out_size: int, kernel: int, stride: int, pad: int, dtype) -> jax.Array:
    """(size, out_size, kernel) one-hot: input position a reaches output position i
    through kernel tap u when a = i·stride + u − pad (a tap on padding reaches nothing)."""
    a, i, u = np.ogrid[:size, :out_size, :kernel]
    return jnp.asarray(a == i * stride + u - pad, dtype)


# Max pool -------------------------------------------------------------------------------

@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: Padding) -> jax.Array:
    """XLA's reduce-window, with a derivative computed at the output's resolution: JAX's
    own (select-and-scatter) materialises index arrays of the padded input's size.

    x: (N, H, W, C) → (N, H', W', C), padded with -inf; each window's gradient goes to its
    first maximum in row-major order (PyTorch's rule for ties).
    """
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1),
                                 ((0, 0), *padding, (0, 0)))


@max_pool.defjvp
def _max_pool_jvp(window, strides, padding, primals, tangents):
    (x,), (dx,) = primals, tangents
    y = max_pool(x, window, strides, padding)
    pads = ((0, 0), *padding, (0, 0))
    x_padded = jnp.pad(x, pads, constant_values=-jnp.inf)
    offsets = [(i, j) for i in range(window[0]) for j in range(window[1])]

    def view(padded, i, j):
        """Window offset (i, j) of every output window: a strided slice, (N, H', W', C)."""
        limit = (y.shape[0], i + strides[0] * (y.shape[1] - 1) + 1,
                 j + strides[1] * (y.shape[2] - 1) + 1, y.shape[3])
        return jax.lax.slice(padded, (0, i, j, 0), limit, (1, *strides, 1))

    # The row-major index of each window's first maximum, once, as int8: a running maximum
    # replaced only by a strictly greater value. (Not by comparing with y: in sharded steps
    # without YNNPACK, XLA:CPU gave pools that matched none of their window's values, and
    # those windows lost their gradient; in bf16, XLA's excess precision compares values
    # unrounded with the rounded y, and the stem lost 99 % of its gradient.)
    best, first = view(x_padded, 0, 0), jnp.zeros(y.shape, jnp.int8)
    for k, (i, j) in enumerate(offsets[1:], start=1):
        candidate = view(x_padded, i, j)
        first = jnp.where(candidate > best, jnp.int8(k), first)
        best = jnp.maximum(candidate, best)

    def route(first, dx_padded):
        """dy: each output takes the tangent at its window's first maximum."""
        dy = jnp.zeros_like(y)
        for k, (i, j) in enumerate(offsets):
            dy = jnp.where(first == k, view(dx_padded, i, j), dy)
        return dy

    def route_transpose(first, dy):
        """The backward pass, (N, H', W', C) → padded input: one sublattice of the input
        per stride residue, each a sum of shifted, masked copies of dy at the output's
        resolution, then interleaved. (JAX's own transpose of `route` would pad each of
        the window's offsets to the full input size.)"""
        (s0, s1), (hp, wp) = strides, x_padded.shape[1:3]
        rows, cols = -(-hp // s0), -(-wp // s1)
        lattices = []
        for r0 in range(s0):
            for r1 in range(s1):
                lattice = jnp.zeros((y.shape[0], rows, cols, y.shape[3]), y.dtype)
                for k, (i, j) in enumerate(offsets):
                    if (i % s0, j % s1) == (r0, r1):
                        a, b = i // s0, j // s1
                        lattice = lattice + jnp.pad(
                            jnp.where(first == k, dy, jnp.zeros_like(dy)),
                            ((0, 0), (a, rows - a - y.shape[1]), (b, cols - b - y.shape[2]),
                             (0, 0)))
                lattices.append(lattice)
        # (N, rows, s0, cols, s1, C) → (N, rows·s0, cols·s1, C), cropped to the padded input.
        grid = jnp.stack(lattices, axis=2).reshape(y.shape[0], rows, s0, s1, cols, y.shape[3])
        grid = grid.transpose(0, 1, 2, 4, 3, 5).reshape(y.shape[0], rows * s0, cols * s1, -1)
        return grid[:, :hp, :wp]

    dx_padded = jnp.pad(dx, pads)
    return y, jax.custom_derivatives.linear_call(route, route_transpose, first, dx_padded)


# BatchNorm ------------------------------------------------------------------------------

@jax.custom_vjp
def batch_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Batch mean and biased variance of each channel, in two passes as PyTorch (no
    E[x²] − E[x]², which cancels when |mean| >> std). x: (..., C) → (C,), (C,).

    Its derivative, (dmean + 2·dvar·(x − mean)) / n, is one pass over x; differentiating
    the two passes would add a channel sum that is zero in exact arithmetic."""
    mean = jnp.mean(x.reshape(-1, x.shape[-1]), 0)
    var = jnp.mean(jnp.square(x.reshape(-1, *x.shape[-2:]) - mean), (0, 1))
    return mean, var


def _batch_statistics_fwd(x):
    mean, var = batch_statistics(x)
    return (mean, var), (x, mean)


def _batch_statistics_bwd(residuals, cotangents):
    (x, mean), (dmean, dvar) = residuals, cotangents
    n = x.size // x.shape[-1]
    return ((x - mean) * (2 * dvar / n) + dmean / n,)  # (N, H, W, C): see the note on views


batch_statistics.defvjp(_batch_statistics_fwd, _batch_statistics_bwd)


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
              bias: jax.Array, epsilon: float, relu: bool,
              zero_per_channel: bool = False) -> jax.Array:
    """(x − mean) / √(var + ε) · scale + bias, then ReLU if asked. x: (..., C).

    zero_per_channel: ReLU takes the maximum with a vector of zeros, 0 · bias, rather than
    with the scalar 0. For an output that feeds a matrix product (a 1×1 convolution),
    XLA:CPU's YNNPACK fusion of the two otherwise reads the scalar as a full-size array of
    zeros, one per shape, kept through the step; elsewhere the scalar is faster."""
    y = (x.reshape(-1, x.shape[-1]) - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias
    if relu:
        y = jnp.maximum(y, 0 * bias if zero_per_channel else 0)
    return y.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def batch_norm_relu(parts: tuple[jax.Array, ...], means: tuple[jax.Array, ...],
                    variances: tuple[jax.Array, ...], scale: jax.Array, bias: jax.Array,
                    epsilon: float, zero_per_channel: bool = False) -> jax.Array:
    """ReLU(BatchNorm(x)) of x = the parts concatenated along channels, normalised with the
    given batch statistics of each part (training mode).

    parts: (N, H, W, C_i), means and variances: (C_i,), scale and bias: (ΣC_i,) →
    (N, H, W, ΣC_i). The derivative keeps the parts and y and, with g the output's
    cotangent masked by ReLU, gives each part g·scale/√(var + ε) and its statistics their
    cotangents (the rest of the chain rule, through `batch_statistics`), from two channel
    sums and one product per part; the composition's own derivative saves and re-reads
    several intermediates of x's size.
    """
    return normalize(_concat(parts), _concat(means), _concat(variances), scale, bias, epsilon,
                     relu=True, zero_per_channel=zero_per_channel)


def _concat(arrays: Sequence[jax.Array]) -> jax.Array:
    """The arrays concatenated along their last axis (channels)."""
    return jnp.concatenate(arrays, -1) if len(arrays) > 1 else arrays[0]


def _batch_norm_relu_fwd(parts, means, variances, scale, bias, epsilon, zero_per_channel):
    y = batch_norm_relu(parts, means, variances, scale, bias, epsilon, zero_per_channel)
    return y, (parts, means, variances, scale, y)


def _batch_norm_relu_bwd(epsilon, zero_per_channel, residuals, dy):
    parts, means, variances, scale, y = residuals
    rstd = jax.lax.rsqrt(_concat(variances) + epsilon)
    # ReLU's mask as dy · sign(y), which is dy or 0 since y ≥ 0: arithmetic stays inside
    # XLA:CPU's YNNPACK fusions (here with the convolution that computes dy), where a
    # select ran as a pass of its own. (Unlike the select, an infinite dy where y = 0
    # gives NaN; that step is lost either way.)
    g = dy * jnp.sign(y)
    axes = tuple(range(y.ndim - 1))
    bounds = np.cumsum([0] + [p.shape[-1] for p in parts])
    channels = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    # Part by part, on slices of g: no concatenation of the parts is kept or rebuilt.
    dbias = jnp.sum(g, axes)
    dscale = _concat([jnp.sum(g[..., c] * (p - m), axes)
                      for c, p, m in zip(channels, parts, means)]) * rstd
    # y = ReLU((x − mean)·a + bias) with a = scale·rstd and rstd = (var + ε)^(-1/2).
    a = scale * rstd
    dmean, dvar = -a * dbias, -0.5 * a * rstd * dscale
    return (tuple(g[..., c] * a[c] for c in channels), tuple(dmean[c] for c in channels),
            tuple(dvar[c] for c in channels), dscale, dbias)


batch_norm_relu.defvjp(_batch_norm_relu_fwd, _batch_norm_relu_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FeatureMaps:
    """A dense block's feature maps in training, kept apart, each with its batch statistics,
    computed once when the map is made: a channel's statistics do not depend on the layer
    that reads it, so no later BatchNorm re-reads every earlier map for them, and their
    derivative is one pass per map, not per layer.

    parts: (N, H, W, C_i) each; statistics: one (mean, var), (C_i,) each, per part.
    """

    parts: tuple[jax.Array, ...]
    statistics: tuple[tuple[jax.Array, jax.Array], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.parts[0].shape[:-1], sum(p.shape[-1] for p in self.parts))

    @property
    def dtype(self):
        return self.parts[0].dtype

    def astype(self, dtype) -> "FeatureMaps":
        return FeatureMaps(tuple(p.astype(dtype) for p in self.parts), self.statistics)


def _feature_maps(x: jax.Array | FeatureMaps) -> FeatureMaps:
    if isinstance(x, FeatureMaps):
        return x
    return FeatureMaps((x,), (batch_statistics(x.astype(jnp.promote_types(x.dtype,
                                                                          jnp.float32))),))


def concatenate(x: jax.Array | FeatureMaps, y: jax.Array, *, train: bool
                ) -> jax.Array | FeatureMaps:
    """x ⧺ y along channels: an array in evaluation, `FeatureMaps` in training."""
    if not train:
        return jnp.concatenate([x, y], axis=-1)
    x, y = _feature_maps(x), _feature_maps(y)
    return FeatureMaps(x.parts + y.parts, x.statistics + y.statistics)


def batch_norm(x: jax.Array | FeatureMaps, scale: jax.Array, bias: jax.Array, *,
               epsilon: float, relu: bool, feeds_1x1_conv: bool = False
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`reference.batch_norm`, for an array or `FeatureMaps`: BatchNorm → ReLU as one
    operation with its own derivative (`batch_norm_relu`). Where the output feeds a 1×1
    convolution, ReLU's zero is per channel (see `normalize`)."""
    maps = _feature_maps(x)
    means, variances = (tuple(s) for s in zip(*maps.statistics))
    if relu:
        y = batch_norm_relu(maps.parts, means, variances, scale, bias, epsilon, feeds_1x1_conv)
    else:
        y = normalize(_concat(maps.parts), _concat(means), _concat(variances), scale, bias,
                      epsilon, relu=False)
    return y, _concat(means), _concat(variances)


# Remat ----------------------------------------------------------------------------------

def remat(module_class: type[nn.Module]) -> type[nn.Module]:
    """`reference.remat`, with the recomputation made to wait for the backward pass.

    XLA:CPU removes `jax.checkpoint`'s optimisation barriers before its common-subexpression
    elimination, which then merges the recomputation back into the forward pass and keeps
    every activation alive in between: no memory saved. Here each residual of the
    recomputation is read as residual + 0 · (the cotangent's first element), an operand
    that exists only once the backward pass reaches the module, so the recomputation can
    neither be merged nor moved earlier. Floating-point 0 · c is not folded away (it is
    NaN for a non-finite c, whose gradients are not finite anyway). A scalar rather than
    one per example: a broadcast scalar stays inside YNNPACK's fusions.
    """
    checkpointed = nn.remat(module_class, static_argnums=(2,), prevent_cse=False,
                            policy=jax.checkpoint_policies.save_only_these_names("bottleneck"))

    def call(module, x, train):
        return checkpointed.__call__(module, x, train)

    def forward(module, x, train):
        return nn.vjp(functools.partial(call, train=train), module, x)

    def backward(vjp_fn, cotangent):
        zero = jnp.ravel(cotangent)[0] * 0
        return jax.tree.map(
            lambda r: r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.inexact) else r,
            vjp_fn)(cotangent)

    def gated_call(self, x, train):
        return nn.custom_vjp(functools.partial(call, train=train),
                             functools.partial(forward, train=train), backward)(self, x)

    return type(module_class.__name__, (checkpointed,), {"__call__": gated_call})


# ----------------------------------------------------------------------------------------

def finish_gradients(grads):
    """Gradients complete before the update: XLA:CPU would otherwise fuse the update's
    multiply by the learning rate into the convolutions that compute the weight gradients,
    and YNNPACK runs such a fused convolution much slower."""
    return jax.lax.optimization_barrier(grads)


KERNELS = Kernels(name="xla_cpu", batch_norm=batch_norm, concatenate=concatenate,
                  conv_general_dilated=conv_general_dilated, max_pool=max_pool, remat=remat,
                  finish_gradients=finish_gradients)
