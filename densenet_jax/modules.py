"""Flax Linen modules mirroring d2l's DenseNet one to one, in NHWC.

| d2l (PyTorch)        | here              |
|----------------------|-------------------|
| `conv_block`         | `ConvBlock`       |
| `DenseBlock`         | `DenseBlock`      |
| `transition_block`   | `TransitionBlock` |
| `nn.Sequential(b1, *blks, ...)` | `DenseNet` |

BatchNorm state lives in the `batch_stats` collection: apply with `train=True,
mutable=["batch_stats"]` to train, `train=False` to evaluate with the running statistics.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from densenet_jax.config import DenseNetConfig, param_dtype, transition_channels

Dtype = Any
# d2l's train_ch6 re-initialises every Conv2d and Linear weight with Xavier-uniform.
kernel_init = nn.initializers.xavier_uniform()


def symmetric_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's `padding=kernel_size // 2` on both sides; 'SAME' would pad strided
    convolutions asymmetrically (2, 3) where PyTorch pads (3, 3)."""
    pad = kernel_size // 2
    return ((pad, pad), (pad, pad))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, precision=None) -> jax.Array:
    """`jax.lax.conv_general_dilated`, except for two kinds of 2-D NHWC convolution that run
    as matrix products:

    - 1×1 kernels, stride 1, no padding (the transitions): a product over channels. XLA:CPU
      fuses the optimiser's update into a 1×1 convolution's weight gradient, and YNNPACK
      runs the fused convolution 2–2.5× slower (64×24×24×192 → 96: 20.5 → 52 ms); the
      product's weight gradient is a product and stays fast (26 ms). 1.07× faster d2l
      steps at batch 256, 32×32 and at batch 64, 96×96.
    - images with fewer pixels than the kernel has taps (3×3 kernels on the 2×2 and 1×1
      maps at the end of a DenseNet on 32×32 inputs). Every output pixel sees the whole
      image: the convolution is the linear map (H·W·C_in) → (H'·W'·C_out) whose matrix
      gathers the kernel's taps, no more multiplications than the convolution's own.
      XLA:CPU's convolution is 6–10× slower than that product at these sizes (2×2×208 →
      32, batch 256: 19.7 ms → 1.9 ms forward and backward).

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


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """PyTorch's `MaxPool2d`, gradient included: each output's gradient goes to the first
    maximum of its window in row-major order (PyTorch's rule for ties).

    x: (N, H, W, C) → (N, H', W', C), padded with -inf.
    The forward pass is XLA's reduce-window; the derivative below replaces the generic
    one, whose select-and-scatter materialises index arrays of the padded input's size.
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

    # The row-major index of each window's first maximum, once, as int8.
    first = jnp.full(y.shape, len(offsets), jnp.int8)
    for k, (i, j) in reversed(list(enumerate(offsets))):
        first = jnp.where(view(x_padded, i, j) == y, jnp.int8(k), first)

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


# The statistics, normalisation and derivative below read x through different views:
# (M, C) to normalise, (M', W, C) for the variance, (N, H, W, C) in the backward pass.
# XLA merges identical broadcasts of a per-channel vector (the mean, the scale) wherever
# they occur, forward and backward alike, and on the CPU its YNNPACK fusions then write
# such a shared broadcast out as a full-size array; a broadcast to a shape of its own stays
# inside its fusion.


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

    (x − mean) first, as PyTorch does: folding the mean into the shift,
    x · m + (bias − mean · m), cancels catastrophically when |mean| >> std.

    zero_per_channel: ReLU takes the maximum with a vector of zeros, 0 · bias, rather
    than with the scalar 0. For an output that feeds a matrix product (a 1×1
    convolution), XLA:CPU's YNNPACK fusion of the two otherwise reads the scalar as a
    full-size array of zeros, one per shape, kept through the step (densenet121 with
    remat, 224×224, batch 8: 678 → 441 MiB compiled); elsewhere the scalar is faster
    (d2l steps 1.03×)."""
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
    (N, H, W, ΣC_i). Reverse mode only. The statistics come in as arguments so that a dense
    block computes each feature map's once, when the map is made, rather than every later
    layer re-reading all of them (their derivative is `batch_statistics`'s).

    The derivative keeps the parts and y and, with g the output's cotangent masked by
    ReLU, gives each part g·scale/√(var + ε) and its statistics their cotangents (the
    rest of the chain rule), from two channel sums and one product per part; the
    composition's own derivative saves and re-reads several intermediates of x's size.
    In d2l's training steps, with the statistics computed once per feature map:
    1.04× faster at batch 64, 96×96 (1.03× at batch 256, 32×32), 12 % less compiled memory.
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
    # select ran as a pass of its own; 1.02× faster steps at 96×96. (Unlike the select,
    # an infinite dy where y = 0 gives NaN; that step is lost either way.)
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


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d semantics over the channel (last) axis, optionally followed
    by ReLU (`relu=True`, as everywhere in d2l's DenseNet: one fused operation in training).

    Flax's `nn.BatchNorm` keeps the *biased* batch variance in its running average;
    PyTorch keeps the unbiased one (× n / (n - 1)). This module follows PyTorch so that
    running statistics, and so evaluation-mode outputs, stay identical after training.
    Statistics are computed in float32 (float64 for float64 compute) whatever the compute
    dtype.

    x: (N, H, W, C) → (N, H, W, C) in `dtype`; or feature maps (N, H, W, C_i) to be
    concatenated along channels, with their batch statistics (one (mean, var) per map) if
    already computed, as a dense block passes them.

    `relu_zero_per_channel`: set where the output feeds a 1×1 convolution (see
    `normalize`).
    """

    momentum: float = 0.1  # PyTorch's convention: new = (1 - momentum) * old + momentum * batch
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    relu: bool = False
    relu_zero_per_channel: bool = False

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array], train: bool,
                 statistics: Sequence[tuple[jax.Array, jax.Array]] | None = None) -> jax.Array:
        stats_dtype = param_dtype(self.dtype)
        parts = tuple(p.astype(stats_dtype) for p in (x if isinstance(x, (tuple, list)) else [x]))
        features = sum(p.shape[-1] for p in parts)
        scale = self.param("scale", nn.initializers.ones, (features,), stats_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), stats_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), stats_dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), stats_dtype)
        if not train:
            y = normalize(_concat(parts), running_mean.value, running_var.value, scale, bias,
                          self.epsilon, self.relu, self.relu_zero_per_channel)
            return y.astype(self.dtype)
        means, variances = zip(*(statistics or [batch_statistics(p) for p in parts]))
        if self.relu:
            y = batch_norm_relu(parts, means, variances, scale, bias, self.epsilon,
                                self.relu_zero_per_channel)
        else:
            y = normalize(_concat(parts), _concat(means), _concat(variances), scale, bias,
                          self.epsilon, relu=False)
        if not self.is_initializing():
            n = parts[0].size // parts[0].shape[-1]
            unbiased_var = _concat(variances) * (n / max(n - 1, 1))
            running_mean.value += self.momentum * (_concat(means) - running_mean.value)
            running_var.value += self.momentum * (unbiased_var - running_var.value)
        return y.astype(self.dtype)


