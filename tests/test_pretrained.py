"""load_pytorch and fine_tune_variables: weight files as people have them, built here from
the shipped PyTorch reference (renamed as torchvision's released files and wrappers name
their keys)."""
import re
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import densenet_jax
from densenet_jax.torch_reference import reference_model
from train.steps import initial_variables

SMALL_BC = dict(block_config=(2, 3), growth_rate=8)


def bc_state(**fields) -> dict:
    """A small DenseNet-BC's PyTorch state_dict, with random running statistics (so that a
    mix-up of mean and variance shows)."""
    config = densenet_jax.preset("densenet121", **SMALL_BC, **fields)
    state = reference_model(config).state_dict()
    generator = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
    return state


def legacy(state: dict) -> dict:
    """Keys as torchvision's released files have them: `norm.1`, `conv.1`, `norm.2`, ..."""
    return {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
            for k, v in state.items()}


def as_numpy(state: dict) -> dict:
    return {k: np.ascontiguousarray(v.numpy()) for k, v in state.items()}


LAYOUTS = {
    "today's names": lambda s: s,
    "torchvision's released files": legacy,
    "DataParallel": lambda s: {f"module.{k}": v for k, v in legacy(s).items()},
    "torch.compile": lambda s: {f"_orig_mod.{k}": v for k, v in s.items()},
    "a training checkpoint": lambda s: {"epoch": 3, "state_dict": s},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_as_today_s_state_dict(layout):
    config = densenet_jax.preset("densenet121", **SMALL_BC)
    state = bc_state()
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy(state)
    expected = densenet_jax.from_torch(state, config)
    chex.assert_trees_all_equal(densenet_jax.load_pytorch(LAYOUTS[layout](state), config),
                                expected)


def test_pth_and_safetensors_files_load_alike(tmp_path):
    config = densenet_jax.preset("densenet121", **SMALL_BC)
    state = bc_state()
    torch.save({"model": legacy(state)}, tmp_path / "weights.pth")
    save_file(as_numpy(legacy(state)), str(tmp_path / "weights.safetensors"))
    expected = densenet_jax.from_torch(state, config)
    for name in ("weights.pth", "weights.safetensors"):
        chex.assert_trees_all_equal(densenet_jax.load_pytorch(tmp_path / name, config),
                                    expected)


def test_safetensors_needs_no_torch(tmp_path, monkeypatch):
    config = densenet_jax.preset("densenet121", **SMALL_BC)
    state = bc_state()
    save_file(as_numpy(state), str(tmp_path / "weights.safetensors"))
    torch.save(state, tmp_path / "weights.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    densenet_jax.load_pytorch(tmp_path / "weights.safetensors", config)
    with pytest.raises(ValueError, match=r"weights.pth needs PyTorch \(pip install torch\)"):
        densenet_jax.load_pytorch(tmp_path / "weights.pth", config)


@pytest.mark.parametrize("name, content, message", [
    ("absent.pth", None, r"absent.pth: no such weights file"),
    ("broken.pth", b"not a zip", r"broken.pth is not a weights file that torch.load"),
    ("broken.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage",
     r"broken.safetensors is not a readable .safetensors file"),
])
def test_bad_weight_files_are_one_line(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as raised:
        densenet_jax.load_pytorch(tmp_path / name, densenet_jax.preset("d2l"))
    assert "\n" not in str(raised.value)


def test_the_wrong_network_is_named():
    with pytest.raises(ValueError, match=r"missing key\(s\) in state_dict: "
                                         r"'features.denseblock2.denselayer4"):
        densenet_jax.load_pytorch(legacy(bc_state()),
                                  densenet_jax.preset("densenet121", block_config=(2, 4),
                                                      growth_rate=8))


@pytest.mark.parametrize("name, parameters", [("densenet121", 7_978_856),
                                              ("densenet161", 28_681_000)])
def test_presets_have_torchvision_s_parameter_counts(name, parameters):
    """torchvision's documented counts, for 3-channel input and 1000 classes."""
    config = densenet_jax.preset(name, in_channels=3, num_classes=1000)
    shapes = jax.eval_shape(lambda: densenet_jax.DenseNet(config).init(
        jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False))
    assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == parameters
    assert sum(p.numel() for p in reference_model(config).parameters()) == parameters


def test_fine_tuning_adapts_the_stem_and_the_classifier_and_loads_the_rest():
    source = bc_state(in_channels=3, num_classes=1000)
    config = densenet_jax.preset("densenet121", **SMALL_BC)  # 1 channel, 10 classes
    fresh = initial_variables(config, jax.random.key(1), 32)
    variables, notes = densenet_jax.fine_tune_variables(legacy(source), config, fresh)
    assert notes == ["stem convolution adapted from 3 input channels to 1 (summed over them)",
                     "classifier re-initialised for 10 classes (the weights have 1000)"]
    params, stats = variables["params"], variables["batch_stats"]
    summed = source["features.conv0.weight"].double().sum(1, keepdim=True).float()
    np.testing.assert_array_equal(params["stem_conv"]["kernel"],
                                  summed.numpy().transpose(2, 3, 1, 0))
    chex.assert_trees_all_equal(params["classifier"], fresh["params"]["classifier"])
    np.testing.assert_array_equal(
        params["dense_block2"]["layer3"]["conv_block"]["conv"]["kernel"],
        source["features.denseblock2.denselayer3.conv2.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(stats["head_norm"]["var"],
                                  source["features.norm5.running_var"].numpy())


@pytest.mark.parametrize("fields, key, hint", [
    (dict(in_channels=3), "features.conv0.weight", "in_channels=3"),
    (dict(num_classes=1000), "classifier.weight", "num_classes=1000"),
])
def test_weights_for_other_channels_or_classes_say_how_to_load_them(fields, key, hint):
    with pytest.raises(ValueError) as raised:
        densenet_jax.load_pytorch(bc_state(**fields), densenet_jax.preset("densenet121",
                                                                          **SMALL_BC))
    assert str(raised.value).startswith(f"state_dict key {key!r} has shape ")
    assert str(raised.value).endswith(
        f"for this config; the weights were made for {hint}: build the config with it, or load "
        f"them with densenet_jax.fine_tune_variables, which adapts the stem and replaces the "
        f"classifier")


def test_weights_cast_to_integers_are_refused(tmp_path):
    path = tmp_path / "cast.safetensors"
    save_file({k: v.numpy().astype(np.int32) if v.is_floating_point() else v.numpy()
               for k, v in bc_state().items()}, path)
    with pytest.raises(ValueError, match=r"^state_dict key '[\w.]+' holds int32 values, not "
                                         r"floating point: the weights were cast; save them "
                                         r"as floats$"):
        densenet_jax.load_pytorch(path, densenet_jax.preset("densenet121", **SMALL_BC))


def test_adapting_to_three_channels_tiles_and_keeps_the_scale():
    weight = np.arange(2 * 3 * 1 * 1, dtype=np.float64).reshape(2, 3, 1, 1)
    grey = densenet_jax.pretrained.adapt_input_conv(weight, 1)
    np.testing.assert_array_equal(grey[:, 0, 0, 0], weight.sum(1)[:, 0, 0])
    five = densenet_jax.pretrained.adapt_input_conv(weight, 5)
    np.testing.assert_allclose(five[:, :, 0, 0], np.concatenate(
        [weight, weight[:, :2]], axis=1)[:, :, 0, 0] * 3 / 5)
