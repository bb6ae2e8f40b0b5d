"""Channel arithmetic, configs, input errors, remat and tracing of the Flax modules."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import densenet_jax
from densenet_jax import ConvBlock, DenseBlock, DenseNet, TransitionBlock
from densenet_jax.kernels import get_kernels
from train.steps import initial_variables


def init_apply(module, x, train=False):
    """(variables, output); in training mode the output is (y, batch_stats updates)."""
    variables = module.init(jax.random.key(0), x, train=False)
    mutable = ["batch_stats"] if train else False
    return variables, module.apply(variables, x, train=train, mutable=mutable)


def test_dense_block_adds_growth_rate_per_conv():
    # d2l: DenseBlock(2, 3, 10) on (4, 3, 8, 8) gives 3 + 2×10 = 23 channels.
    _, y = init_apply(DenseBlock(num_convs=2, growth_rate=10), jnp.ones((4, 8, 8, 3)))
    chex.assert_shape(y, (4, 8, 8, 23))


def test_transition_block_sets_channels_and_halves_size():
    # d2l: transition_block(23, 10) on the dense block's output gives (4, 10, 4, 4).
    _, y = init_apply(TransitionBlock(num_channels=10), jnp.ones((4, 8, 8, 23)))
    chex.assert_shape(y, (4, 4, 4, 10))


@pytest.mark.parametrize("kernel_set", ["reference", "xla_cpu"])
@pytest.mark.parametrize("train", [False, True])
def test_pooling_before_a_1x1_convolution_equals_pooling_after(train, kernel_set):
    """TransitionBlock pools before its 1×1 convolution; d2l pools after. Same outputs,
    statistics and gradients (the conv's bias given a non-zero value, so it counts)."""
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 12))
    pooled = ConvBlock(features=5, kernel_size=1, average_pool=2, kernels=get_kernels(kernel_set))
    plain = ConvBlock(features=5, kernel_size=1, kernels=get_kernels(kernel_set))
    variables = pooled.init(jax.random.key(0), x, train=False)
    variables["params"]["conv"]["bias"] = jnp.arange(5.0)
    mutable = ["batch_stats"] if train else False

    def loss(params, module, pool):
        out = module.apply({**variables, "params": params}, x, train=train, mutable=mutable)
        y, stats = out if train else (out, {})
        y = pool(y)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), (y, stats)

    def pool_after(y):
        return nn.avg_pool(y, (2, 2), strides=(2, 2))

    grad = jax.value_and_grad(loss, has_aux=True)
    (_, (y1, s1)), g1 = grad(variables["params"], pooled, lambda y: y)
    (_, (y2, s2)), g2 = grad(variables["params"], plain, pool_after)
    chex.assert_shape(y1, (4, 3, 3, 5))
    chex.assert_trees_all_close((y1, s1, g1), (y2, s2, g2), rtol=1e-5, atol=1e-5)


def test_average_pool_needs_a_1x1_kernel():
    with pytest.raises(ValueError, match="average_pool=2 needs kernel_size=1"):
        init_apply(ConvBlock(features=5, kernel_size=3, average_pool=2), jnp.ones((1, 4, 4, 3)))


def test_conv_block_keeps_height_and_width():
    _, (y, _) = init_apply(ConvBlock(features=7), jnp.ones((2, 5, 6, 3)), train=True)
    chex.assert_shape(y, (2, 5, 6, 7))


