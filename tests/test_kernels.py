"""The kernel seam: every xla_cpu kernel equals its reference kernel in value and derivative
(float64), whole networks agree across kernel sets, bf16 trains every layer, and "auto"
picks by backend."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import densenet_jax
from densenet_jax.kernels import get_kernels, reference, xla_cpu
from train.steps import initial_variables

KERNEL_SETS = ["reference", "xla_cpu"]


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def assert_same_vjp(f_ours, f_reference, args, rng, rtol=1e-12, atol=1e-12):
    """Same outputs, and the same input cotangents for one random output cotangent."""
    y, vjp = jax.vjp(f_ours, *args)
    y_ref, vjp_ref = jax.vjp(f_reference, *args)
    chex.assert_trees_all_close(y, y_ref, rtol=rtol, atol=atol)
    g = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape), y_ref)
    chex.assert_trees_all_close(vjp(g), vjp_ref(g), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name, backend, expected", [
    ("auto", "cpu", "xla_cpu"), ("auto", "gpu", "reference"), ("auto", "tpu", "reference"),
    ("reference", "cpu", "reference"), ("xla_cpu", "gpu", "xla_cpu"),
])
def test_kernel_set_by_name_and_backend(name, backend, expected):
    assert get_kernels(name, backend).name == expected


def test_unknown_kernel_set_is_named():
    with pytest.raises(ValueError, match="unknown kernel set 'cuda'; choose one of auto"):
        get_kernels("cuda")
    with pytest.raises(ValueError, match=r"kernels must be one of \('auto', 'reference', "
                                         r"'xla_cpu'\), got 'fast'"):
        densenet_jax.preset("d2l", kernels="fast")


@pytest.mark.parametrize("image, kernel, strides, padding, product", [
    ((2, 2), (3, 3), (1, 1), ((1, 1), (1, 1)), True),  # d2l's last blocks at 32×32 input
    ((1, 1), (3, 3), (1, 1), ((1, 1), (1, 1)), True),
    ((2, 3), (3, 3), (2, 2), ((0, 2), (1, 0)), True),  # strided, asymmetric padding
    ((4, 4), (7, 7), (2, 2), ((3, 3), (3, 3)), True),  # the stem on a tiny image
    ((5, 5), (1, 1), (1, 1), ((0, 0), (0, 0)), True),  # a 1×1 convolution
    ((5, 5), (3, 3), (1, 1), ((1, 1), (1, 1)), False),  # more pixels than taps: XLA's
    ((5, 5), (1, 1), (2, 2), ((0, 0), (0, 0)), False),  # 1×1 but strided: XLA's
    ((5, 5), (1, 1), (1, 1), ((1, 0), (0, 1)), False),  # 1×1 but padded: XLA's
])
def test_convolution(image, kernel, strides, padding, product):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, *image, 4)), rng.normal(size=(*kernel, 4, 5))
    numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def conv(kernel_set):
        return lambda x, w: kernel_set.conv_general_dilated(x, w, strides, padding,
                                                            dimension_numbers=numbers)

    assert_same_vjp(conv(xla_cpu.KERNELS), conv(reference.KERNELS), (x, w), rng)
    hlo = jax.jit(conv(xla_cpu.KERNELS)).lower(x, w).as_text()
    assert ("convolution" in hlo) == (not product)


@pytest.mark.parametrize("shape, window, strides, padding", [
    ((3, 16, 16, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),  # the stem's pool
    ((2, 17, 15, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # windows cut by the border
    ((2, 10, 11, 2), (3, 2), (1, 2), ((0, 0), (0, 0))),  # overlapping, unequal strides
])
def test_max_pool_with_ties(shape, window, strides, padding):
    # Small integers: most windows hold several equal maxima.
    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, shape).astype(np.float64)

    def pool(kernel_set):
        return lambda x: kernel_set.max_pool(x, window, strides, padding)

    assert_same_vjp(pool(xla_cpu.KERNELS), pool(reference.KERNELS), (x,), rng)
    t = rng.normal(size=shape)
    chex.assert_trees_all_close(jax.jvp(pool(xla_cpu.KERNELS), (x,), (t,)),
                                jax.jvp(pool(reference.KERNELS), (x,), (t,)), rtol=1e-12)


@pytest.fixture
def x32():
    """Float32 JAX, as training runs, for the bf16 tests."""
    with jax.enable_x64(False):
        yield


@pytest.mark.usefixtures("x32")
@pytest.mark.parametrize("kernel_set", [reference.KERNELS, xla_cpu.KERNELS], ids=KERNEL_SETS)
def test_max_pool_derivative_in_bfloat16_after_float32(kernel_set):
    """The stem's pool in bf16 reads BatchNorm → ReLU computed in float32 and rounded. XLA,
    allowed excess precision, may drop that rounding where values are compared: a search for
    each window's maximum by equality with the pooled output then found almost none, and the
    stem's gradient vanished. Each output's cotangent must reach its window (ties decide
    only where), so per channel the input gradient sums to the cotangents of the outputs
    ReLU passes, times the scale."""
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 64), jnp.float32)
    scale = jnp.linspace(0.5, 1.5, 64, dtype=jnp.float32)
    dy = jax.random.normal(jax.random.key(1), (8, 8, 8, 64), jnp.bfloat16)

    def f(x):
        y = jnp.maximum(x * scale, 0).astype(jnp.bfloat16)
        return kernel_set.max_pool(y, (3, 3), (2, 2), ((1, 1), (1, 1)))

    dx = jax.jit(lambda x: jax.vjp(f, x)[1](dy)[0])(x)
    y = jax.jit(f)(x)
    routed = jnp.sum(dx, (0, 1, 2)) / scale
    expected = jnp.sum(jnp.where(y > 0, dy, 0).astype(jnp.float32), (0, 1, 2))
    # Windows overlap: up to four cotangents meet at one input, added in bf16.
    np.testing.assert_allclose(routed, expected, rtol=1e-2, atol=0.25)


@pytest.mark.parametrize("channels", [(6,), (2, 4), (1, 3, 2)])
@pytest.mark.parametrize("relu, feeds_1x1_conv", [(True, False), (True, True), (False, False)])
def test_batch_norm_of_feature_maps(channels, relu, feeds_1x1_conv):
    """xla_cpu's BatchNorm over feature maps joined by its `concatenate` (each map with its
    own statistics, as in a dense block), against reference's over the joined array;
    cotangents on the output and on both statistics."""
    rng = np.random.default_rng(sum(channels))
    # Off-centre maps, scales of both signs: many outputs on each side of the ReLU.
    maps = [rng.normal(size=(3, 4, 5, c)) * 2 + 5 for c in channels]
    scale, bias = rng.normal(size=sum(channels)), rng.normal(size=sum(channels))

    def batch_norm(kernel_set):
        def f(maps, scale, bias):
            x = maps[0]
            for y in maps[1:]:
                x = kernel_set.concatenate(x, y, train=True)
            return kernel_set.batch_norm(x, scale, bias, epsilon=1e-5, relu=relu,
                                         feeds_1x1_conv=feeds_1x1_conv)
        return f

    if len(channels) > 1:
        x = xla_cpu.concatenate(maps[0], maps[1], train=True)
        assert isinstance(x, xla_cpu.FeatureMaps) and x.shape == (3, 4, 5, sum(channels[:2]))
    assert_same_vjp(batch_norm(xla_cpu.KERNELS), batch_norm(reference.KERNELS),
                    (maps, scale, bias), rng, rtol=1e-10)


def test_concatenate_in_evaluation_is_an_array():
    x, y = jnp.ones((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 5))
    for kernel_set in (reference.KERNELS, xla_cpu.KERNELS):
        joined = kernel_set.concatenate(x, y, train=False)
        chex.assert_trees_all_equal(joined, jnp.concatenate([x, y], -1))


def test_finish_gradients_keeps_values():
    grads = {"a": jnp.arange(3.0), "b": {"c": jnp.ones((2, 2))}}
    for kernel_set in (reference.KERNELS, xla_cpu.KERNELS):
        chex.assert_trees_all_equal(jax.jit(kernel_set.finish_gradients)(grads), grads)


def training_loss(cfg, variables, x, labels):
    """(loss, (logits, batch_stats updates)) of a training-mode forward, as a function of
    the parameters."""
    model = densenet_jax.DenseNet(cfg)

    def loss_fn(params):
        logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                      mutable=["batch_stats"])
        one_hot = jax.nn.one_hot(labels, cfg.num_classes)
        return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1)), (logits, updates)

    return loss_fn


@pytest.mark.slow
@pytest.mark.parametrize("preset, overrides", [
    ("d2l", {}),
    ("densenet121", dict(block_config=(3, 3), growth_rate=8)),
    ("densenet121", dict(block_config=(3, 3), growth_rate=8, remat=True)),
])
def test_networks_agree_across_kernel_sets(preset, overrides):
    """Same parameter tree, logits, loss, gradients and statistics, training and evaluation."""
    configs = {name: densenet_jax.preset(preset, dtype="float64", kernels=name, **overrides)
               for name in KERNEL_SETS}
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 1), dtype=jnp.float64)
    labels = jnp.arange(4)
    inits = {name: initial_variables(cfg, jax.random.key(0), 32) for name, cfg in configs.items()}
    chex.assert_trees_all_equal(inits["reference"], inits["xla_cpu"])
    variables = inits["reference"]
    results = {}
    for name, cfg in configs.items():
        loss_fn = training_loss(cfg, variables, x, labels)
        evaluate = jax.jit(functools.partial(densenet_jax.DenseNet(cfg).apply, train=False))
        results[name] = (jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"]),
                         evaluate(variables, x))
    # Gradients that are zero in exact arithmetic (conv biases before BatchNorm) are
    # rounding noise: the absolute term covers them.
    chex.assert_trees_all_close(results["xla_cpu"], results["reference"], rtol=1e-9, atol=1e-12)


def test_forward_mode_of_a_training_step_with_reference_kernels():
    """jax.jvp of the training-mode loss: the directional derivative equals the gradient's
    inner product with the direction (d2l's layers, two per block: each kind of layer)."""
    cfg = densenet_jax.preset("d2l", block_config=(2, 2), growth_rate=8, dtype="float64",
                              kernels="reference")
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 1), dtype=jnp.float64)
    variables = initial_variables(cfg, jax.random.key(0), 32)
    loss_fn = training_loss(cfg, variables, x, jnp.arange(4))
    direction = jax.tree.map(lambda p: jnp.full_like(p, 1e-2), variables["params"])
    slope = jax.jit(lambda p, d: jax.jvp(lambda p: loss_fn(p)[0], (p,), (d,))[1])(
        variables["params"], direction)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p)[0]))(variables["params"])
    expected = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads),
                                                   jax.tree.leaves(direction)))
    np.testing.assert_allclose(slope, expected, rtol=1e-9)


