"""The input pipeline on the device: the whole split lives there as uint8; gathering a
batch, augmentation, ÷255 and the bilinear resize happen inside the jitted step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from train.parallel import replicate

PAD = 2  # random-crop padding, in pixels of the 28×28 original


def random_crop_and_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    """Per-example random crop (zero padding PAD) and horizontal flip.

    images: (B, H, W, C) uint8 → (B, H, W, C) uint8.
    """
    batch, height, width, _ = images.shape
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * PAD + 1)
    crops = jax.vmap(lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, image.shape[-1])))(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
    return jnp.where(flip, crops[:, :, ::-1], crops)


def random_erasing(images: jax.Array, key: jax.Array, probability: float,
                   area: tuple[float, float] = (0.02, 0.4),
                   aspect: tuple[float, float] = (0.3, 3.3)) -> jax.Array:
    """Random erasing (Zhong et al., 2020): with `probability`, each image gets a box of
    `area` (fraction of the image) and `aspect` ratio (log-uniform) filled with uniform noise.
    A box that would not fit is clipped to the image (the paper redraws it).

    images: (B, H, W, C) uint8 → (B, H, W, C) uint8.
    """
    batch, height, width, _ = images.shape
    keys = jax.random.split(key, 6)
    erase = jax.random.bernoulli(keys[0], probability, (batch,))
    box_area = (jax.random.uniform(keys[1], (batch,), minval=area[0], maxval=area[1])
                * height * width)
    ratio = jnp.exp(jax.random.uniform(keys[2], (batch,), minval=np.log(aspect[0]),
                                       maxval=np.log(aspect[1])))
    box_h = jnp.clip(jnp.round(jnp.sqrt(box_area * ratio)), 1, height).astype(jnp.int32)
    box_w = jnp.clip(jnp.round(jnp.sqrt(box_area / ratio)), 1, width).astype(jnp.int32)
    top = jax.random.randint(keys[3], (batch,), 0, height - box_h + 1)
    left = jax.random.randint(keys[4], (batch,), 0, width - box_w + 1)

    def inside(start, size, length):  # (B, length) bool
        position = jnp.arange(length)
        return (position >= start[:, None]) & (position < (start + size)[:, None])

    box = inside(top, box_h, height)[:, :, None] & inside(left, box_w, width)[:, None, :]
    noise = jax.random.randint(keys[5], images.shape, 0, 256, jnp.int32).astype(images.dtype)
    return jnp.where((erase[:, None, None] & box)[..., None], noise, images)


def augment(images: jax.Array, key: jax.Array, recipe) -> jax.Array:
    """The recipe's augmentations of a batch, all drawn from `key` (one per step).

    images: (B, H, W, C) uint8 → (B, H, W, C) uint8.
    """
    if recipe.augment:
        images = random_crop_and_flip(images, key)
    if recipe.random_erasing:  # a key of its own; the crops stay those of earlier versions
        images = random_erasing(images, jax.random.fold_in(key, 1), recipe.random_erasing)
    return images


def preprocess(images: jax.Array, resize: int, normalize=None) -> jax.Array:
    """d2l's transforms: pixels ÷ 255 and a bilinear resize to resize × resize, then, where
    `normalize` = (mean, std) per channel is given, torchvision's Normalize (d2l has none).
    images: (B, H, W, C) uint8 → (B, resize, resize, C) float32; the model casts to its
    compute dtype."""
    x = images.astype(jnp.float32) / 255.0
    if x.shape[1:3] != (resize, resize):
        x = jax.image.resize(x, (x.shape[0], resize, resize, x.shape[-1]), "bilinear")
    if normalize is not None:
        mean, std = (np.asarray(v, np.float32) for v in normalize)
        x = (x - mean) / std
    return x


def evaluation_batch_sizes(num_examples: int, batch_size: int) -> list[int]:
    """The sizes of an evaluation's batches: full ones, the last one partial if
    `batch_size` does not divide the number of examples: every example is used once, and
    only two batch shapes occur."""
    full, rest = divmod(num_examples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def training_batch_sizes(num_examples: int, batch_size: int) -> list[int]:
    """The sizes of an epoch's training batches: full ones, then the rest, except that a
    rest of one example joins the batch before it (BatchNorm cannot train on a batch of
    one when the last feature map is 1×1, as at 32×32)."""
    sizes = evaluation_batch_sizes(num_examples, batch_size)
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [batch_size + 1]
    return sizes


def epoch_batches(key: jax.Array, num_examples: int, batch_size: int) -> list[jax.Array]:
    """The training order of one epoch: a fresh permutation, cut into batches of
    `training_batch_sizes`. `key`: the run's data key folded with the epoch; the streaming
    path (train.stream) draws the same permutation on the host."""
    return cut(jax.random.permutation(key, num_examples),
               training_batch_sizes(num_examples, batch_size))


def cut(order, sizes: list[int]) -> list:
    """`order` cut into consecutive batches of `sizes`."""
    starts = np.cumsum([0, *sizes])
    return [order[start:end] for start, end in zip(starts[:-1], starts[1:])]


def sequential_batches(num_examples: int, batch_size: int, mesh) -> list[jax.Array]:
    """The evaluation order: every example once, in order, replicated on `mesh`."""
    return cut(replicate(np.arange(num_examples, dtype=np.int32), mesh),
               evaluation_batch_sizes(num_examples, batch_size))