def test_d2l_network_channel_and_spatial_sequence():
    cfg = densenet_jax.preset("d2l")
    assert cfg.stage_channels() == (64, 192, 96, 224, 112, 240, 120, 248)
    model = DenseNet(cfg)
    x = jnp.ones((2, 96, 96, 1))
    # shapes only: jax.eval_shape traces the network without computing it
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    logits, state = jax.eval_shape(lambda v: model.apply(
        v, x, train=False, capture_intermediates=lambda m, _: m.name and (
            m.name.startswith(("dense_block", "transition")) or m.name == "stem_norm")),
        variables)
    inter = state["intermediates"]
    shapes = [inter["stem_norm"]["__call__"][0].shape]
    for b in range(1, 5):
        shapes.append(inter[f"dense_block{b}"]["__call__"][0].shape)
        if b < 4:
            shapes.append(inter[f"transition{b}"]["__call__"][0].shape)
    assert [s[-1] for s in shapes] == [64, 192, 96, 224, 112, 240, 120, 248]
    # stem conv 96 → 48 (stem_norm sees 48), max pool → 24, transitions → 12 → 6 → 3
    assert [s[1] for s in shapes] == [48, 24, 12, 12, 6, 6, 3, 3]
    chex.assert_shape(logits, (2, 10))
    num_params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    assert 0.75e6 < num_params < 0.77e6  # "about 0.76 M parameters"


@settings(max_examples=15, deadline=None)
@given(num_convs=st.integers(1, 4), in_channels=st.integers(1, 12),
       growth_rate=st.integers(1, 16), bottleneck=st.booleans())
def test_dense_block_channel_property(num_convs, in_channels, growth_rate, bottleneck):
    block = DenseBlock(num_convs, growth_rate, bottleneck_width=4 if bottleneck else None)
    x = jnp.ones((2, 4, 4, in_channels))
    variables, y = jax.eval_shape(lambda: init_apply(block, x))  # shapes only
    chex.assert_shape(y, (2, 4, 4, in_channels + num_convs * growth_rate))
    convs = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
             if path[-1].key == "kernel"]
    assert len(convs) == num_convs * (2 if bottleneck else 1)


def test_batch_stats_collection_updates_only_in_training():
    model = DenseNet(densenet_jax.preset("d2l", block_config=(2, 2), growth_rate=8))
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 1))
    variables = initial_variables(model.config, jax.random.key(0), 32)
    assert set(variables) == {"params", "batch_stats"}
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    _, updates = apply(variables, x, train=True, mutable=("batch_stats",))
    before, after = variables["batch_stats"], updates["batch_stats"]
    for name in ("stem_norm", "head_norm"):  # every BatchNorm's statistics move
        assert not np.allclose(before[name]["mean"], after[name]["mean"])
        assert not np.allclose(before[name]["var"], after[name]["var"])
    # PyTorch's momentum 0.1: new = 0.9 old + 0.1 batch (old mean is 0 at init)
    assert np.all(np.abs(after["stem_norm"]["mean"]) > 0)
    # evaluation reads the running statistics and changes nothing, even where it may
    _, unchanged = apply(variables, x, train=False, mutable=("batch_stats",))
    chex.assert_trees_all_equal(unchanged["batch_stats"], variables["batch_stats"])
    # training without a place for the new statistics says what to pass (JAX may append
    # its note on filtered frames below the line)
    with pytest.raises(ValueError) as raised:
        model.apply(variables, x, train=True)
    assert str(raised.value).splitlines()[0] == (
        'BatchNorm in training updates its running statistics: call apply(variables, x, '
        'train=True, mutable=["batch_stats"]), which returns (output, updates), or evaluate '
        'with train=False')


def test_batchnorm_matches_pytorch_formulas():
    x = jax.random.normal(jax.random.key(0), (3, 4, 5, 2)) * 2 + 1
    bn = densenet_jax.BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=False)
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    flat = np.asarray(x).reshape(-1, 2)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1),
                               rtol=1e-5)
    expected = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), expected, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = densenet_jax.preset("d2l", dtype="bfloat16")
    model = DenseNet(cfg)
    x = jnp.ones((2, 32, 32, 1))
    # dtypes only: jax.eval_shape traces the network without computing it
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
    logits, updates = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
    assert logits.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype("float32")}