@pytest.mark.slow
@pytest.mark.usefixtures("x32")
@pytest.mark.parametrize("kernels", KERNEL_SETS)
def test_bfloat16_trains_every_layer(kernels):
    """bf16 compute, at the same float32 parameters as float32 compute: every parameter's
    gradient points the way float32's does. Convolution biases are left out: each feeds
    only BatchNorms, which remove it, so their exact gradient is 0 and both are noise."""
    x = jax.random.uniform(jax.random.key(1), (16, 32, 32, 1), jnp.float32)
    labels = jnp.arange(16) % 10
    cfg32 = densenet_jax.preset("d2l", kernels=kernels)
    variables = initial_variables(cfg32, jax.random.key(0), 32)
    # BatchNorm parameters away from their initial values: with bias 0, ReLU → pool →
    # BatchNorm makes the loss blind to the stem's BatchNorm scale (another exact 0).
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables["params"])
    params = treedef.unflatten([
        p + 0.5 * jax.random.normal(jax.random.key(i), p.shape, p.dtype)
        if "norm" in path[-2].key else p for i, (path, p) in enumerate(leaves)])
    grads = {}
    for dtype in ("float32", "bfloat16"):
        cfg = densenet_jax.preset("d2l", kernels=kernels, dtype=dtype)
        loss_fn = training_loss(cfg, {**variables, "params": params}, x, labels)
        grads[dtype] = jax.jit(jax.grad(lambda p: loss_fn(p)[0]))(params)
    for (path, g32), g16 in zip(jax.tree_util.tree_flatten_with_path(grads["float32"])[0],
                                jax.tree.leaves(grads["bfloat16"])):
        name = jax.tree_util.keystr(path)
        if path[-2].key in ("conv", "stem_conv") and path[-1].key == "bias":
            continue
        a, b = (np.asarray(g, np.float64).ravel() for g in (g32, g16))
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        # bf16's rounding leaves cosines of 0.92 and up; a layer cut off gives about 0.
        assert cosine > 0.8, f"{name}: cosine {cosine:.3f} between bf16 and float32 gradients"
