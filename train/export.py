"""Export a trained run's inference function with its weights, for serving without this code.

    python -m train.export --workdir runs/x --out model.jax                  # jax.export
    python -m train.export --workdir runs/x --out saved --format savedmodel  # TensorFlow

The function takes uint8 images (batch, H, W, C) as the run's data set holds them
(Fashion-MNIST: 28, 28, 1), any batch size, and returns logits (batch, classes) in
evaluation mode, preprocessed as in training (÷ 255, resize, the run's normalisation). `jax`
writes a serialized `jax.export.Exported` (StableHLO with the weights as constants) lowered
for CPUs, CUDA GPUs and TPUs alike, wherever it is exported:

    exported = jax.export.deserialize(open("model.jax", "rb").read())
    logits = exported.call(images)

`savedmodel` writes a TensorFlow SavedModel through jax2tf (needs TensorFlow: the `tfds`
extra), whose `serving_default` signature takes `images` and returns `logits`. The model is exported
with the `reference` kernels: plain JAX, the same function on every backend.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from train.checkpoint import CheckpointError, load_run
from train.host import configure_host
from train.steps import infer

FORMATS = ("jax", "savedmodel")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/default", help="the trained run")
    parser.add_argument("--epoch", type=int, help="a saved epoch (default: the last one)")
    parser.add_argument("--out", required=True, help="the file (jax) or folder (savedmodel)")
    parser.add_argument("--format", default="jax", choices=FORMATS)
    return parser.parse_args(argv)


def inference_function(workdir: Path, epoch: int | None = None):
    """(f, input shape): f(images uint8 (B, H, W, C)) → logits (B, classes), the run's
    weights closed over, with the reference kernels; (H, W, C): its data set's images."""
    run, state, _, _ = load_run(workdir, epoch)
    f = functools.partial(infer, state.eval_variables,
                          model=dataclasses.replace(run.model, kernels="reference"),
                          resize=run.train.resize, flip=run.recipe.test_flip,
                          normalize=run.data.normalize)
    return f, (*run.data.image_shape[:2], run.model.in_channels)


# jax.export lowers for platforms that are not present, so one artifact serves them all.
PLATFORMS = ("cpu", "cuda", "tpu")


def export_jax(f, image_shape: tuple[int, ...], out: Path) -> None:
    batch = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((*batch, *image_shape), jnp.uint8)
    out.write_bytes(jax.export.export(jax.jit(f), platforms=PLATFORMS)(spec).serialize())


def export_savedmodel(f, image_shape: tuple[int, ...], out: Path) -> None:
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError:
        raise ValueError("--format savedmodel needs TensorFlow (pip install -e \".[tfds]\"); "
                         "or export with --format jax") from None
    module = tf.Module()
    converted = jax2tf.convert(f, polymorphic_shapes=[f"(b, {', '.join(map(str, image_shape))})"])
    module.serve = tf.function(lambda images: {"logits": converted(images)}, autograph=False,
                               input_signature=[tf.TensorSpec((None, *image_shape), tf.uint8,
                                                              name="images")])
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.serve})


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: folder {out.parent} does not exist; create it or "
                             f"choose another --out")
        f, image_shape = inference_function(Path(args.workdir), args.epoch)
        (export_jax if args.format == "jax" else export_savedmodel)(f, image_shape, out)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: cannot write {out} ({error.strerror or error}); choose another --out",
              file=sys.stderr)
        return 1
    print(f"exported {args.workdir} as {args.format} to {out}: uint8 images (batch, "
          f"{', '.join(map(str, image_shape))}) → logits")
    return 0


if __name__ == "__main__":
    configure_host()  # before JAX starts
    sys.exit(main())