@pytest.mark.parametrize("name", sorted(densenet_jax.PRESETS))
def test_presets(name):
    cfg = densenet_jax.preset(name)
    # the CIFAR stem keeps the resolution: two transitions need 4×4
    assert cfg.min_input_size() == (4 if name == "densenet_bc_100" else 29)
    assert cfg.bottleneck == (name != "d2l")
    assert cfg.global_pool == ("max" if name == "d2l" else "avg")
    assert densenet_jax.preset(name, num_classes=1000).num_classes == 1000


@pytest.mark.parametrize("in_channels, parameters", [(3, 769_162), (1, 768_730)])
def test_densenet_bc_100_is_the_papers(in_channels, parameters):
    # Huang et al., Table 2: DenseNet-BC (L = 100, k = 12), 0.8M parameters; on one channel
    # it is the "DenseNet-BC 768K" of Fashion-MNIST's benchmark table.
    cfg = densenet_jax.preset("densenet_bc_100", in_channels=in_channels)
    assert cfg.stage_channels() == (24, 216, 108, 300, 150, 342)
    x = jnp.ones((2, 32, 32, in_channels))
    variables = jax.eval_shape(lambda: DenseNet(cfg).init(jax.random.key(0), x, train=False))
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == parameters
    assert "stem_norm" not in variables["params"]  # one 3×3 convolution, nothing after it
    chex.assert_shape(variables["params"]["stem_conv"]["kernel"], (3, 3, in_channels, 24))
    # 32×32 stays 32×32 through the stem, then 16, 8: the last block sees 8×8
    assert cfg.output_size(32) == 8 and cfg.output_size(3) == 0


@pytest.mark.parametrize("overrides, message", [
    (dict(growth_rate=0), "growth_rate must be a positive integer, got 0"),
    (dict(growth_rate=-3), "growth_rate must be a positive integer, got -3"),
    (dict(block_config=()), "block_config must name at least one dense block"),
    (dict(block_config=(4, 0)), "block_config must hold positive integers"),
    (dict(compression=0.0), r"compression must lie in \(0, 1\], got 0.0"),
    (dict(compression=1.5), r"compression must lie in \(0, 1\], got 1.5"),
    (dict(global_pool="sum"), "global_pool must be one of"),
    (dict(stem="tiny"), r"stem must be one of \('imagenet', 'cifar'\), got 'tiny'"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(num_classes=0), "num_classes must be a positive integer"),
    (dict(block_config=4), "block_config must be a sequence of positive integers, got 4"),
    (dict(bottleneck="no"), "bottleneck must be True or False, got 'no'"),
    (dict(remat="yes"), "remat must be True or False, got 'yes'"),
    (dict(conv_bias=1), "conv_bias must be True or False, got 1"),
    (dict(compression=0.001), r"compression 0.001 leaves a transition with 0 channels"),
])
def test_invalid_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        densenet_jax.preset("d2l", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'densenet999'; choose one of d2l"):
        densenet_jax.preset("densenet999")
    with pytest.raises(ValueError, match="unknown DenseNetConfig field"):
        densenet_jax.preset("d2l", growth=3)


@pytest.mark.parametrize("x, error, message", [
    (np.ones((28, 28)), ValueError, r"shape \(N, H, W, C\).*got shape \(28, 28\)"),
    (np.ones((2, 96, 96, 3)), ValueError, r"expects 1 input channel\(s\).*transpose"),
    (np.ones((2, 1, 96, 96)), ValueError, r"expects 1 input channel\(s\)"),
    (np.ones((2, 28, 28, 1)), ValueError, r"28×28 is too small.*at least 29×29"),
    (np.ones((2, 96, 16, 1)), ValueError, r"96×16 is too small"),
    (np.ones((2, 96, 96, 1), np.uint8), TypeError, r"floating-point images, got dtype uint8"),
    ([1.0, 2.0], TypeError, r"expects an array"),
])
def test_bad_input_is_rejected_before_xla(x, error, message):
    model = DenseNet(densenet_jax.preset("d2l"))
    with pytest.raises(error, match=message):
        model.init(jax.random.key(0), x, train=False)
    variables = initial_variables(model.config, jax.random.key(0), 32)
    with pytest.raises(error, match=message):
        jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def test_the_cifar_stem_says_why_an_input_is_too_small():
    model = DenseNet(densenet_jax.preset("densenet_bc_100"))
    with pytest.raises(ValueError, match=r"3×3 is too small: this DenseNet needs at least 4×4, "
                                         r"since the stem keeps height and width and each of "
                                         r"its 2 transitions halves them"):
        model.init(jax.random.key(0), jnp.ones((1, 3, 3, 1)), train=False)


@pytest.mark.parametrize("shape, where", [
    ((0, 32, 32, 1), "a batch of 0 examples"),
    ((1, 32, 32, 1), "batch 1 at 32×32: the last map is 1×1"),
])
def test_training_batch_norm_needs_two_values_per_channel(shape, where):
    """PyTorch: "Expected more than 1 value per channel when training"; silently, a batch of
    0 would turn the running statistics into NaN and one value per channel zero the logits."""
    model = DenseNet(densenet_jax.preset("d2l"))
    # shapes only (jax.eval_shape): the check is made while the network is traced
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((2, 32, 32, 1)),
                                                  train=False))
    with pytest.raises(ValueError, match=r"BatchNorm in training needs more than 1 value per "
                                         r"channel, got input of shape \("):
        jax.eval_shape(lambda v: model.apply(v, jnp.ones(shape), train=True,
                                             mutable=["batch_stats"]), variables)
    # Evaluation uses the running statistics: any batch is fine.
    chex.assert_shape(jax.eval_shape(lambda v: model.apply(v, jnp.ones((1, 32, 32, 1)),
                                                           train=False), variables), (1, 10))


