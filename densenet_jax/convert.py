"""PyTorch weights ↔ Flax variables, with no import of torch.

Two layouts, chosen by the config:
- d2l's `nn.Sequential` network (`bottleneck=False`): keys `0.0.weight` (stem conv),
  `1.net.0.0.weight` (block 1, conv_block 0, BatchNorm), `2.2.weight` (transition 1 conv), ...
- torchvision's DenseNet-BC (`bottleneck=True`): `features.conv0.weight`,
  `features.denseblock1.denselayer1.conv1.weight`, ..., `classifier.weight`.

Conv weights OIHW ↔ HWIO; Linear `weight.T` ↔ `kernel`; BatchNorm `weight, bias` ↔ params
`scale, bias` and `running_mean, running_var` ↔ batch_stats `mean, var` (both unbiased, as
`densenet_jax.BatchNorm` keeps them).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax.config import DenseNetConfig
from densenet_jax.modules import DenseNet

Path = tuple[str, ...]
# For each kind of torch module: (torch name, flax collection, flax name, OIHW→HWIO etc.).
_CONV_HWIO = (2, 3, 1, 0)
_LEAVES = {
    "conv": (("weight", "params", "kernel", _CONV_HWIO), ("bias", "params", "bias", None)),
    "bn": (("weight", "params", "scale", None), ("bias", "params", "bias", None),
           ("running_mean", "batch_stats", "mean", None),
           ("running_var", "batch_stats", "var", None)),
    "linear": (("weight", "params", "kernel", (1, 0)), ("bias", "params", "bias", None)),
}
# Counted by PyTorch's BatchNorm, unused by momentum-based running statistics.
_IGNORED_SUFFIX = ".num_batches_tracked"


def layout(config: DenseNetConfig) -> str:
    """"torchvision" for DenseNet-BC configs, "sequential" (d2l's network) otherwise."""
    return "torchvision" if config.bottleneck else "sequential"


def _modules(config: DenseNetConfig) -> Iterator[tuple[str, Path, str]]:
    """(torch module prefix, flax module path, kind) for every module with weights."""
    blocks = config.block_config
    if layout(config) == "sequential":
        yield "0.0", ("stem_conv",), "conv"
        if config.stem == "imagenet":
            yield "0.1", ("stem_norm",), "bn"
        for b, num_convs in enumerate(blocks):
            index = 1 + 2 * b
            for i in range(num_convs):
                layer = (f"dense_block{b + 1}", f"layer{i + 1}", "conv_block")
                yield f"{index}.net.{i}.0", layer + ("norm",), "bn"
                yield f"{index}.net.{i}.2", layer + ("conv",), "conv"
            if b < len(blocks) - 1:
                transition = (f"transition{b + 1}", "conv_block")
                yield f"{index + 1}.0", transition + ("norm",), "bn"
                yield f"{index + 1}.2", transition + ("conv",), "conv"
        # after the blocks: BatchNorm, ReLU, global pool, Flatten, Linear
        yield f"{2 * len(blocks)}", ("head_norm",), "bn"
        yield f"{2 * len(blocks) + 4}", ("classifier",), "linear"
    else:
        yield "features.conv0", ("stem_conv",), "conv"
        if config.stem == "imagenet":
            yield "features.norm0", ("stem_norm",), "bn"
        for b, num_convs in enumerate(blocks):
            for i in range(num_convs):
                torch_layer = f"features.denseblock{b + 1}.denselayer{i + 1}"
                layer = (f"dense_block{b + 1}", f"layer{i + 1}")
                yield f"{torch_layer}.norm1", layer + ("bottleneck", "norm"), "bn"
                yield f"{torch_layer}.conv1", layer + ("bottleneck", "conv"), "conv"
                yield f"{torch_layer}.norm2", layer + ("conv_block", "norm"), "bn"
                yield f"{torch_layer}.conv2", layer + ("conv_block", "conv"), "conv"
            if b < len(blocks) - 1:
                transition = (f"transition{b + 1}", "conv_block")
                yield f"features.transition{b + 1}.norm", transition + ("norm",), "bn"
                yield f"features.transition{b + 1}.conv", transition + ("conv",), "conv"
        yield "features.norm5", ("head_norm",), "bn"
        yield "classifier", ("classifier",), "linear"


def _key_map(config: DenseNetConfig) -> dict[str, tuple[str, Path, tuple[int, ...] | None]]:
    """torch state_dict key → (flax collection, flax path, permutation torch → flax)."""
    keys = {}
    for prefix, path, kind in _modules(config):
        for torch_name, collection, flax_name, permutation in _LEAVES[kind]:
            if kind == "conv" and torch_name == "bias" and not config.conv_bias:
                continue
            keys[f"{prefix}.{torch_name}"] = (collection, path + (flax_name,), permutation)
    return keys


def _variable_shapes(config: DenseNetConfig) -> dict[str, dict[Path, tuple[int, ...]]]:
    size = config.min_input_size()
    x = jax.ShapeDtypeStruct((1, size, size, config.in_channels), config.param_dtype)
    shapes = jax.eval_shape(lambda key, x: DenseNet(config).init(key, x, train=False),
                            jax.random.key(0), x)
    return {collection: {path: leaf.shape for path, leaf in
                         flax.traverse_util.flatten_dict(tree).items()}
            for collection, tree in shapes.items()}


def _to_numpy(key: str, value: Any, dtype) -> np.ndarray:
    """state_dict[key] as a numpy array of `dtype`; ValueError naming the key if it is not
    an array of numbers."""
    if hasattr(value, "detach"):  # a torch.Tensor; torch itself is not imported here
        value = value.detach().cpu()
        # numpy has no bfloat16 (nor float16 on every path): go through float64, exactly.
        value = (value.double() if value.is_floating_point() else value).numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        array = np.asarray(None)
    if array.dtype.kind in "biu":  # weights cast to integers lost their fractions: most are 0
        raise ValueError(f"state_dict key {key!r} holds {array.dtype} values, not floating "
                         f"point: the weights were cast; save them as floats")
    if array.dtype.kind != "f":
        raise ValueError(f"state_dict key {key!r} holds {type(value).__name__} "
                         f"{str(value)[:40]!r}, not an array of numbers")
    return array.astype(dtype)


def _list(keys) -> str:
    keys = sorted(keys)
    return ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def from_torch(state_dict: Mapping[str, Any], config: DenseNetConfig) -> dict:
    """Flax variables `{"params": ..., "batch_stats": ...}` from a PyTorch state_dict.

    state_dict: torch tensors or arrays keyed as PyTorch names them, in the layout the
    config implies (see module docstring). Raises ValueError naming any unknown, missing
    or mis-shaped key.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_torch expects a state_dict (a mapping of names to tensors), "
                        f"got {type(state_dict).__name__}; pass model.state_dict()")
    key_map = _key_map(config)
    given = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIX)}
    hint = (f" (a {layout(config)}-layout state_dict is expected for this config: "
            f"bottleneck={config.bottleneck})")
    unknown = given - key_map.keys()
    if unknown:
        raise ValueError(f"unexpected key(s) in state_dict: {_list(unknown)}{hint}")
    missing = key_map.keys() - given
    if missing:
        raise ValueError(f"missing key(s) in state_dict: {_list(missing)}{hint}")
    shapes = _variable_shapes(config)
    variables: dict[str, dict[Path, np.ndarray]] = {"params": {}, "batch_stats": {}}
    for key, (collection, path, permutation) in key_map.items():
        value = _to_numpy(key, state_dict[key], config.param_dtype)
        expected = shapes[collection][path]
        if permutation is not None:
            if value.ndim != len(permutation):
                raise ValueError(f"state_dict key {key!r} has shape {value.shape}, expected "
                                 f"{_torch_shape(expected, permutation)}")
            value = value.transpose(permutation)
        if value.shape != expected:
            raise ValueError(f"state_dict key {key!r} has shape "
                             f"{_torch_shape(value.shape, permutation)}, expected "
                             f"{_torch_shape(expected, permutation)} for this config"
                             f"{_shape_hint(path, _torch_shape(value.shape, permutation), config)}")
        variables[collection][path] = jnp.asarray(value)
    return {c: flax.traverse_util.unflatten_dict(tree) for c, tree in variables.items()}


def _shape_hint(path: tuple[str, ...], torch_shape: tuple[int, ...],
                config: DenseNetConfig) -> str:
    """What to do where the weights' stem has other input channels or their classifier
    other classes than `config`."""
    if path == ("stem_conv", "kernel") and torch_shape[1] != config.in_channels:
        given = f"in_channels={torch_shape[1]}"
    elif path[0] == "classifier" and torch_shape[0] != config.num_classes:
        given = f"num_classes={torch_shape[0]}"
    else:
        return ""
    return (f"; the weights were made for {given}: build the config with it, or load them with "
            f"densenet_jax.fine_tune_variables, which adapts the stem and replaces the classifier")


def _torch_shape(flax_shape: tuple[int, ...], permutation) -> tuple[int, ...]:
    if permutation is None:
        return tuple(flax_shape)
    return tuple(flax_shape[permutation.index(axis)] for axis in range(len(permutation)))


def to_numpy_state_dict(variables: Mapping[str, Any], config: DenseNetConfig) -> dict:
    """The reverse of `from_torch`, as numpy arrays keyed in PyTorch's layout for `config`
    (no `num_batches_tracked`). ValueError, in one line, for variables of another config."""
    if not isinstance(variables, Mapping) or not {"params", "batch_stats"} <= variables.keys():
        given = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"the variables need 'params' and 'batch_stats', as model.init "
                         f"returns them, got {given}; pass the whole variables dict")
    flat = {c: flax.traverse_util.flatten_dict(variables[c]) for c in ("params", "batch_stats")}
    expected = _variable_shapes(config)
    for collection in ("params", "batch_stats"):
        shapes = expected[collection]
        found = {path: np.shape(leaf) for path, leaf in flat[collection].items()}
        if found != shapes:
            wrong = sorted("/".join(path) for path in shapes.keys() ^ found.keys()
                           or (p for p in shapes if shapes[p] != found[p]))
            raise ValueError(f"the variables are not of this config ({collection} differ at "
                             f"{', '.join(wrong[:3])}); pass the config they were made with")
    state_dict = {}
    for key, (collection, path, permutation) in _key_map(config).items():
        value = np.asarray(flat[collection][path])
        state_dict[key] = value if permutation is None else value.transpose(np.argsort(permutation))
    return state_dict


def to_torch(variables: Mapping[str, Any], config: DenseNetConfig) -> dict:
    """The reverse of `from_torch`: a state_dict of torch tensors for the PyTorch reference
    (`densenet_jax.torch_reference.reference_model(config)`), loadable with strict=True."""
    import torch  # only this direction needs it

    try:
        arrays = to_numpy_state_dict(variables, config)
    except ValueError as error:
        raise ValueError(f"to_torch: {error}") from None
    state_dict = {f"{prefix}{_IGNORED_SUFFIX}": torch.tensor(0)
                  for prefix, _, kind in _modules(config) if kind == "bn"}
    # copies: JAX's buffers are read-only
    state_dict.update({key: torch.tensor(np.array(value)) for key, value in arrays.items()})
    return state_dict