class ConvBlock(nn.Module):
    """d2l's `conv_block`: BatchNorm → ReLU → Conv(kernel_size × kernel_size, padding
    kernel_size // 2), then, if `average_pool` = p > 1, AvgPool(p, stride p).

    The pool runs before the convolution, which needs a 1×1 kernel: both maps are linear,
    one over pixels and one over channels, so they commute (the bias too), and the
    convolution then reads p² times fewer pixels. In d2l's transitions (p = 2) this makes
    training steps 1.04× (batch 256, 32×32) and 1.07× (batch 64, 96×96) faster.

    x: (N, H, W, C_in), or feature maps and statistics as `BatchNorm` takes them →
    (N, H // p, W // p, features).
    """

    features: int
    kernel_size: int = 3
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    average_pool: int = 1

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array], train: bool,
                 statistics: Sequence[tuple[jax.Array, jax.Array]] | None = None) -> jax.Array:
        if self.average_pool > 1 and self.kernel_size != 1:
            raise ValueError(f"average_pool={self.average_pool} needs kernel_size=1 (a pool "
                             f"commutes only with a 1×1 convolution), got {self.kernel_size}")
        feeds_product = self.kernel_size == 1 and self.average_pool == 1
        x = BatchNorm(dtype=self.dtype, relu=True, relu_zero_per_channel=feeds_product,
                      name="norm")(x, train, statistics)
        if self.average_pool > 1:
            x = nn.avg_pool(x, (self.average_pool,) * 2, strides=(self.average_pool,) * 2)
        return nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                       padding=symmetric_padding(self.kernel_size), use_bias=self.use_bias,
                       dtype=self.dtype, param_dtype=param_dtype(self.dtype),
                       kernel_init=kernel_init, conv_general_dilated=conv_general_dilated,
                       name="conv")(x)