def test_smallest_accepted_input_runs():
    cfg = densenet_jax.preset("d2l")
    size = cfg.min_input_size()
    assert cfg.output_size(size) == 1 and cfg.output_size(size - 1) == 0
    variables = initial_variables(cfg, jax.random.key(0), size)
    y = jax.jit(functools.partial(DenseNet(cfg).apply, train=False))(
        variables, jnp.ones((2, size, size, 1)))
    chex.assert_shape(y, (2, 10))
    assert np.all(np.isfinite(y))


def loss_and_grads(cfg, variables, x, labels):
    model = DenseNet(cfg)

    def loss_fn(params):
        logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                      mutable=["batch_stats"])
        one_hot = jax.nn.one_hot(labels, cfg.num_classes)
        return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1)), updates

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])


@pytest.mark.slow
@pytest.mark.parametrize("kernel_set", ["reference", "xla_cpu"])
def test_remat_gives_the_same_loss_gradients_and_statistics(kernel_set):
    # In float64, so that the comparison is about what is computed, not about how XLA
    # fuses (and rounds) the recomputed float32 ops.
    with jax.enable_x64(True):
        base = dict(block_config=(3, 3), growth_rate=8, dtype="float64", kernels=kernel_set)
        cfg = densenet_jax.preset("densenet121", **base)
        x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 1), dtype=jnp.float64)
        labels = jnp.arange(4)
        variables = initial_variables(cfg, jax.random.key(0), 32)
        (loss, stats), grads = loss_and_grads(cfg, variables, x, labels)
        (loss_r, stats_r), grads_r = loss_and_grads(
            densenet_jax.preset("densenet121", remat=True, **base), variables, x, labels)
    # The absolute term covers gradients that are zero in exact arithmetic (stem_norm's
    # scale here: with a zero BatchNorm bias, ReLU and max pool are positively homogeneous
    # and the next training-mode BatchNorm is scale-invariant), which are rounding noise.
    chex.assert_trees_all_close(loss, loss_r, rtol=1e-12)
    chex.assert_trees_all_close(grads, grads_r, rtol=1e-9, atol=1e-12)
    chex.assert_trees_all_close(stats, stats_r, rtol=1e-12)


