"""Classify image files with a trained run.

    python -m train.predict --workdir runs/x IMAGE... [--top-k 3]

IMAGE: PNG, JPEG or any format Pillow reads, of any size, colour or grey; or a `.npy` array
(H, W) or (H, W, C) of pixels 0..255. Each is converted to the run's channels, brought to
Fashion-MNIST's 28×28 (bilinear, antialiased) and preprocessed exactly as in training.
Fashion-MNIST shows light garments on a black background: other pictures are out of its
distribution. A file that cannot be read gets one line naming it; the others are still
classified (exit status 1 if any failed).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import numpy as np

from train import data
from train.checkpoint import CheckpointError, load_run
from train.host import configure_host
from train.steps import infer

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image or .npy files")
    parser.add_argument("--workdir", default="runs/default", help="the trained run")
    parser.add_argument("--epoch", type=int, help="a saved epoch (default: the last one)")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image")
    return parser.parse_args(argv)


def read_image(path: Path, channels: int) -> np.ndarray:
    """(28, 28, channels) uint8 from an image or .npy file; ValueError, in one line."""
    if not path.is_file():
        raise ValueError("no such file")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"not a readable .npy file ({error})") from None
        if array.dtype.kind not in "uif":
            raise ValueError(f"holds {array.dtype} values; expected pixels 0..255")
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3):
            raise ValueError(f"holds an array of shape {array.shape}; expected (H, W) or "
                             f"(H, W, C) with C = 1 or 3")
        if array.shape[-1] != channels:
            array = _convert(array, channels)
    else:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise ValueError(f"not an image Pillow can read ({error}); pass PNG, JPEG or "
                             f".npy") from None
        array = array.reshape(*array.shape[:2], channels)
    size = data.IMAGE_SIZE
    if array.shape[:2] != (size, size):
        array = jax.image.resize(np.asarray(array, np.float32), (size, size, channels),
                                 "bilinear", antialias=True)
    return np.clip(np.round(np.asarray(array, np.float64)), 0, 255).astype(np.uint8)


def _convert(array: np.ndarray, channels: int) -> np.ndarray:
    """Grey ↔ colour: the mean of R, G, B (as Pillow's "L" does, up to its weights), or
    the grey value in all three."""
    if channels == 1:
        return array.mean(axis=-1, keepdims=True)
    return np.repeat(array, channels, axis=-1)


def top_k(probabilities: np.ndarray, names, k: int) -> str:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return ", ".join(f"{names[i]} {probabilities[i]:.3f}" for i in order)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.top_k <= 0:
        print(f"error: --top-k must be positive, got {args.top_k}", file=sys.stderr)
        return 1
    try:
        run, state, _, _ = load_run(Path(args.workdir), args.epoch)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    names = data.class_names(run.model.num_classes)
    classify = jax.jit(functools.partial(infer, model=run.model, resize=run.train.resize,
                                         flip=run.recipe.test_flip))
    failed = False
    for name in args.images:
        try:
            image = read_image(Path(name), run.model.in_channels)
        except (OSError, ValueError) as error:
            print(f"error: {name}: {error}", file=sys.stderr)
            failed = True
            continue
        probabilities = np.asarray(jax.nn.softmax(classify(state.eval_variables, image[None])[0]))
        print(f"{name}: {top_k(probabilities, names, args.top_k)}")
    return 1 if failed else 0


if __name__ == "__main__":
    configure_host()  # before JAX starts
    sys.exit(main())