class DenseLayer(nn.Module):
    """One layer of a dense block: concatenates all earlier feature maps, then a
    `ConvBlock` giving `growth_rate` channels (preceded, in DenseNet-BC, by a 1×1
    bottleneck `ConvBlock` of `bottleneck_width * growth_rate` channels).

    features: tuple of (N, H, W, C_i), statistics: their batch statistics, one (mean, var)
    each, or None (computed here; ignored in evaluation) → (N, H, W, growth_rate).
    """

    growth_rate: int
    bottleneck_width: int | None = None
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool,
                 statistics: Sequence[tuple[jax.Array, jax.Array]] | None = None) -> jax.Array:
        x = tuple(features)
        if self.bottleneck_width:
            x = ConvBlock(self.bottleneck_width * self.growth_rate, 1, self.use_bias,
                          self.dtype, name="bottleneck")(x, train, statistics)
            x = checkpoint_name(x, "bottleneck")  # kept under remat: see DenseBlock
            statistics = None
        return ConvBlock(self.growth_rate, 3, self.use_bias, self.dtype,
                         name="conv_block")(x, train, statistics)


class DenseBlock(nn.Module):
    """d2l's `DenseBlock`: `num_convs` layers, each adding `growth_rate` channels.

    In training, each feature map's batch statistics are computed once, when the map is
    made, and handed to every later layer's BatchNorm (a channel's statistics do not
    depend on the layer that reads it): no layer re-reads all earlier maps for them, and
    the backward pass's terms through the statistics are one pass per map, not per layer.

    x: (N, H, W, C) → (N, H, W, C + num_convs * growth_rate).
    """

    num_convs: int
    growth_rate: int
    bottleneck_width: int | None = None
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layer_class, call = DenseLayer, functools.partial(_call_layer, train=train)
        if self.remat:
            # Each layer keeps only its input features for the backward pass, which are
            # the block's outputs anyway, and, in DenseNet-BC, its bottleneck's output, as
            # torchvision's memory-efficient DenseNet: recomputing the bottleneck (which
            # reads all earlier maps) made densenet121's steps 1.30× slower instead of
            # 1.19×, for 2.99× instead of 2.16× less compiled memory (224×224, batch 8).
            # `train` (argument 2, counting self) is static.
            layer_class = nn.remat(DenseLayer,
                                   policy=jax.checkpoint_policies.save_only_these_names(
                                       "bottleneck"),
                                   prevent_cse=False, static_argnums=(2,))
            call = recompute_when_the_cotangent_arrives(call)

        def statistics(feature_map):
            return batch_statistics(feature_map.astype(param_dtype(self.dtype))) if train else None

        features, stats = [x], [statistics(x)]
        for index in range(self.num_convs):
            layer = layer_class(self.growth_rate, self.bottleneck_width, self.use_bias, self.dtype,
                                name=f"layer{index + 1}")
            features.append(call(layer, (tuple(features), tuple(stats) if train else None)))
            stats.append(statistics(features[-1]))
        return jnp.concatenate(features, axis=-1)


def _call_layer(layer: DenseLayer, inputs, train: bool) -> jax.Array:
    """inputs: (features, statistics) as `DenseLayer` takes them."""
    features, statistics = inputs
    return layer(features, train, statistics)


def recompute_when_the_cotangent_arrives(call):
    """`call(module, x)` for a module under `nn.remat`, differentiated so that the
    backward pass's recomputation reads its residuals through the cotangent.

    Why: XLA:CPU removes `jax.checkpoint`'s optimisation barriers before its
    common-subexpression elimination, which then merges the recomputation back into the
    forward pass and keeps every activation alive in between (densenet121, 224×224,
    batch 8: 1,511 MiB compiled peak with and without remat). Residuals plus 0 · (the
    cotangent's first element) are operands that exist only once the backward pass
    reaches the layer, so the recomputation can neither be merged nor moved earlier.
    Floating-point 0 · c is not folded away (it is NaN for a non-finite c, whose
    gradients are not finite anyway). A scalar rather than one per example: a broadcast
    scalar stays inside XLA:CPU's YNNPACK fusions, an (N, 1, 1, 1) one does not (1,005
    instead of 585 MiB above).
    """

    def forward(module, x):
        return nn.vjp(call, module, x)

    def backward(vjp_fn, cotangent):
        zero = jnp.ravel(cotangent)[0] * 0
        return jax.tree.map(
            lambda r: r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.inexact) else r,
            vjp_fn)(cotangent)

    return nn.custom_vjp(call, forward, backward)


