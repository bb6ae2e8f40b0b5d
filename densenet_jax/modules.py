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
from jax.custom_derivatives import SymbolicZero

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


def batch_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Batch mean and biased variance of each channel, in two passes as PyTorch (no
    E[x²] − E[x]², which cancels when |mean| >> std). x: (..., C) → (C,), (C,)."""
    mean = jnp.mean(x.reshape(-1, x.shape[-1]), 0)
    var = jnp.mean(jnp.square(x.reshape(-1, *x.shape[-2:]) - mean), (0, 1))
    return mean, var


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
              bias: jax.Array, epsilon: float, relu: bool) -> jax.Array:
    """(x − mean) / √(var + ε) · scale + bias, then ReLU if asked. x: (..., C).

    (x − mean) first, as PyTorch does: folding the mean into the shift,
    x · m + (bias − mean · m), cancels catastrophically when |mean| >> std."""
    y = (x.reshape(-1, x.shape[-1]) - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias
    return (jnp.maximum(y, 0) if relu else y).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_relu(x: jax.Array, scale: jax.Array, bias: jax.Array,
                    epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ReLU(BatchNorm(x)) with the batch's statistics (training mode), and those statistics.

    x: (..., C), scale and bias: (C,) → y like x, mean (C,), biased variance (C,).
    Reverse mode only. Its derivative keeps x and y for the backward pass and recomputes
    the normalised input there, in three passes over the activations (the ReLU mask,
    the two channel sums, the input gradient); differentiating the composition instead
    saves and re-reads several intermediates of x's size.
    """
    mean, var = batch_statistics(x)
    return normalize(x, mean, var, scale, bias, epsilon, relu=True), mean, var


def _batch_norm_relu_fwd(x, scale, bias, epsilon):
    x, scale, bias = x.value, scale.value, bias.value
    y, mean, var = batch_norm_relu(x, scale, bias, epsilon)
    return (y, mean, var), (x, y, mean, var, scale)


def _batch_norm_relu_bwd(epsilon, residuals, cotangents):
    x, y, mean, var, scale = residuals
    dy, dmean, dvar = cotangents
    axes, n = tuple(range(x.ndim - 1)), x.size // x.shape[-1]
    rstd = jax.lax.rsqrt(var + epsilon)
    # ReLU's mask as dy · sign(y), which is dy or 0 since y ≥ 0: arithmetic stays inside
    # XLA:CPU's YNNPACK fusions (here with the convolution that computes dy), where a
    # select ran as a pass of its own; 1.02× faster steps at 96×96. (Unlike the select,
    # an infinite dy where y = 0 gives NaN; that step is lost either way.)
    g = jnp.zeros_like(x) if isinstance(dy, SymbolicZero) else dy * jnp.sign(y)
    centered = x - mean  # (N, H, W, C): see the note on views
    dbias, dscale = jnp.sum(g, axes), jnp.sum(g * centered, axes) * rstd
    # scale·rstd·(g − dbias/n − x̂·dscale/n), x̂ = centered·rstd, as a·g + b·centered + c
    # with per-channel a, b, c: fewer full-size operations, and 1.03–1.05× faster d2l
    # steps on the CPU (batch 256 at 32×32, batch 64 at 96×96).
    a = scale * rstd
    dx = a * g + centered * (-a * rstd * dscale / n) - a * dbias / n
    # The statistics' own cotangents: zero in training (they only feed batch_stats).
    if not isinstance(dmean, SymbolicZero):
        dx = dx + dmean / n
    if not isinstance(dvar, SymbolicZero):
        dx = dx + centered * (2 * dvar / n)
    return dx, dscale, dbias