def training_forward(cfg, batch, size):
    """The training-mode forward of `cfg` on ones of shape (batch, size, size, C), as a
    function of the parameters and running statistics, and their shapes."""
    model = DenseNet(cfg)
    x = jnp.ones((batch, size, size, cfg.in_channels))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def forward(params, batch_stats):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                           mutable=["batch_stats"])[0]

    return forward, variables


def residual_bytes(cfg, batch, size):
    """Bytes JAX keeps from the forward pass for the backward pass (the leaves of the
    VJP closure) of a training-mode forward, from their shapes (jax.eval_shape)."""
    forward, variables = training_forward(cfg, batch, size)
    vjp_fn = jax.eval_shape(lambda v: jax.vjp(lambda p: forward(p, v["batch_stats"]),
                                              v["params"])[1], variables)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp_fn))


# Counted as a traced (jitted) backward pass keeps them, each array once: without remat the
# xla_cpu kernels' own derivatives already keep each block's maps once for all its layers
# (28.6 MB here, against 76.2 MB for the reference kernels), which leaves remat less to save
# (the eager closures counted once per reference to a shared map: 61.2 MB).
@pytest.mark.parametrize("kernel_set, factor", [("reference", 2), ("xla_cpu", 1.5)])
def test_remat_keeps_fewer_residuals_for_the_backward_pass(kernel_set, factor):
    base = dict(block_config=(6, 12), growth_rate=16, kernels=kernel_set)
    plain = residual_bytes(densenet_jax.preset("densenet121", **base), 8, 64)
    remat = residual_bytes(densenet_jax.preset("densenet121", remat=True, **base), 8, 64)
    assert remat < plain / factor, (plain, remat)


def compiled_temp_bytes(cfg, batch, size):
    """XLA's temporary memory for the compiled gradient of a training-mode forward."""
    forward, variables = training_forward(cfg, batch, size)
    compiled = jax.jit(jax.grad(lambda p, s: forward(p, s).sum())).lower(
        variables["params"], variables["batch_stats"]).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_remat_lowers_the_compiled_memory_on_xla_cpu():
    # What the compiler allocates, not only what JAX keeps: with jax.checkpoint's barriers
    # alone (the reference kernels), XLA:CPU merges the recomputation back into the forward
    # pass (ratio 1.0); the xla_cpu kernels' remat keeps it apart.
    base = dict(block_config=(6, 12), kernels="xla_cpu")
    plain = compiled_temp_bytes(densenet_jax.preset("densenet121", **base), 8, 32)
    remat = compiled_temp_bytes(densenet_jax.preset("densenet121", remat=True, **base), 8, 32)
    assert remat < plain / 1.5, (plain, remat)


def test_equal_configs_are_one_static_argument():
    """The config is what jitted functions take as a static argument (train.steps): equal
    configs built apart hash alike and trace once; another config traces again."""
    x = jnp.ones((2, 32, 32, 1))
    variables = initial_variables(densenet_jax.preset("d2l", block_config=(2, 2)),
                                  jax.random.key(0), 32)

    @functools.partial(jax.jit, static_argnames="config")
    @chex.assert_max_traces(n=2)
    def predict(variables, x, *, config):
        return DenseNet(config).apply(variables, x, train=False)

    for seed in range(3):  # a new config object each time, block_config once a list
        config = densenet_jax.preset("d2l", block_config=[2, 2] if seed else (2, 2))
        predict(variables, jax.random.uniform(jax.random.key(seed), x.shape), config=config)
    assert predict._cache_size() == 1
    predict(variables, x, config=densenet_jax.preset("d2l", block_config=(2, 2),
                                                     global_pool="avg"))
    assert predict._cache_size() == 2
