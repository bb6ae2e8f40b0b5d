"""densenet_jax: d2l's DenseNet in Flax Linen, exact to the PyTorch reference.

    import densenet_jax
    model = densenet_jax.DenseNet(densenet_jax.preset("d2l"))
    variables = model.init(key, x, train=False)   # x: (N, H, W, C) float
"""
from densenet_jax import kernels
from densenet_jax.config import PRESETS, DenseNetConfig, preset, transition_channels
from densenet_jax.convert import from_torch, to_torch
from densenet_jax.modules import (BatchNorm, ConvBlock, DenseBlock, DenseLayer, DenseNet,
                                  TransitionBlock)
from densenet_jax.pretrained import fine_tune_variables, load_pytorch


__all__ = ["BatchNorm", "ConvBlock", "DenseBlock", "DenseLayer", "DenseNet", "DenseNetConfig",
           "PRESETS", "TransitionBlock", "fine_tune_variables", "from_torch", "kernels",
           "load_pytorch", "preset", "to_torch", "transition_channels"]