batch_norm_relu.defvjp(_batch_norm_relu_fwd, _batch_norm_relu_bwd, symbolic_zeros=True)


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d semantics over the channel (last) axis, optionally followed
    by ReLU (`relu=True`, as everywhere in d2l's DenseNet: one fused operation in training).

    Flax's `nn.BatchNorm` keeps the *biased* batch variance in its running average;
    PyTorch keeps the unbiased one (× n / (n - 1)). This module follows PyTorch so that
    running statistics, and so evaluation-mode outputs, stay identical after training.
    Statistics are computed in float32 (float64 for float64 compute) whatever the compute
    dtype.

    x: (N, H, W, C) → (N, H, W, C) in `dtype`.
    """

    momentum: float = 0.1  # PyTorch's convention: new = (1 - momentum) * old + momentum * batch
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    relu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features, stats_dtype = x.shape[-1], param_dtype(self.dtype)
        scale = self.param("scale", nn.initializers.ones, (features,), stats_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), stats_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), stats_dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), stats_dtype)
        x = x.astype(stats_dtype)
        if not train:
            y = normalize(x, running_mean.value, running_var.value, scale, bias, self.epsilon,
                          self.relu)
            return y.astype(self.dtype)
        if self.relu:
            y, mean, var = batch_norm_relu(x, scale, bias, self.epsilon)
        else:
            mean, var = batch_statistics(x)
            y = normalize(x, mean, var, scale, bias, self.epsilon, relu=False)
        if not self.is_initializing():
            n = x.size // features
            unbiased_var = var * (n / max(n - 1, 1))
            running_mean.value += self.momentum * (mean - running_mean.value)
            running_var.value += self.momentum * (unbiased_var - running_var.value)
        return y.astype(self.dtype)


class ConvBlock(nn.Module):
    """d2l's `conv_block`: BatchNorm → ReLU → Conv(kernel_size × kernel_size, padding
    kernel_size // 2), then, if `average_pool` = p > 1, AvgPool(p, stride p).

    The pool runs before the convolution, which needs a 1×1 kernel: both maps are linear,
    one over pixels and one over channels, so they commute (the bias too), and the
    convolution then reads p² times fewer pixels. In d2l's transitions (p = 2) this makes
    training steps 1.04× (batch 256, 32×32) and 1.07× (batch 64, 96×96) faster.

    x: (N, H, W, C_in) → (N, H // p, W // p, features).
    """

    features: int
    kernel_size: int = 3
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    average_pool: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.average_pool > 1 and self.kernel_size != 1:
            raise ValueError(f"average_pool={self.average_pool} needs kernel_size=1 (a pool "
                             f"commutes only with a 1×1 convolution), got {self.kernel_size}")
        x = BatchNorm(dtype=self.dtype, relu=True, name="norm")(x, train)
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

    features: tuple of (N, H, W, C_i) → (N, H, W, growth_rate).
    """

    growth_rate: int
    bottleneck_width: int | None = None
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool) -> jax.Array:
        x = jnp.concatenate(features, axis=-1) if len(features) > 1 else features[0]
        if self.bottleneck_width:
            x = ConvBlock(self.bottleneck_width * self.growth_rate, 1, self.use_bias,
                          self.dtype, name="bottleneck")(x, train)
        return ConvBlock(self.growth_rate, 3, self.use_bias, self.dtype,
                         name="conv_block")(x, train)


class DenseBlock(nn.Module):
    """d2l's `DenseBlock`: `num_convs` layers, each adding `growth_rate` channels.

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
            # the block's outputs anyway; `train` (argument 2, counting self) is static.
            layer_class = nn.remat(DenseLayer, policy=jax.checkpoint_policies.nothing_saveable,
                                   prevent_cse=False, static_argnums=(2,))
            call = recompute_when_the_cotangent_arrives(call)
        features = [x]
        for index in range(self.num_convs):
            layer = layer_class(self.growth_rate, self.bottleneck_width, self.use_bias, self.dtype,
                                name=f"layer{index + 1}")
            features.append(call(layer, tuple(features)))
        return jnp.concatenate(features, axis=-1)


def _call_layer(layer: DenseLayer, features: tuple[jax.Array, ...], train: bool) -> jax.Array:
    return layer(features, train)


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
