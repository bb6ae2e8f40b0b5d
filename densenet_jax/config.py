"""One frozen config describes a DenseNet; presets name the common ones.

`preset("d2l")` is exactly the network of d2l's DenseNet chapter; the `densenet*` presets
are DenseNet-BC (Huang et al., 2017) in the torchvision layout.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from densenet_jax.kernels import KERNEL_SETS

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
_GLOBAL_POOLS = ("max", "avg")
_STEMS = ("imagenet", "cifar")


@dataclasses.dataclass(frozen=True)
class DenseNetConfig:
    """Everything that defines a DenseNet.

    Attributes:
      stem: "imagenet" (d2l and torchvision: Conv7×7/2 → BN → ReLU → MaxPool3×3/2, a
        quarter of the input's height and width) or "cifar" (Huang et al.'s network for
        small images: one Conv3×3 at full resolution, nothing after it).
      stem_channels: output channels of the stem convolution (the paper's CIFAR stem: 2k).
      block_config: number of dense layers (`num_convs`) in each dense block.
      growth_rate: channels each dense layer adds (k in the paper).
      bottleneck: DenseNet-BC layers (BN-ReLU-Conv1×1 to `bottleneck_width * k` channels,
        then BN-ReLU-Conv3×3); False gives d2l's `conv_block` (BN-ReLU-Conv3×3 only).
      bottleneck_width: the bottleneck's multiple of `growth_rate` (torchvision's `bn_size`).
      compression: transitions keep `floor(c * compression)` channels (d2l: `c // 2`).
      global_pool: "max" as in the source listing, "avg" as in the current d2l book and
        torchvision.
      conv_bias: convolutions carry a bias (d2l: yes; torchvision: no).
      num_classes: size of the logits.
      in_channels: channels of the input images.
      dtype: compute dtype, "float32" or "bfloat16"; parameters, BatchNorm statistics and
        logits stay float32. "float64" (everything in float64, with `jax_enable_x64`) serves
        exact comparisons with the PyTorch reference.
      remat: recompute each dense layer (concat, BN, ReLU, convolutions) in the backward
        pass from its input features, which the block keeps anyway (memory-efficient
        DenseNet, Pleiss et al., 2017).
    """

    stem: str = "imagenet"
    stem_channels: int = 64
    block_config: tuple[int, ...] = (4, 4, 4, 4)
    growth_rate: int = 32
    bottleneck: bool = False
    bottleneck_width: int = 4
    compression: float = 0.5
    global_pool: str = "max"
    conv_bias: bool = True
    num_classes: int = 10
    in_channels: int = 1
    dtype: str = "float32"
    remat: bool = False
    kernels: str = "auto"

    def __post_init__(self):
        # Lists are accepted for convenience; the stored value is a tuple so the config
        # stays hashable (it is a static argument of jitted functions).
        if isinstance(self.block_config, (list, tuple)):
            object.__setattr__(self, "block_config", tuple(self.block_config))
        problems = list(_config_problems(self))
        problems = problems or list(_channel_problems(self))
        if problems:
            raise ValueError("invalid DenseNetConfig: " + "; ".join(problems))

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def param_dtype(self):
        return param_dtype(self.compute_dtype)

    def stage_channels(self) -> tuple[int, ...]:
        """Channels after the stem and after every dense block and transition.

        For d2l's network: (64, 192, 96, 224, 112, 240, 120, 248).
        """
        channels = [self.stem_channels]
        c = self.stem_channels
        for index, num_convs in enumerate(self.block_config):
            c += num_convs * self.growth_rate
            channels.append(c)
            if index < len(self.block_config) - 1:
                c = transition_channels(c, self.compression)
                channels.append(c)
        return tuple(channels)

    @property
    def num_features(self) -> int:
        """Channels entering the classifier."""
        return self.stage_channels()[-1]

    def output_size(self, size: int) -> int:
        """Height (or width) of the last feature map for an input of height `size`."""
        if self.stem == "imagenet":
            size = (size + 2 * 3 - 7) // 2 + 1  # stem conv 7×7, stride 2, padding 3
            size = (size + 2 * 1 - 3) // 2 + 1  # max pool 3×3, stride 2, padding 1
        for _ in self.block_config[1:]:
            size //= 2  # each transition's 2×2 average pool
        return size

    def min_input_size(self) -> int:
        """Smallest input height (and width) that leaves a 1×1 map before global pooling."""
        size = 1
        while self.output_size(size) < 1:
            size += 1
        return size

    def require_input_size(self, size: int, name: str = "input size") -> None:
        """ValueError, naming `name` (a flag, say), if `size` is below `min_input_size()`."""
        if size < self.min_input_size():
            raise ValueError(f"{name} {size} is below this network's minimum input size "
                             f"{self.min_input_size()} ({self.downsampling()})")

    def downsampling(self) -> str:
        """How the network shrinks its input, in words, for error messages."""
        transitions = len(self.block_config) - 1
        if self.stem == "imagenet":
            return (f"the stem divides height and width by 4 and each of its {transitions} "
                    f"transitions by 2")
        return (f"the stem keeps height and width and each of its {transitions} transitions "
                f"halves them")


def param_dtype(compute_dtype):
    """Parameters and statistics are kept in at least float32 (bf16 compute → float32)."""
    return jnp.promote_types(compute_dtype, jnp.float32)


def transition_channels(channels: int, compression: float) -> int:
    """Channels a transition keeps: d2l's `c // 2` when compression is 0.5."""
    return int(channels * compression)


