"""PyTorch weights as people have them, and their adaptation for fine-tuning.

`load_pytorch` reads a state_dict, a `.pth`/`.pt` file (`torch.load(weights_only=True)`) or
a `.safetensors` file (timm's and the Hugging Face hub's format; read with numpy, no torch),
in the layouts found in the wild: torchvision's released DenseNet files with their legacy
key names, `module.` (DataParallel / DistributedDataParallel) and `_orig_mod.`
(torch.compile) prefixes, training checkpoints that wrap the state_dict in a dict.
`fine_tune_variables` loads such weights into a config with another number of input
channels or classes, as fine-tuning needs (timm's `adapt_input_conv` for the stem).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from densenet_jax.config import DenseNetConfig
from densenet_jax.convert import _modules, _to_numpy, from_torch, to_numpy_state_dict

# torchvision's released files name a dense layer's modules `norm.1`, `conv.1`, `norm.2`, ...;
# torchvision itself renames them on load with this pattern.
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\."
                         r"(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
_PREFIXES = ("module.", "_orig_mod.")
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")  # training checkpoints


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:160] if lines else type(error).__name__


def read_state_dict(path: str | os.PathLike) -> Mapping[str, Any]:
    """The mapping stored in a `.safetensors`, `.pth` or `.pt` file; ValueError, in one
    line, for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such weights file; pass a .pth, .pt or .safetensors file")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            return load_file(path)
        except Exception as error:  # noqa: BLE001 (safetensors raises several kinds)
            raise ValueError(f"{path} is not a readable .safetensors file "
                             f"({_first_line(error)})") from None
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading {path} needs PyTorch (pip install torch); or convert it "
                         f"to .safetensors, which needs no torch") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (pickle, zip and torch errors alike)
        raise ValueError(f"{path} is not a weights file that torch.load(weights_only=True) "
                         f"reads ({_first_line(error)})") from None


def standard_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state_dict keyed as today's PyTorch names it: unwrapped from a training
    checkpoint, without `module.`/`_orig_mod.` prefixes, legacy torchvision names renamed."""
    while (isinstance(state_dict, Mapping) and not any(hasattr(v, "shape") for v in
                                                       state_dict.values())
           and (inner := next((state_dict[k] for k in _WRAPPERS
                               if isinstance(state_dict.get(k), Mapping)), None)) is not None):
        state_dict = inner
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of names to tensors), got "
                        f"{type(state_dict).__name__}")
    keys = {str(k): v for k, v in state_dict.items()}
    for prefix in _PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            keys = {k[len(prefix):]: v for k, v in keys.items()}
    return {_LEGACY_KEY.sub(r"\1\2", k): v for k, v in keys.items()}


def load_pytorch(source: str | os.PathLike | Mapping[str, Any], config: DenseNetConfig) -> dict:
    """Flax variables `{"params", "batch_stats"}` from PyTorch weights: a state_dict or a
    file (see the module docstring). ValueError, in one line, naming what does not fit."""
    state_dict = source if isinstance(source, Mapping) else read_state_dict(source)
    return from_torch(standard_keys(state_dict), config)


def adapt_input_conv(weight: np.ndarray, in_channels: int) -> np.ndarray:
    """A convolution's weight (O, I, kH, kW) for `in_channels` inputs (timm's rule): summed
    over the I inputs for one channel (a grey image seen as R = G = B gives the same output),
    else tiled to `in_channels` and scaled by I / in_channels to keep the output's scale."""
    if in_channels == 1:
        return weight.sum(axis=1, keepdims=True)
    repeats = math.ceil(in_channels / weight.shape[1])
    return np.tile(weight, (1, repeats, 1, 1))[:, :in_channels] * (weight.shape[1] / in_channels)


def fine_tune_variables(source: str | os.PathLike | Mapping[str, Any], config: DenseNetConfig,
                        fresh: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """Variables for `config` from weights made for another input or task: the stem
    convolution adapted to `config.in_channels`, the classifier taken from `fresh` (the
    new model's initial variables) when its shape differs, everything else loaded.
    Returns (variables, one note per adaptation)."""
    theirs = standard_keys(source if isinstance(source, Mapping) else read_state_dict(source))
    ours = to_numpy_state_dict(fresh, config)
    modules = list(_modules(config))
    stem, classifier = f"{modules[0][0]}.weight", modules[-1][0]
    notes = []
    if stem in theirs:
        weight = _to_numpy(stem, theirs[stem], np.float64)
        if weight.ndim == 4 and weight.shape[1] != config.in_channels:
            theirs[stem] = adapt_input_conv(weight, config.in_channels)
            how = "summed over them" if config.in_channels == 1 else "tiled and scaled"
            notes.append(f"stem convolution adapted from {weight.shape[1]} input channels to "
                         f"{config.in_channels} ({how})")
    weight = f"{classifier}.weight"
    if weight in theirs:
        given = _to_numpy(weight, theirs[weight], np.float64)
        if given.shape != ours[weight].shape:
            for name in (weight, f"{classifier}.bias"):
                theirs[name] = ours[name]
            notes.append(f"classifier re-initialised for {config.num_classes} classes (the "
                         f"weights have {given.shape[0]})")
    return from_torch(theirs, config), notes
