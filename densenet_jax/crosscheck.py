"""Cross-check against the PyTorch reference: same weights, same batch, both frameworks.

    python -m densenet_jax.crosscheck --preset d2l --global-pool max --size 32 --batch 16

Loads one set of weights into both (random weights and random BatchNorm running
statistics, or a user's `--torch-state FILE`), runs a batch in evaluation and training
mode, takes one SGD step (lr 0.1) on the mean cross-entropy, and prints the relative error
of each check; exits 1 when any is above its tolerance.

With `--x64` both frameworks compute in float64 and every check must agree to 1e-9: this
proves the implementations equal where float32 rounding cannot, for instance in the
gradients of a full-depth DenseNet-121 at a small input size, which are ill-conditioned
enough that both frameworks' float32 results stray from the float64 ones by up to ~16 %
in the worst layer, or where a ReLU input lies within float32 rounding of zero, so that one
framework's rounding keeps that element's gradient and the other's drops it.

Relative error of two trees: the largest, over leaves, of max|ours − torch| / max|torch|.
Every convolution here feeds a training-mode BatchNorm, so the gradient of every
convolution bias is exactly zero in exact arithmetic and both frameworks return rounding
noise there: those leaves are checked apart, as max|our gradient| / max|torch gradient|
over all parameters, instead of against PyTorch's noise, and the parameters after the SGD
step are compared without them. A freshly initialised network (every BatchNorm bias 0) has
more exactly-zero gradients (the stem BatchNorm's scale: ReLU and max pool are positively
homogeneous and the next BatchNorms scale-invariant); check such weights with `--x64`.
"""
from __future__ import annotations

import argparse
import sys

import flax
import jax
import numpy as np
import optax

from densenet_jax.config import PRESETS, DenseNetConfig, preset
from densenet_jax.convert import from_torch
from densenet_jax.kernels import KERNEL_SETS, get_kernels
from densenet_jax.modules import DenseNet

# fp32 on CPU: outputs agree to rounding (~1e-7); gradients sum over the batch through
# every layer, so they carry a few more ulps of accumulated error. One SGD step (lr 0.1)
# moves some leaves by as much as they weigh (the stem's 7×7 kernel over one channel), so
# the parameters after it carry the gradients' error.
TOLERANCES = {
    "eval logits": 1e-5,
    "train logits": 1e-5,
    "gradients": 1e-4,
    "conv-bias gradients (zero)": 1e-3,
    "running statistics": 1e-5,
    "params after SGD step": 1e-4,
}
# float64: a few thousand ulps of accumulated rounding, far below any real discrepancy.
TOLERANCES_X64 = dict.fromkeys(TOLERANCES, 1e-9)
LEARNING_RATE = 0.1


def tolerances(config: DenseNetConfig) -> dict[str, float]:
    return TOLERANCES_X64 if config.dtype == "float64" else TOLERANCES


def _max_abs(tree) -> float:
    return max(float(np.max(np.abs(np.asarray(leaf, np.float64)))) for leaf in jax.tree.leaves(tree))


def relative_error(ours, reference) -> float:
    """max over leaves of max|ours − reference| / max|reference| (trees of equal structure)."""
    errors = jax.tree.map(lambda a, b: _max_abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                          / max(_max_abs(b), 1e-30), ours, reference)
    return max(jax.tree.leaves(errors))


def _is_conv_bias(path: tuple[str, ...]) -> bool:
    return path[-1] == "bias" and path[-2] in ("conv", "stem_conv")


def split_conv_biases(params) -> tuple[list, list]:
    """(every leaf but the conv biases, the conv biases), each in a fixed order."""
    flat = flax.traverse_util.flatten_dict(params)
    paths = sorted(flat)
    return ([flat[p] for p in paths if not _is_conv_bias(p)],
            [flat[p] for p in paths if _is_conv_bias(p)])


