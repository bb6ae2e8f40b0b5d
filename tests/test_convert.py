"""from_torch / to_torch: layouts, round trips and the errors that name a key."""
import chex
import jax
import numpy as np
import pytest
import torch

import densenet_jax
from densenet_jax.torch_reference import TorchvisionDenseNet, d2l_densenet, reference_model
from train.steps import initial_variables

SMALL_BC = dict(block_config=(2, 3), growth_rate=8)


def test_sequential_keys_as_in_the_source():
    state = d2l_densenet(densenet_jax.preset("d2l")).state_dict()
    assert {"0.0.weight", "1.net.0.0.weight", "1.net.0.2.weight", "2.2.weight",
            "8.running_var", "12.weight"} <= set(state)
    variables = densenet_jax.from_torch(state, densenet_jax.preset("d2l"))
    np.testing.assert_array_equal(variables["params"]["stem_conv"]["kernel"],
                                  state["0.0.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["classifier"]["kernel"],
                                  state["12.weight"].numpy().T)
    np.testing.assert_array_equal(variables["batch_stats"]["head_norm"]["var"],
                                  state["8.running_var"].numpy())


def test_torchvision_keys():
    config = densenet_jax.preset("densenet121", **SMALL_BC)
    state = TorchvisionDenseNet(config).state_dict()
    assert "features.denseblock2.denselayer3.conv2.weight" in state
    assert "features.transition1.conv.weight" in state and "classifier.bias" in state
    variables = densenet_jax.from_torch(state, config)
    np.testing.assert_array_equal(
        variables["params"]["dense_block1"]["layer2"]["bottleneck"]["conv"]["kernel"],
        state["features.denseblock1.denselayer2.conv1.weight"].numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("config", [densenet_jax.preset("d2l"),
                                    densenet_jax.preset("densenet121", **SMALL_BC)])
def test_round_trip_through_pytorch(config):
    variables = initial_variables(config, jax.random.key(0), 32)
    state = densenet_jax.to_torch(variables, config)
    torch_model = reference_model(config)
    torch_model.load_state_dict(state)  # strict: every key present, none extra
    chex.assert_trees_all_equal(densenet_jax.from_torch(torch_model.state_dict(), config),
                                variables)


def test_unknown_key_is_named():
    config = densenet_jax.preset("d2l")
    state = dict(d2l_densenet(config).state_dict(), **{"13.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected key\(s\) in state_dict: '13.weight'"):
        densenet_jax.from_torch(state, config)


def test_missing_key_is_named():
    config = densenet_jax.preset("d2l")
    state = d2l_densenet(config).state_dict()
    del state["1.net.0.0.running_mean"]
    with pytest.raises(ValueError, match=r"missing key\(s\) in state_dict: '1.net.0.0.running_mean'"):
        densenet_jax.from_torch(state, config)


def test_wrong_layout_says_which_is_expected():
    state = d2l_densenet(densenet_jax.preset("d2l")).state_dict()
    with pytest.raises(ValueError, match=r"unexpected key.*torchvision-layout state_dict is expected"):
        densenet_jax.from_torch(state, densenet_jax.preset("densenet121"))


def test_misshaped_key_is_named():
    config = densenet_jax.preset("d2l")
    state = d2l_densenet(densenet_jax.preset("d2l", growth_rate=16)).state_dict()
    with pytest.raises(ValueError, match=r"state_dict key '1.net.0.2.weight' has shape "
                                         r"\(16, 64, 3, 3\), expected \(32, 64, 3, 3\)"):
        densenet_jax.from_torch(state, config)
    state = d2l_densenet(config).state_dict()
    state["12.weight"] = state["12.weight"][None]
    with pytest.raises(ValueError, match=r"state_dict key '12.weight' has shape \(1, 10, 248\), "
                                         r"expected \(10, 248\)"):
        densenet_jax.from_torch(state, config)


def test_weights_do_not_depend_on_the_kernel_set():
    state = TorchvisionDenseNet(densenet_jax.preset("densenet121", **SMALL_BC)).state_dict()
    loaded = {kernels: densenet_jax.from_torch(state, densenet_jax.preset(
        "densenet121", kernels=kernels, **SMALL_BC)) for kernels in ("reference", "xla_cpu")}
    chex.assert_trees_all_equal(loaded["reference"], loaded["xla_cpu"])
    for kernels, variables in loaded.items():
        back = densenet_jax.to_torch(variables, densenet_jax.preset("densenet121",
                                                                    kernels=kernels, **SMALL_BC))
        assert all(np.array_equal(back[key].numpy(), state[key].numpy()) for key in state)


def test_bfloat16_state_dict_loads_as_its_float32_values():
    config = densenet_jax.preset("d2l")
    state = d2l_densenet(config).state_dict()
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    loaded = densenet_jax.from_torch(half, config)
    np.testing.assert_array_equal(loaded["params"]["stem_conv"]["kernel"],
                                  half["0.0.weight"].float().numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("change, error, message", [
    (lambda state: list(state.items()), TypeError, "from_torch expects a state_dict .* got list"),
    (lambda state: {**state, "12.bias": "zeros"}, ValueError,
     "state_dict key '12.bias' holds str 'zeros', not an array of numbers"),
])
def test_from_torch_bad_containers_are_one_line(change, error, message):
    config = densenet_jax.preset("d2l")
    with pytest.raises(error, match=message) as raised:
        densenet_jax.from_torch(change(d2l_densenet(config).state_dict()), config)
    assert "\n" not in str(raised.value)


def test_to_torch_checks_its_variables():
    config = densenet_jax.preset("d2l")
    variables = initial_variables(config, jax.random.key(0), 32)
    with pytest.raises(ValueError, match=r"to_torch: the variables need 'params' and "
                                         r"'batch_stats'.*got \['params'\]"):
        densenet_jax.to_torch({"params": variables["params"]}, config)
    with pytest.raises(ValueError, match="to_torch: the variables are not of this config "
                                         r"\(params differ at classifier/kernel, dense_block1/layer1/"):
        densenet_jax.to_torch(variables, densenet_jax.preset("d2l", growth_rate=16))
