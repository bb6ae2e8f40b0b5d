"""The recipe's pieces: augmentations inside the step, the weights' moving average,
test-time flips, and the recipe's fields from the command line."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import densenet_jax
from train import main as cli
from train.config import RECIPES, RecipeConfig
from train.pipeline import augment, random_crop_and_flip, random_erasing
from train.parallel import data_mesh, replicate
from train.build import initial_state
from train.steps import (StepConfig, infer, initial_variables, learning_rate_schedule,
                         moving_average, train_step, zero_metrics)


def images(batch=64, seed=0):
    """Random uint8 images (B, 28, 28, 1), none with a constant region."""
    return jnp.asarray(np.random.default_rng(seed).integers(1, 255, (batch, 28, 28, 1)),
                       jnp.uint8)


def test_random_erasing_erases_one_box_per_chosen_image():
    x = images()
    y = random_erasing(x, jax.random.key(0), probability=1.0)
    chex.assert_shape(y, x.shape)
    assert y.dtype == jnp.uint8
    changed = np.asarray(y != x)[..., 0]  # noise may equal a pixel now and then
    for mask in changed:
        rows, cols = np.nonzero(mask)
        # one box: every changed pixel lies in its bounding box, which is mostly changed
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.mean() > 0.9
        # area within the drawn range (2 % to 40 % of the image), allowing rounding
        assert 0.01 * 28 * 28 <= box.size <= 0.45 * 28 * 28


def test_random_erasing_at_probability_0_is_the_identity():
    x = images()
    np.testing.assert_array_equal(random_erasing(x, jax.random.key(3), probability=0.0), x)
    np.testing.assert_array_equal(augment(x, jax.random.key(3), RECIPES["d2l"]), x)


def test_random_erasing_chooses_about_probability_of_the_images():
    x = images(batch=1000)
    y = random_erasing(x, jax.random.key(1), probability=0.25)
    erased = np.asarray(jnp.any(y != x, axis=(1, 2, 3))).mean()
    assert 0.20 < erased < 0.30


def test_the_augmentation_is_a_function_of_the_key():
    x = images()
    recipe = dataclasses.replace(RECIPES["strong"], random_erasing=0.5)
    first = augment(x, jax.random.key(7), recipe)
    np.testing.assert_array_equal(first, augment(x, jax.random.key(7), recipe))
    assert np.any(first != augment(x, jax.random.key(8), recipe))
    # the crops are those of the strong recipe without erasing: earlier runs keep their draws
    np.testing.assert_array_equal(augment(x, jax.random.key(7), RECIPES["strong"]),
                                  random_crop_and_flip(x, jax.random.key(7)))


def test_moving_average_warms_up_then_keeps_its_decay():
    average, now = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    # step 0: decay 1/10, so the average moves 90 % of the way
    np.testing.assert_allclose(moving_average(average, now, jnp.int32(0), 0.999)["w"], 0.9)
    # late: the configured decay
    np.testing.assert_allclose(moving_average(average, now, jnp.int32(10**6), 0.999)["w"],
                               0.001, rtol=1e-4)


def test_the_cosine_schedule_warms_up_then_decays_to_zero():
    schedule = learning_rate_schedule(RECIPES["strong"], steps_per_epoch=10, epochs=3)
    rates = np.array([schedule(step) for step in range(31)])
    np.testing.assert_allclose(rates[[0, 5, 10]], [0.0, 0.05, 0.1], atol=1e-7)
    assert np.all(np.diff(rates[10:]) < 0) and rates[30] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("steps_per_epoch", [1, 4])
def test_a_run_no_longer_than_its_warm_up_still_has_a_schedule(steps_per_epoch):
    # one epoch of the strong recipe: the warm-up ends a step early, so the cosine has one
    schedule = learning_rate_schedule(RECIPES["strong"], steps_per_epoch, epochs=1)
    rates = np.array([schedule(step) for step in range(steps_per_epoch + 1)])
    assert np.all(np.isfinite(rates)) and rates[steps_per_epoch] == pytest.approx(0.0, abs=1e-7)
    assert rates.max() == pytest.approx(0.1) and rates[steps_per_epoch - 1] == rates.max()


TINY = densenet_jax.preset("d2l", block_config=(2, 2), growth_rate=8, stem_channels=8)


def test_evaluation_uses_the_moving_average(splits):
    mesh = data_mesh()
    config = StepConfig(model=TINY, recipe=RecipeConfig(ema_decay=0.9), resize=32)
    state = initial_state(config, jax.random.key(0))
    initial = jax.tree.map(np.asarray, state.variables)
    chex.assert_trees_all_equal(state.ema, initial)
    data = replicate((splits["train"].images[:64], splits["train"].labels[:64]), mesh)
    metrics, learning_rate = replicate((zero_metrics(), np.float32(0.1)), mesh)
    for step in range(3):
        indices = replicate(np.arange(16 * step, 16 * step + 16, dtype=np.int32), mesh)
        previous = jax.tree.map(np.asarray, state.ema)  # the step donates its state
        state, metrics = train_step(state, metrics, *data, indices, jax.random.key(0),
                                    learning_rate, config=config, mesh=mesh)
        # each step: the average moves towards the new weights by 1 − decay
        decay = min(0.9, (1 + step + 1) / (10 + step + 1))
        chex.assert_trees_all_close(
            state.ema, jax.tree.map(lambda a, v: decay * a + (1 - decay) * v, previous,
                                    state.variables), rtol=1e-5, atol=1e-6)
    assert state.eval_variables is state.ema
    assert not np.allclose(state.ema["params"]["classifier"]["kernel"],
                           state.params["classifier"]["kernel"])
    plain = initial_state(StepConfig(model=TINY, recipe=RecipeConfig(), resize=32),
                          jax.random.key(0))
    assert plain.ema is None
    chex.assert_trees_all_equal(plain.eval_variables, plain.variables)


def test_test_time_flip_averages_the_logits_of_both_mirror_images():
    x = images(batch=4)
    variables = initial_variables(TINY, jax.random.key(0), 32)
    logits = jax.jit(functools.partial(infer, model=TINY, resize=32), static_argnames="flip")
    plain, mirrored = logits(variables, x), logits(variables, x[:, :, ::-1])
    both = logits(variables, x, flip=True)
    np.testing.assert_allclose(both, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(both, plain)
    # a mirror-symmetric image is its own mirror image: flipping changes nothing
    symmetric = jnp.concatenate([x[:, :, :14], x[:, :, 13::-1]], axis=2)
    np.testing.assert_allclose(logits(variables, symmetric, flip=True),
                               logits(variables, symmetric), rtol=1e-5, atol=1e-6)


def test_recipe_fields_from_the_command_line():
    args = cli.parse_args(["--recipe", "strong", "--lr", "0.05", "--recipe-fields",
                           "random_erasing=0.25", "ema_decay=0.999", "test_flip=true"])
    recipe = cli.run_config(args).recipe
    assert recipe == dataclasses.replace(RECIPES["strong"], learning_rate=0.05,
                                         random_erasing=0.25, ema_decay=0.999, test_flip=True)


@pytest.mark.parametrize("fields, message", [
    (["ema_decay=1"], "--recipe-fields invalid RecipeConfig: ema_decay must lie in [0, 1), got 1.0"),
    (["random_erasing=2"], "random_erasing must lie in [0, 1], got 2.0"),
    (["schedule=step"], "schedule must be one of ('constant', 'cosine'), got 'step'"),
    (["test_flip=maybe"], "--recipe-fields test_flip=maybe: test_flip takes true or false"),
    (["mixup=0.2"], "--recipe-fields 'mixup=0.2' is not FIELD=VALUE with a RecipeConfig field"),
])
def test_bad_recipe_fields_are_one_line(fields, message, tmp_path, capsys):
    assert cli.main(["--workdir", str(tmp_path), "--recipe-fields", *fields]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