def _config_problems(cfg: DenseNetConfig):
    def positive_int(name):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            yield f"{name} must be a positive integer, got {value!r}"

    for name in ("stem_channels", "growth_rate", "bottleneck_width", "num_classes",
                 "in_channels"):
        yield from positive_int(name)
    if not isinstance(cfg.block_config, tuple):
        yield f"block_config must be a sequence of positive integers, got {cfg.block_config!r}"
    elif not cfg.block_config:
        yield "block_config must name at least one dense block, got ()"
    elif any(isinstance(n, bool) or not isinstance(n, int) or n <= 0
             for n in cfg.block_config):
        yield f"block_config must hold positive integers, got {cfg.block_config!r}"
    if not isinstance(cfg.compression, (int, float)) or not 0 < cfg.compression <= 1:
        yield f"compression must lie in (0, 1], got {cfg.compression!r}"
    if cfg.stem not in _STEMS:
        yield f"stem must be one of {_STEMS}, got {cfg.stem!r}"
    if cfg.global_pool not in _GLOBAL_POOLS:
        yield f"global_pool must be one of {_GLOBAL_POOLS}, got {cfg.global_pool!r}"
    if cfg.dtype not in _DTYPES:
        yield f"dtype must be one of {tuple(_DTYPES)}, got {cfg.dtype!r}"
    if cfg.kernels not in KERNEL_SETS:
        yield f"kernels must be one of {KERNEL_SETS}, got {cfg.kernels!r}"
    for name in ("bottleneck", "conv_bias", "remat"):
        if not isinstance(getattr(cfg, name), bool):
            yield f"{name} must be True or False, got {getattr(cfg, name)!r}"


def _channel_problems(cfg: DenseNetConfig):
    """For an otherwise valid config: every transition keeps at least one channel."""
    channels = cfg.stage_channels()
    if min(channels) < 1:
        yield (f"compression {cfg.compression} leaves a transition with 0 channels "
               f"(channels per stage: {channels}); raise compression")


_BC = dict(bottleneck=True, conv_bias=False, global_pool="avg")

PRESETS: dict[str, dict] = {
    "d2l": {},
    "densenet121": dict(_BC, block_config=(6, 12, 24, 16)),
    "densenet161": dict(_BC, stem_channels=96, growth_rate=48, block_config=(6, 12, 36, 24)),
    "densenet169": dict(_BC, block_config=(6, 12, 32, 32)),
    "densenet201": dict(_BC, block_config=(6, 12, 48, 32)),
    "densenet264": dict(_BC, block_config=(6, 12, 64, 48)),
    # The paper's CIFAR network (Table 2, k = 12, depth 100): 0.77 M parameters.
    "densenet_bc_100": dict(_BC, stem="cifar", stem_channels=24, growth_rate=12,
                            block_config=(16, 16, 16)),
}


def parse_fields(assignments, config_class=DenseNetConfig) -> dict:
    """Fields of a config dataclass (DenseNetConfig by default) from "FIELD=VALUE" strings,
    typed as the field's default: `["growth_rate=12", "block_config=6,12,24,16",
    "bottleneck=true"]` → `{"growth_rate": 12, "block_config": (6, 12, 24, 16),
    "bottleneck": True}`. ValueError, in one line, for an unknown field or a value of the
    wrong kind; the values themselves are the config's to check."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    fields = {}
    for text in assignments:
        name, equals, value = text.partition("=")
        if not equals or name not in defaults:
            raise ValueError(f"{text!r} is not FIELD=VALUE with a {config_class.__name__} "
                             f"field; the fields: {', '.join(defaults)}")
        fields[name] = _parse_value(name, value, defaults[name])
    return fields


def _parse_value(name: str, value: str, default):
    kinds = ((bool, "true or false", lambda v: {"true": True, "false": False}[v.lower()]),
             (int, "an integer", int), (float, "a number", float),
             (tuple, "comma-separated integers", lambda v: tuple(int(x) for x in v.split(","))),
             (str, "a word", str))
    for kind, words, parse in kinds:
        if isinstance(default, kind):
            try:
                return parse(value)
            except (KeyError, ValueError):
                raise ValueError(f"{name}={value}: {name} takes {words}") from None
    raise AssertionError(f"no parser for {name}")


def preset(name: str = "d2l", **overrides) -> DenseNetConfig:
    """The named network, with any field overridden: `preset("densenet121", num_classes=1000)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(DenseNetConfig)}
    if unknown:
        raise ValueError(f"unknown DenseNetConfig field(s) {', '.join(sorted(unknown))}; "
                         f"valid fields: {', '.join(f.name for f in dataclasses.fields(DenseNetConfig))}")
    return DenseNetConfig(**{**PRESETS[name], **overrides})
