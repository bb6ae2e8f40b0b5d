"""The interface every kernel set fills in (see `densenet_jax.kernels`)."""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One kernel set. Every function takes and returns NHWC arrays.

    batch_norm: training-mode BatchNorm, then ReLU if `relu`:
      (x, scale, bias, *, epsilon, relu, feeds_1x1_conv) → (y, batch mean, biased batch
      variance); x (N, H, W, C) in the statistics' dtype, or what `concatenate` returned.
      `feeds_1x1_conv` says the output feeds a 1×1 convolution.
    concatenate: (x, y, *, train) → x and y joined along channels, d2l's
      `torch.cat((X, Y), dim=1)`; in training a set may keep the maps apart (with their
      batch statistics) for the next `batch_norm`.
    conv_general_dilated: `jax.lax.conv_general_dilated`'s signature, for `nn.Conv`.
    max_pool: (x, window, strides, padding) → PyTorch's MaxPool2d, padded with -inf; each
      window's gradient goes to its first maximum in row-major order, as PyTorch's does.
    remat: a module class → the same module, recomputed in the backward pass from its
      inputs, keeping only values tagged with `checkpoint_name(..., "bottleneck")`.
    finish_gradients: gradients → the same gradients, before the optimiser's update.
    """

    name: str
    batch_norm: Callable
    concatenate: Callable
    conv_general_dilated: Callable
    max_pool: Callable
    remat: Callable
    finish_gradients: Callable