class TransitionBlock(nn.Module):
    """d2l's `transition_block`: BatchNorm → ReLU → Conv1×1 → AvgPool(2, stride 2), the
    pool computed before the convolution (see `ConvBlock`).

    x: (N, H, W, C) → (N, H // 2, W // 2, num_channels).
    """

    num_channels: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return ConvBlock(self.num_channels, 1, self.use_bias, self.dtype, average_pool=2,
                         name="conv_block")(x, train)


class DenseNet(nn.Module):
    """The full network: stem (Conv7×7/2 → BN → ReLU → MaxPool3×3/2), dense blocks with
    transitions between them, then BN → ReLU → global pool → Linear.

    x: (N, H, W, in_channels) floating, H and W ≥ `config.min_input_size()` →
    logits (N, num_classes) float32 (float64 for float64 compute).
    """

    config: DenseNetConfig = DenseNetConfig()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        check_input(x, cfg)
        if cfg.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError('dtype "float64" needs 64-bit JAX: call '
                             'jax.config.update("jax_enable_x64", True) first')
        dtype = cfg.compute_dtype
        x = nn.Conv(cfg.stem_channels, (7, 7), strides=(2, 2), padding=symmetric_padding(7),
                    use_bias=cfg.conv_bias, dtype=dtype, param_dtype=cfg.param_dtype,
                    kernel_init=kernel_init, conv_general_dilated=conv_general_dilated,
                    name="stem_conv")(x)
        x = BatchNorm(dtype=dtype, relu=True, name="stem_norm")(x, train)
        x = max_pool(x, (3, 3), (2, 2), symmetric_padding(3))
        bottleneck_width = cfg.bottleneck_width if cfg.bottleneck else None
        for index, num_convs in enumerate(cfg.block_config):
            x = DenseBlock(num_convs, cfg.growth_rate, bottleneck_width, cfg.conv_bias, dtype,
                           cfg.remat, name=f"dense_block{index + 1}")(x, train)
            if index < len(cfg.block_config) - 1:
                x = TransitionBlock(transition_channels(x.shape[-1], cfg.compression),
                                    cfg.conv_bias, dtype, name=f"transition{index + 1}")(x, train)
        x = BatchNorm(dtype=dtype, relu=True, name="head_norm")(x, train)
        x = jnp.max(x, axis=(1, 2)) if cfg.global_pool == "max" else jnp.mean(x, axis=(1, 2))
        x = nn.Dense(cfg.num_classes, dtype=dtype, param_dtype=cfg.param_dtype,
                     kernel_init=kernel_init, name="classifier")(x)
        return x.astype(cfg.param_dtype)


def check_input(x, cfg: DenseNetConfig) -> None:
    """Raise a one-line error for input the network cannot take, before XLA sees it."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"DenseNet expects an array of shape (N, H, W, C), got {type(x).__name__}")
    if len(shape) != 4:
        raise ValueError(
            f"DenseNet expects images of shape (N, H, W, C) (channels last), got shape "
            f"{tuple(shape)}; add the missing batch or channel axis, e.g. x[None] or x[..., None]")
    if shape[-1] != cfg.in_channels:
        raise ValueError(
            f"DenseNet expects {cfg.in_channels} input channel(s) on the last axis (NHWC), got "
            f"shape {tuple(shape)}; transpose NCHW data with x.transpose(0, 2, 3, 1) or set "
            f"in_channels in the config")
    minimum = cfg.min_input_size()
    if min(shape[1], shape[2]) < minimum:
        raise ValueError(
            f"input of {shape[1]}×{shape[2]} is too small: this DenseNet needs at least "
            f"{minimum}×{minimum}, since the stem divides height and width by 4 and each of its "
            f"{len(cfg.block_config) - 1} transitions by 2, which must leave at least 1×1 "
            f"before global pooling; resize the images (d2l uses 96×96)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"DenseNet expects floating-point images, got dtype {x.dtype}; convert first, "
            f"e.g. x.astype(jnp.float32) / 255")