def randomize_(torch_model, seed: int):
    """Random BatchNorm affine parameters and running statistics, so that every conversion
    (and PyTorch's unbiased running variance) is exercised; conv/linear weights keep
    PyTorch's random initialisation."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                shape = module.weight.shape
                module.weight.copy_(1 + 0.2 * torch.randn(shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(shape, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
    return torch_model


def crosscheck(config: DenseNetConfig, size: int = 64, batch: int = 8, seed: int = 0,
               torch_state: dict | None = None) -> dict[str, float]:
    """Relative error of each check in `tolerances(config)`, ours against the PyTorch
    reference, in the config's dtype (float32, or float64 under `jax_enable_x64`)."""
    import torch

    from densenet_jax.torch_reference import reference_model

    if config.dtype not in ("float32", "float64"):
        raise ValueError(f"the cross-check runs in float32 or float64, not {config.dtype}")
    torch_dtype = torch.float64 if config.dtype == "float64" else torch.float32
    torch.manual_seed(seed)
    torch_model = reference_model(config)
    if torch_state is None:
        randomize_(torch_model, seed)
    else:
        from_torch(torch_state, config)  # names any wrong key in one line, before torch does
        torch_model.load_state_dict(torch_state)
    torch_model.to(torch_dtype)
    variables = from_torch(torch_model.state_dict(), config)

    rng = np.random.default_rng(seed)
    images = rng.random((batch, size, size, config.in_channels)).astype(config.param_dtype)
    labels = rng.integers(0, config.num_classes, batch)
    torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    model = DenseNet(config)
    errors = {}

    torch_model.eval()
    with torch.no_grad():
        errors["eval logits"] = relative_error(
            jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images),
            torch_model(torch_images).numpy())

    def loss_fn(params):
        logits, updates = model.apply({**variables, "params": params}, images, train=True,
                                      mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates)

    (_, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"])
    optimizer = optax.sgd(LEARNING_RATE)
    steps, _ = optimizer.update(grads, optimizer.init(variables["params"]))
    new_params = optax.apply_updates(variables["params"], steps)

    torch_model.train()
    torch_optimizer = torch.optim.SGD(torch_model.parameters(), lr=LEARNING_RATE)
    torch_logits = torch_model(torch_images)
    torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels)).backward()
    # Gradients laid out as a state_dict, so that from_torch converts them too.
    grad_state = {name: p.grad for name, p in torch_model.named_parameters()}
    torch_grads = from_torch({**torch_model.state_dict(), **grad_state}, config)["params"]
    torch_optimizer.step()
    torch_after = from_torch(torch_model.state_dict(), config)

    errors["train logits"] = relative_error(logits, torch_logits.detach().numpy())
    (grad_weights, grad_biases), (torch_grad_weights, _) = map(split_conv_biases, (grads, torch_grads))
    errors["gradients"] = relative_error(grad_weights, torch_grad_weights)
    if grad_biases:
        errors["conv-bias gradients (zero)"] = _max_abs(grad_biases) / _max_abs(torch_grads)
    errors["running statistics"] = relative_error(updates["batch_stats"], torch_after["batch_stats"])
    errors["params after SGD step"] = relative_error(split_conv_biases(new_params)[0],
                                                     split_conv_biases(torch_after["params"])[0])
    return errors


def format_table(errors: dict[str, float], limits: dict[str, float]) -> str:
    lines = [f"{'check':<28}{'max rel error':>14}{'tolerance':>11}  ok"]
    for name, error in errors.items():
        ok = "yes" if error <= limits[name] else "NO"
        lines.append(f"{name:<28}{error:>14.2e}{limits[name]:>11.0e}  {ok}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m densenet_jax.crosscheck",
        description="Compare densenet_jax with the PyTorch reference on the same weights.")
    parser.add_argument("--preset", default="d2l", choices=sorted(PRESETS))
    parser.add_argument("--global-pool", choices=("max", "avg"),
                        help="override the preset's global pool")
    parser.add_argument("--torch-state", metavar="FILE",
                        help="a saved PyTorch state_dict (torch.save) to check instead of "
                             "random weights")
    # The defaults keep float32 gradients well-conditioned (see the module docstring).
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--x64", action="store_true",
                        help="compute in float64 in both frameworks (tolerance 1e-9)")
    parser.add_argument("--kernels", default="auto", choices=KERNEL_SETS,
                        help="our model's kernel set (densenet_jax.kernels)")
    args = parser.parse_args(argv)
    overrides = {"kernels": args.kernels}
    if args.global_pool:
        overrides["global_pool"] = args.global_pool
    if args.x64:
        jax.config.update("jax_enable_x64", True)
        overrides["dtype"] = "float64"
    try:
        config = preset(args.preset, **overrides)
        if args.batch < 2:
            raise ValueError(f"--batch must be at least 2 (training-mode BatchNorm needs "
                             f"more than one value per channel), got {args.batch}")
        config.require_input_size(args.size, "--size")
        torch_state = _load_state(args.torch_state) if args.torch_state else None
        errors = crosscheck(config, args.size, args.batch, args.seed, torch_state)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    limits = tolerances(config)
    print(f"{args.preset} ({config.global_pool} pool), {args.batch}×{args.size}×{args.size}, "
          f"{config.dtype}, {get_kernels(config.kernels).name} kernels, seed {args.seed}")
    print(format_table(errors, limits))
    failed = [name for name, error in errors.items() if error > limits[name]]
    if failed:
        print(f"FAILED: {', '.join(failed)} above tolerance", file=sys.stderr)
        return 1
    return 0


def _load_state(path: str) -> dict:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors); save one "
                         f"with torch.save(model.state_dict(), path)")
    return state


if __name__ == "__main__":
    sys.exit(main())
