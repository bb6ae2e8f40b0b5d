"""The PyTorch reference networks (NCHW), the one copy the tests, the benchmark and the
cross-check use. Needs the `torch` extra: `pip install "densenet-jax[torch]"`.

- `d2l_densenet(config)`: d2l's `nn.Sequential` network as the source listing builds it
  (with its two typos fixed), generalised to the config's widths and depths.
- `TorchvisionDenseNet(config)`: DenseNet-BC with torchvision's module names.
"""
from __future__ import annotations

from collections import OrderedDict

try:
    import torch
    from torch import nn
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError('the PyTorch reference needs torch: pip install "densenet-jax[torch]"') from error

from densenet_jax.config import DenseNetConfig, transition_channels


def conv_block(input_channels: int, num_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(input_channels), nn.ReLU(),
                         nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1))


class DenseBlock(nn.Module):
    def __init__(self, num_convs: int, input_channels: int, num_channels: int):
        super().__init__()
        self.net = nn.Sequential(*(conv_block(num_channels * i + input_channels, num_channels)
                                   for i in range(num_convs)))

    def forward(self, X):
        for blk in self.net:
            Y = blk(X)
            X = torch.cat((X, Y), dim=1)
        return X


def transition_block(input_channels: int, num_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(input_channels), nn.ReLU(),
                         nn.Conv2d(input_channels, num_channels, kernel_size=1),
                         nn.AvgPool2d(kernel_size=2, stride=2))


def _global_pool(config: DenseNetConfig) -> nn.Module:
    return nn.AdaptiveMaxPool2d((1, 1)) if config.global_pool == "max" else nn.AdaptiveAvgPool2d((1, 1))


def _stem(config: DenseNetConfig) -> OrderedDict:
    """d2l's `b1` (torchvision's conv0 … pool0), or the paper's CIFAR stem: one 3×3 conv."""
    c, bias = config.stem_channels, config.conv_bias
    if config.stem == "cifar":
        return OrderedDict(conv0=nn.Conv2d(config.in_channels, c, 3, padding=1, bias=bias))
    return OrderedDict(conv0=nn.Conv2d(config.in_channels, c, 7, stride=2, padding=3, bias=bias),
                       norm0=nn.BatchNorm2d(c), relu0=nn.ReLU(),
                       pool0=nn.MaxPool2d(3, stride=2, padding=1))


def d2l_densenet(config: DenseNetConfig = DenseNetConfig()) -> nn.Sequential:
    """The source's network; `preset("d2l")` gives exactly its 0.76 M-parameter model."""
    if config.bottleneck:
        raise ValueError("d2l's network has no bottleneck layers; use TorchvisionDenseNet")
    b1 = nn.Sequential(*_stem(config).values())
    num_channels, growth_rate = config.stem_channels, config.growth_rate
    blks = []
    for i, num_convs in enumerate(config.block_config):
        blks.append(DenseBlock(num_convs, num_channels, growth_rate))
        num_channels += num_convs * growth_rate
        if i != len(config.block_config) - 1:
            out_channels = transition_channels(num_channels, config.compression)
            blks.append(transition_block(num_channels, out_channels))
            num_channels = out_channels
    return nn.Sequential(b1, *blks, nn.BatchNorm2d(num_channels), nn.ReLU(),
                         _global_pool(config), nn.Flatten(),
                         nn.Linear(num_channels, config.num_classes))


class _DenseLayer(nn.Module):
    def __init__(self, input_channels: int, growth_rate: int, bn_size: int, bias: bool):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(input_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(input_channels, bn_size * growth_rate, 1, bias=bias)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=bias)

    def forward(self, features: list):
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, input_channels, growth_rate, bn_size, bias):
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = _DenseLayer(input_channels + i * growth_rate,
                                                    growth_rate, bn_size, bias)

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class TorchvisionDenseNet(nn.Module):
    """DenseNet-BC with torchvision's state_dict keys (`features.denseblock1...`)."""

    def __init__(self, config: DenseNetConfig):
        super().__init__()
        if not config.bottleneck:
            raise ValueError("the torchvision layout is DenseNet-BC: set bottleneck=True")
        self.global_pool = config.global_pool
        bias = config.conv_bias
        c = config.stem_channels
        self.features = nn.Sequential(_stem(config))
        for i, num_layers in enumerate(config.block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(
                num_layers, c, config.growth_rate, config.bottleneck_width, bias))
            c += num_layers * config.growth_rate
            if i != len(config.block_config) - 1:
                out = transition_channels(c, config.compression)
                self.features.add_module(f"transition{i + 1}", nn.Sequential(OrderedDict([
                    ("norm", nn.BatchNorm2d(c)), ("relu", nn.ReLU()),
                    ("conv", nn.Conv2d(c, out, 1, bias=bias)),
                    ("pool", nn.AvgPool2d(2, stride=2))])))
                c = out
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, config.num_classes)

    def forward(self, x):
        x = torch.relu(self.features(x))
        pooled = torch.amax(x, (2, 3)) if self.global_pool == "max" else torch.mean(x, (2, 3))
        return self.classifier(pooled)


def reference_model(config: DenseNetConfig) -> nn.Module:
    """The PyTorch network whose state_dict `densenet_jax.from_torch(…, config)` reads."""
    return TorchvisionDenseNet(config) if config.bottleneck else d2l_densenet(config)


def xavier_init_(model: nn.Module) -> nn.Module:
    """d2l's `train_ch6` initialisation: Xavier-uniform for every Conv2d and Linear weight."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
    return model
