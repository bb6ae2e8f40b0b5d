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


def preprocess(images: jax.Array, resize: int) -> jax.Array:
    """d2l's transforms: pixels ÷ 255 and a bilinear resize to resize × resize (no
    normalisation). images: (B, 28, 28, 1) uint8 → (B, resize, resize, 1) float32; the
    model casts to its compute dtype."""
    x = images.astype(jnp.float32) / 255.0
    if x.shape[1:3] != (resize, resize):
        x = jax.image.resize(x, (x.shape[0], resize, resize, x.shape[-1]), "bilinear")
    return x


def _cut(order: jax.Array, batch_size: int) -> list[jax.Array]:
    """Batches of indices, the last one partial if `batch_size` does not divide the
    number of examples: every example is used once, and only two batch shapes occur."""
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def epoch_batches(key: jax.Array, num_examples: int, batch_size: int) -> list[jax.Array]:
    """The training order of one epoch: a fresh permutation, cut into batches."""
    return _cut(jax.random.permutation(key, num_examples), batch_size)


def sequential_batches(num_examples: int, batch_size: int, mesh) -> list[jax.Array]:
    """The evaluation order: every example once, in order, replicated on `mesh`."""
    return _cut(replicate(np.arange(num_examples, dtype=np.int32), mesh), batch_size)
