"""d2l's DenseNet as Flax Linen modules, in NHWC.

| d2l (PyTorch)                   | here              |
|---------------------------------|-------------------|
| `conv_block`                    | `ConvBlock`       |
| `DenseBlock`                    | `DenseBlock`      |
| `transition_block`              | `TransitionBlock` |
| `nn.Sequential(b1, *blks, ...)` | `DenseNet`        |

BatchNorm state lives in the `batch_stats` collection: apply with `train=True,
mutable=["batch_stats"]` to train, `train=False` to evaluate with the running statistics.
What a backend may compute its own way comes from a kernel set (`densenet_jax.kernels`).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from densenet_jax.config import DenseNetConfig, param_dtype, transition_channels
from densenet_jax.kernels import Kernels, get_kernels

Dtype = Any
REFERENCE = get_kernels("reference")
# d2l's train_ch6 re-initialises every Conv2d and Linear weight with Xavier-uniform.
kernel_init = nn.initializers.xavier_uniform()


def symmetric_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's `padding=kernel_size // 2` on both sides; 'SAME' would pad strided
    convolutions asymmetrically (2, 3) where PyTorch pads (3, 3)."""
    pad = kernel_size // 2
    return ((pad, pad), (pad, pad))


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d over the channel (last) axis, then ReLU if `relu`.

    Flax's `nn.BatchNorm` keeps the *biased* batch variance in its running average;
    PyTorch keeps the unbiased one (× n / (n − 1)), and so does this module, so that running
    statistics, and evaluation-mode outputs, stay identical after training. Statistics are
    computed in float32 (float64 for float64 compute) whatever the compute dtype.

    x: (N, H, W, C) → (N, H, W, C) in `dtype`.
    """

    momentum: float = 0.1  # PyTorch's: new = (1 − momentum) · old + momentum · batch
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    relu: bool = False
    feeds_1x1_conv: bool = False  # a hint for the kernels (see `Kernels.batch_norm`)
    kernels: Kernels = REFERENCE

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        stats_dtype = param_dtype(self.dtype)
        x = x.astype(stats_dtype)
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), stats_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), stats_dtype)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), stats_dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), stats_dtype)
        n = math.prod(x.shape[:-1])  # values per channel
        if train and n <= 1:
            raise ValueError(f"BatchNorm in training needs more than 1 value per channel, got "
                             f"input of shape {tuple(x.shape)}: use a larger batch (or larger "
                             f"images), or evaluate with train=False")
        if train and not (self.is_initializing() or self.is_mutable_collection("batch_stats")):
            raise ValueError("BatchNorm in training updates its running statistics: call "
                             "apply(variables, x, train=True, mutable=[\"batch_stats\"]), "
                             "which returns (output, updates), or evaluate with train=False")
        if not train:
            y = (x - running_mean.value) * (scale * jax.lax.rsqrt(running_var.value
                                                                  + self.epsilon)) + bias
            return (jax.nn.relu(y) if self.relu else y).astype(self.dtype)
        y, mean, var = self.kernels.batch_norm(x, scale, bias, epsilon=self.epsilon, relu=self.relu,
                                               feeds_1x1_conv=self.feeds_1x1_conv)
        if not self.is_initializing():
            running_mean.value += self.momentum * (mean - running_mean.value)
            running_var.value += self.momentum * (var * (n / max(n - 1, 1)) - running_var.value)
        return y.astype(self.dtype)


class ConvBlock(nn.Module):
    """d2l's `conv_block`: BatchNorm → ReLU → Conv(kernel_size × kernel_size, padding
    kernel_size // 2); with `average_pool` = p > 1, then AvgPool(p, stride p).

    The pool runs before the convolution, which must then be 1×1: both are linear, one
    over pixels and one over channels, so they commute (the bias too), and the
    convolution reads p² times fewer pixels.

    x: (N, H, W, C_in) → (N, H // p, W // p, features).
    """

    features: int
    kernel_size: int = 3
    use_bias: bool = True
    average_pool: int = 1
    dtype: Dtype = jnp.float32
    kernels: Kernels = REFERENCE

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.average_pool > 1 and self.kernel_size != 1:
            raise ValueError(f"average_pool={self.average_pool} needs kernel_size=1 (a pool "
                             f"commutes only with a 1×1 convolution), got {self.kernel_size}")
        x = BatchNorm(relu=True, feeds_1x1_conv=self.kernel_size == 1 and self.average_pool == 1,
                      dtype=self.dtype, kernels=self.kernels, name="norm")(x, train=train)
        if self.average_pool > 1:
            x = nn.avg_pool(x, (self.average_pool,) * 2, strides=(self.average_pool,) * 2)
        return nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                       padding=symmetric_padding(self.kernel_size), use_bias=self.use_bias,
                       dtype=self.dtype, param_dtype=param_dtype(self.dtype),
                       kernel_init=kernel_init, name="conv",
                       conv_general_dilated=self.kernels.conv_general_dilated)(x)


class DenseLayer(nn.Module):
    """One layer of a dense block: d2l's `conv_block` giving `growth_rate` channels,
    preceded in DenseNet-BC by a 1×1 bottleneck `conv_block` of
    `bottleneck_width · growth_rate` channels.

    x: (N, H, W, C), all earlier feature maps concatenated → (N, H, W, growth_rate).
    """

    growth_rate: int
    bottleneck_width: int | None = None
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernels: Kernels = REFERENCE

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:  # train: remat's static arg
        if self.bottleneck_width:
            x = ConvBlock(features=self.bottleneck_width * self.growth_rate, kernel_size=1,
                          use_bias=self.use_bias, dtype=self.dtype, kernels=self.kernels,
                          name="bottleneck")(x, train=train)
            x = checkpoint_name(x, "bottleneck")  # what remat keeps (see DenseBlock)
        return ConvBlock(features=self.growth_rate, kernel_size=3, use_bias=self.use_bias,
                         dtype=self.dtype, kernels=self.kernels, name="conv_block")(x, train=train)


class DenseBlock(nn.Module):
    """d2l's `DenseBlock`: `num_convs` layers; each one's output is concatenated to its
    input along channels, so each layer sees every earlier feature map.

    `remat`: each layer is recomputed in the backward pass from its input (kept anyway),
    saving only, in DenseNet-BC, its bottleneck's output: the memory-efficient DenseNet
    (Pleiss et al.; torchvision's `memory_efficient`).

    x: (N, H, W, C) → (N, H, W, C + num_convs · growth_rate).
    """

    num_convs: int
    growth_rate: int
    bottleneck_width: int | None = None
    use_bias: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32
    kernels: Kernels = REFERENCE

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        layer = self.kernels.remat(DenseLayer) if self.remat else DenseLayer
        for index in range(self.num_convs):
            y = layer(growth_rate=self.growth_rate, bottleneck_width=self.bottleneck_width,
                      use_bias=self.use_bias, dtype=self.dtype, kernels=self.kernels,
                      name=f"layer{index + 1}")(x, train)
            x = self.kernels.concatenate(x, y, train=train)
        return x


class TransitionBlock(nn.Module):
    """d2l's `transition_block`: BatchNorm → ReLU → Conv1×1 → AvgPool(2, stride 2), the
    pool computed before the convolution (see `ConvBlock`).

    x: (N, H, W, C) → (N, H // 2, W // 2, num_channels).
    """

    num_channels: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernels: Kernels = REFERENCE

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return ConvBlock(features=self.num_channels, kernel_size=1, use_bias=self.use_bias,
                         average_pool=2, dtype=self.dtype, kernels=self.kernels,
                         name="conv_block")(x, train=train)


class DenseNet(nn.Module):
    """The whole network: stem (Conv7×7/2 → BN → ReLU → MaxPool3×3/2, or the CIFAR stem's
    Conv3×3), dense blocks with transitions between them, then BN → ReLU → global pool →
    Linear.

    x: (N, H, W, in_channels) floating, H and W ≥ `config.min_input_size()` →
    logits (N, num_classes) float32 (float64 for float64 compute).
    """

    config: DenseNetConfig = DenseNetConfig()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        check_input(x, cfg)
        dtype, kernels = cfg.compute_dtype, get_kernels(cfg.kernels)
        imagenet = cfg.stem == "imagenet"
        size = 7 if imagenet else 3
        x = nn.Conv(cfg.stem_channels, (size, size), strides=(2, 2) if imagenet else (1, 1),
                    padding=symmetric_padding(size), use_bias=cfg.conv_bias, dtype=dtype,
                    param_dtype=cfg.param_dtype, kernel_init=kernel_init,
                    conv_general_dilated=kernels.conv_general_dilated, name="stem_conv")(x)
        if imagenet:  # d2l's b1; the CIFAR stem keeps the full resolution for small images
            x = BatchNorm(relu=True, dtype=dtype, kernels=kernels, name="stem_norm")(x,
                                                                                  train=train)
            x = kernels.max_pool(x, (3, 3), (2, 2), symmetric_padding(3))
        for index, num_convs in enumerate(cfg.block_config):
            x = DenseBlock(num_convs=num_convs, growth_rate=cfg.growth_rate,
                           bottleneck_width=cfg.bottleneck_width if cfg.bottleneck else None,
                           use_bias=cfg.conv_bias, remat=cfg.remat, dtype=dtype,
                           kernels=kernels, name=f"dense_block{index + 1}")(x, train=train)
            if index < len(cfg.block_config) - 1:
                x = TransitionBlock(num_channels=transition_channels(x.shape[-1], cfg.compression),
                                    use_bias=cfg.conv_bias, dtype=dtype, kernels=kernels,
                                    name=f"transition{index + 1}")(x, train=train)
        x = BatchNorm(relu=True, dtype=dtype, kernels=kernels, name="head_norm")(x, train=train)
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
            f"{minimum}×{minimum}, since {cfg.downsampling()}, which must leave at least 1×1 "
            f"before global pooling; resize the images (d2l uses 96×96)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"DenseNet expects floating-point images, got dtype {x.dtype}; convert first, "
            f"e.g. x.astype(jnp.float32) / 255")
    if cfg.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError('dtype "float64" needs 64-bit JAX: call '
                         'jax.config.update("jax_enable_x64", True) first')
