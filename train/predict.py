"""Classify image files with a trained run.

    python -m train.predict --workdir runs/x IMAGE... [--top-k 3]

IMAGE: PNG, JPEG or any format Pillow reads, of any size, colour or grey; a `.npy` array
(H, W) or (H, W, C); or a folder, whose image and .npy files (in it and below) are
classified in name order. Pixel values are read by one rule: uint8 as they are, 16-bit
images scaled from 0..65535, other integers as they are if within 0..255, floats scaled
from [0, 1] (a note says when values were scaled); anything else is refused. Each image is
converted to the run's channels, brought to the size of its data set's images (Fashion-MNIST's
28×28; bilinear, antialiased) and preprocessed exactly as in training, normalisation
included; classes are named as in the data set. Fashion-MNIST shows light garments on a
black background: other pictures are out of its distribution. A file that cannot be read gets one
line naming it; the others are still classified (exit status 1 if any failed).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import numpy as np

from train import data, datasets
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


def read_image(path: Path, channels: int, size: tuple[int, int] = (data.IMAGE_SIZE,) * 2
               ) -> tuple[np.ndarray, str | None]:
    """(*size, channels) uint8 from an image or .npy file (`size`: the run's data set's
    images, Fashion-MNIST's 28×28 by default), and a note on how its values were read
    where that is not plain 0..255 pixels (`pixels`); ValueError, in one line."""
    if path.is_dir():
        raise ValueError("is a folder; pass its files, or the folder alone")
    if not path.is_file():
        raise ValueError("no such file")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"not a readable .npy file ({error})") from None
        _check_kind(array)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3):
            raise ValueError(f"holds an array of shape {array.shape}; expected (H, W) or "
                             f"(H, W, C) with C = 1 or 3")
    else:
        array = _read_picture(path, channels)
    if array.size == 0:
        raise ValueError(f"holds an empty image of shape {array.shape}")
    array, note = pixels(array)
    if array.shape[-1] != channels:
        array = _convert(array, channels)
    if array.shape[:2] != tuple(size):
        array = jax.image.resize(np.asarray(array, np.float32), (*size, channels),
                                 "bilinear", antialias=True)
    return np.clip(np.round(np.asarray(array, np.float64)), 0, 255).astype(np.uint8), note


def pixels(array: np.ndarray) -> tuple[np.ndarray, str | None]:
    """`array`'s values as pixels 0..255, by one rule: uint8 as it is; uint16 (16-bit
    images) scaled from 0..65535; other integers as they are if within 0..255; floats
    scaled from [0, 1]. Returns (pixels, a note when scaled); anything else, or values
    that are not finite, is refused with ValueError, in one line."""
    _check_kind(array)
    kind, name = array.dtype.kind, array.dtype.name
    if name == "uint8":
        return array, None
    if name == "uint16":
        return array / 257.0, "16-bit pixels, scaled from 0..65535"
    if kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"holds {np.size(array) - np.isfinite(array).sum()} values that are "
                         f"NaN or infinite; expected pixels")
    low, high = array.min(), array.max()
    if kind == "f":
        if low < 0 or high > 1:
            raise ValueError(f"holds {name} values from {low:.4g} to {high:.4g}; floats are "
                             f"read as pixels in [0, 1]: scale them, or save uint8 0..255")
        return array * 255.0, f"{name} pixels, scaled from [0, 1]"
    if low < 0 or high > 255:
        raise ValueError(f"holds {name} values from {low} to {high}; expected pixels 0..255 "
                         f"(or uint16 0..65535)")
    return array, None


def _check_kind(array: np.ndarray) -> None:
    if array.dtype.kind not in "uif":
        raise ValueError(f"holds {array.dtype} values; expected pixels: uint8 0..255, "
                         f"uint16 0..65535 or floats in [0, 1]")


def _read_picture(path: Path, channels: int) -> np.ndarray:
    """(H, W, channels) from a file Pillow reads; a 16-bit grey image (H, W, 1) stays
    uint16 (Pillow's own conversion would clip it to 255)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I") and image.getbands() == ("I",):
                array = np.asarray(image)
                high = int(array.max()) if array.size else 0
                # Pillow reads 16-bit PNG as 32-bit "I": 16-bit values are what it holds.
                return (array.astype(np.uint16) if 0 <= array.min() and high <= 65535
                        else array)[..., None]
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise ValueError(f"not an image Pillow can read ({error}); pass PNG, JPEG or "
                         f".npy") from None
    return array.reshape(*array.shape[:2], channels)


def image_files(folder: Path) -> list[Path]:
    """The image and .npy files in `folder` and below, in name order (hidden ones and
    other files left out); ValueError, in one line, if there are none."""
    from PIL import Image
    suffixes = set(Image.registered_extensions()) | {".npy"}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ValueError("this folder holds no image or .npy files")
    return files


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
    names = datasets.class_names(run.data, run.model.num_classes)
    classify = jax.jit(functools.partial(infer, model=run.model, resize=run.train.resize,
                                         flip=run.recipe.test_flip,
                                         normalize=run.data.normalize))
    failed = False
    for name in args.images:
        try:
            files = image_files(Path(name)) if Path(name).is_dir() else [Path(name)]
        except ValueError as error:
            print(f"error: {name}: {error}", file=sys.stderr)
            failed = True
            continue
        for path in files:
            try:
                image, note = read_image(path, run.model.in_channels,
                                         run.data.image_shape[:2])
            except (OSError, ValueError) as error:
                print(f"error: {path}: {error}", file=sys.stderr)
                failed = True
                continue
            if note:
                print(f"note: {path}: {note}", file=sys.stderr)
            logits = classify(state.eval_variables, image[None])[0]
            print(f"{path}: {top_k(np.asarray(jax.nn.softmax(logits)), names, args.top_k)}")
    return 1 if failed else 0


if __name__ == "__main__":
    configure_host()  # before JAX starts
    sys.exit(main())
