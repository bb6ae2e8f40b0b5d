"""The trainer end to end on real Fashion-MNIST: learning, files, resume, bad input."""
import dataclasses
import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import densenet_jax
from conftest import TINY, train_cli as run_cli
from densenet_jax.torch_reference import reference_model, xavier_init_
from train import main as cli
from train.build import initial_state, step_config
from train.checkpoint import CheckpointError, with_epochs
from train.config import RECIPES, RunConfig, without_computation_fields
from train.datasets import split_for_validation
from train.loop import accuracies, fit, load_initial_weights
from train.outputs import SCALARS
from train.steps import StepConfig


@pytest.mark.slow
def test_short_real_run_learns_and_writes_its_files(data_dir, tmp_path, capsys):
    code = run_cli(data_dir, tmp_path, "--limit-train", "4000", "--batch-size", "64",
                   "--epochs", "2", "--lr", "0.3")
    out = capsys.readouterr().out
    assert code == 0, out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["test_acc"] > 0.5  # chance is 0.1
    assert records[-1]["loss"] < records[0]["loss"]
    lines = out.strip().splitlines()
    assert lines[-2] == (f"loss {records[-1]['loss']:.3f}, train acc {records[-1]['train_acc']:.3f}, "
                         f"test acc {records[-1]['test_acc']:.3f}")
    assert lines[-1].endswith("examples/sec on cpu:0 (cpu)")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def small(splits):
    """The training split as fit() takes it, with a tenth of the test split (faster)."""
    return {"train": splits["train"], "test": splits["test"].head(1000)}


def quick_run(data_dir, *recipe_args):
    """The tiny network's run at 32×32: 600 examples in batches of 128, two epochs."""
    args = cli.parse_args(["--data-dir", str(data_dir), "--resize", "32", "--limit-train", "600",
                           "--batch-size", "128", "--epochs", "2", *TINY, *recipe_args])
    return cli.run_config(args)


def results(history):
    """The figures of a history that do not depend on timing."""
    return [{k: v for k, v in r.items() if k not in ("examples_per_sec", "train_seconds")}
            for r in history]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [
    ["--recipe", "d2l"],
    # every piece of the recipe that draws at random or keeps state: crops, flips, erasing,
    # the cosine schedule's step, the moving average; evaluated on a validation split too
    ["--recipe", "strong", "--recipe-fields", "random_erasing=0.5", "ema_decay=0.99",
     "test_flip=true", "--validation", "500"],
], ids=["d2l", "strong+erasing+ema+flip+validation"])
def test_resume_equals_uninterrupted(data_dir, splits, tmp_path, recipe):
    run = quick_run(data_dir, *recipe)
    splits = small(splits)
    straight = fit(run, splits, tmp_path / "straight", log=lambda line: None)

    with pytest.raises(KeyboardInterrupt):
        fit(run, splits, tmp_path / "resumed", log=_interrupt_after_epoch_1)
    resumed = fit(run, splits, tmp_path / "resumed", resume=True, log=lambda line: None)

    assert results(resumed) == results(straight)  # bitwise: same floats
    assert ("val_acc" in straight[-1]) == (run.train.validation > 0)
    saved = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert results(saved) == results(straight)


@pytest.mark.slow
def test_resume_with_other_kernels_and_remat(data_dir, splits, tmp_path):
    """Kernels and remat change how the model is computed, not what: a run saved with the
    xla_cpu kernels continues with the reference kernels and remat, and its checkpoint
    holds the same parameter tree."""
    first = cli.run_config(cli.parse_args(["--resize", "32", "--limit-train", "300",
                                           "--batch-size", "100", "--epochs", "2",
                                           "--kernels", "xla_cpu", *TINY]))
    with pytest.raises(KeyboardInterrupt):
        fit(first, small(splits), tmp_path, log=_interrupt_after_epoch_1)
    second = cli.run_config(cli.parse_args(["--resize", "32", "--limit-train", "300",
                                            "--batch-size", "100", "--epochs", "2",
                                            "--kernels", "reference", "--remat", *TINY]))
    assert (second.model.kernels, second.model.remat) == ("reference", True)
    history = fit(second, small(splits), tmp_path, resume=True, log=lambda line: None)
    assert [r["epoch"] for r in history] == [1, 2] and np.isfinite(history[-1]["loss"])


def _interrupt_after_epoch_1(line):
    if line.startswith("epoch 1/"):
        raise KeyboardInterrupt


@pytest.mark.slow
def test_equal_runs_share_compiled_programs(data_dir, splits, tmp_path, compilations):
    """A run compiles its steps before the first epoch, one program per batch shape, and
    nothing during the epochs; an equal run in the same process, or one with another
    learning rate, seed or length, compiles nothing at all."""
    # 1000 examples in batches of 96: ten full batches and one of 40.
    run = cli.run_config(cli.parse_args(["--resize", "32", "--limit-train", "1000",
                                         "--batch-size", "96", "--epochs", "2", *TINY]))
    marks = {}  # what had been compiled when each kind of line was logged
    fit(run, small(splits), tmp_path / "first",
        log=lambda line: marks.setdefault(line.split()[0], len(compilations())))
    names = compilations()
    steps = sorted(name for name in names[marks["compiling"]:marks["compiled"]]
                   if name.endswith("_step"))
    assert steps == ["eval_step", "eval_step", "train_step", "train_step"]  # 96 and 40 each
    assert not {"train_step", "eval_step"} & set(names[marks["compiled"]:])

    compiled = len(compilations())
    fit(run, small(splits), tmp_path / "again", log=lambda line: None)
    other = dataclasses.replace(
        run, recipe=dataclasses.replace(run.recipe, learning_rate=0.05),
        train=dataclasses.replace(run.train, seed=7, epochs=1))
    history = fit(other, small(splits), tmp_path / "other", log=lambda line: None)
    assert compilations()[compiled:] == []
    assert [r["epoch"] for r in history] == [1]  # it did train


def test_what_a_train_step_program_depends_on():
    """The static argument of train_step: equal for runs that differ only in learning rate,
    seed, or (with a constant rate) epochs; a cosine schedule keeps its length."""
    run = RunConfig(model=densenet_jax.preset("d2l"))
    config = step_config(run, 1000)
    other = RunConfig(model=densenet_jax.preset("d2l"),
                      recipe=dataclasses.replace(run.recipe, learning_rate=0.05),
                      train=dataclasses.replace(run.train, seed=3, epochs=20))
    assert step_config(other, 1000) == config and hash(step_config(other, 1000)) == hash(config)
    assert config.schedule_steps == (0, 0)
    strong = RunConfig(recipe=RECIPES["strong"])
    assert step_config(strong, 1000).schedule_steps == (4, 10)
    assert step_config(strong, 1000) != step_config(dataclasses.replace(
        strong, train=dataclasses.replace(strong.train, epochs=20)), 1000)
    assert step_config(run, 1000) != step_config(dataclasses.replace(
        run, model=densenet_jax.preset("d2l", growth_rate=16)), 1000)
    assert StepConfig(model=run.model, recipe=RECIPES["strong"], resize=96).recipe \
        == dataclasses.replace(RECIPES["strong"], learning_rate=0.1)


def test_ctrl_c_says_how_to_resume(data_dir, tmp_path, capsys, monkeypatch):
    def interrupted_after_epoch_3(*args, **kwargs):
        for epoch in (1, 2, 3):
            (tmp_path / "checkpoints" / str(epoch)).mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "fit", interrupted_after_epoch_3)
    assert run_cli(data_dir, tmp_path, "--limit-train", "600") == 130
    assert capsys.readouterr().err.strip() == (
        f"interrupted: epochs up to 3 are saved in {tmp_path / 'checkpoints'}; continue with "
        f"the same command plus --resume")


@pytest.mark.parametrize("args, message", [
    (["--resize", "4"], "--resize 4 is below this network's minimum input size 5"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--epochs", "-1"], "--epochs must be positive, got -1"),
    (["--lr", "0"], "--lr must be positive and finite, got 0.0"),
    (["--lr", "inf"], "--lr must be positive and finite, got inf"),
    (["--recipe-fields", "weight_decay=inf"], "weight_decay must be finite and not negative, "
                                              "got inf"),
    (["--model", "dtype=float64"], "--model dtype=float64: training computes in float32 or "
                                   "bfloat16 (--precision)"),
    (["--model", "num_classes=5"], "the network has num_classes=5 outputs but the data has 10 "
                                   "classes; set --model num_classes=10"),
    (["--limit-train", "0"], "--limit-train must be positive, got 0"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--init-from", "nowhere.pth"], "--init-from nowhere.pth: no such file"),
    (["--model", "growth_rate=x"], "--model growth_rate=x: growth_rate takes an integer"),
    (["--model", "colour=red"], "--model 'colour=red' is not FIELD=VALUE with a DenseNetConfig "
                                "field; the fields: stem, stem_channels,"),
    (["--model", "compression=0"], "invalid DenseNetConfig: compression must lie in (0, 1]"),
    (["--model", "block_config=4,4,4,4,4,4"], "--resize 32 is below this network's minimum"),
    (["--validation", "-1"], "--validation must not be negative, got -1"),
    (["--validation", "60000"], "--validation 60000 must lie in 0..59999: the training split "
                                "has 60000 examples"),
])
def test_bad_arguments(data_dir, tmp_path, capsys, args, message):
    assert run_cli(data_dir, tmp_path, "--limit-train", "600", *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("examples, batch, sizes", [
    (65, 64, [65]), (129, 64, [64, 65]), (130, 64, [64, 64, 2]), (128, 64, [64, 64]),
    (1, 64, [1]), (10, 64, [10])])
def test_a_last_batch_of_one_example_joins_the_one_before(examples, batch, sizes):
    from train.pipeline import epoch_batches, training_batch_sizes
    assert training_batch_sizes(examples, batch) == sizes
    batches = epoch_batches(jax.random.key(0), examples, batch)
    assert [len(b) for b in batches] == sizes
    assert sorted(np.concatenate(batches).tolist()) == list(range(examples))


@pytest.mark.slow
def test_a_run_whose_last_batch_would_hold_one_example_trains(data_dir, tmp_path, capsys):
    # d2l's four blocks, slimmer: at 32×32 the last feature map is 1×1, where BatchNorm
    # cannot train on one example.
    assert run_cli(data_dir, tmp_path, "--limit-train", "65", "--batch-size", "64",
                   "--epochs", "1", "--model", "growth_rate=8", "stem_channels=8") == 0
    assert ("the last batch of each epoch would hold 1 example, which BatchNorm cannot train "
            "on: it joins the batch before (65 examples)") in capsys.readouterr().out


def test_bad_data_folder(tmp_path, capsys):
    assert run_cli(tmp_path / "nowhere", tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert "does not exist; pass --data-dir" in err and err.count("\n") == 1


@pytest.mark.slow
def test_resume_with_another_config_is_refused(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path, "--limit-train", "300", "--epochs", "1") == 0
    assert run_cli(data_dir, tmp_path, "--limit-train", "300", "--epochs", "1", "--lr", "0.05",
                   "--resume") == 1
    err = capsys.readouterr().err
    assert "is of another configuration (recipe.learning_rate was 0.1, now 0.05)" in err


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, splits, tmp_path,
                                                                    monkeypatch):
    from train import loop

    run = quick_run(data_dir)
    real_device_get = jax.device_get
    epochs_seen = []

    def poisoned_after_epoch_1(tree):  # epoch 2's loss turns to NaN
        tree = real_device_get(tree)
        if isinstance(tree, dict) and "loss_sum" in tree:
            epochs_seen.append(1)
            if len(epochs_seen) == 2:
                tree = {**tree, "loss_sum": np.float32("nan")}
        return tree

    monkeypatch.setattr(loop.jax, "device_get", poisoned_after_epoch_1)
    with pytest.raises(loop.NonFiniteLossError, match="the loss became nan in epoch 2, training "
                                                      "stopped; the last good checkpoint "
                                                      r"\(epoch 1\) is kept"):
        fit(run, small(splits), tmp_path, log=lambda line: None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_diverging_lr_gives_a_clear_error(data_dir, tmp_path, capsys):
    assert run_cli(data_dir, tmp_path, "--limit-train", "300", "--epochs", "1",
                   "--lr", "1e30") == 1
    err = capsys.readouterr().err
    assert re.search(r"the loss became (nan|-?inf) in epoch 1", err) and "nothing was saved" in err


def imagenet_shaped_file(folder, **fields) -> tuple[str, dict]:
    """d2l's network (with `fields` changed) for 3-channel images and 1000 classes, saved
    as a PyTorch file."""
    torch.manual_seed(0)
    state = xavier_init_(reference_model(densenet_jax.preset(
        "d2l", in_channels=3, num_classes=1000, **fields))).state_dict()
    path = str(folder / "imagenet.pth")
    torch.save(state, path)
    return path, state


def test_initial_weights_are_the_file_s(tmp_path):
    path, state = imagenet_shaped_file(tmp_path)
    config = densenet_jax.preset("d2l")
    fresh = initial_state(step_config(RunConfig(model=config), 1000), jax.random.key(0))
    lines = []
    loaded = load_initial_weights(fresh, path, config, log=lines.append)
    assert lines == [f"started from the weights in {path}; stem convolution adapted from 3 "
                     f"input channels to 1 (summed over them); classifier re-initialised for "
                     f"10 classes (the weights have 1000)"]
    np.testing.assert_array_equal(loaded.params["dense_block2"]["layer4"]["conv_block"]["conv"]
                                  ["kernel"], state["3.net.3.2.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded.batch_stats["transition1"]["conv_block"]["norm"]["mean"],
                                  state["2.0.running_mean"].numpy())
    np.testing.assert_array_equal(loaded.params["classifier"]["kernel"],
                                  fresh.params["classifier"]["kernel"])


@pytest.mark.slow
def test_fine_tuning_from_a_pytorch_file(data_dir, tmp_path, capsys):
    path, _ = imagenet_shaped_file(tmp_path, block_config=(2, 2), growth_rate=8,
                                   stem_channels=8)  # TINY's network
    code = run_cli(data_dir, tmp_path / "run", "--init-from", path, "--limit-train", "512",
                   "--batch-size", "128", "--epochs", "1")
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"started from the weights in {path}; stem convolution adapted" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["init_from"] == path



def test_a_run_saved_before_newer_fields_existed_still_resumes():
    current = RunConfig().result_fields()
    older = {**current,
             "train": {k: v for k, v in current["train"].items()
                       if k not in ("init_from", "validation")},
             "model": {k: v for k, v in current["model"].items() if k != "stem"}}
    assert without_computation_fields(older) == current


# TensorFlow's own reader of event files, in a subprocess: TensorFlow's runtime stays out of
# the test process, whose later JAX compilations it can crash.
READ_EVENTS = """
import json, sys
import tensorflow as tf
scalars = {}
for path in sys.argv[1:]:
    for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
print(json.dumps(scalars))
"""


def tensorboard_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard reads from the workdir's event files: tag → [(step, value)]."""
    paths = sorted(str(p) for p in workdir.glob("events.out.tfevents.*"))
    done = subprocess.run([sys.executable, "-c", READ_EVENTS, *paths], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {tag: [tuple(pair) for pair in pairs]
            for tag, pairs in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def test_validation_holds_out_the_last_training_examples(splits):
    train, held_out = split_for_validation(splits["train"], 5000)
    assert (len(train), len(held_out)) == (55000, 5000)
    np.testing.assert_array_equal(held_out.images, splits["train"].images[-5000:])
    np.testing.assert_array_equal(train.labels, splits["train"].labels[:55000])
    train, held_out = split_for_validation(splits["train"], 0)  # the default: d2l's run
    assert train is not splits["train"] and len(train) == 60000 and len(held_out) == 0
    record = {"loss": 0.1544, "train_acc": 0.9431, "test_acc": 0.8802}
    assert accuracies(record) == "loss 0.154, train acc 0.943, test acc 0.880"  # d2l's line
    assert accuracies({**record, "val_acc": 0.8911}).endswith("test acc 0.880, val acc 0.891")


@pytest.mark.slow
def test_tensorboard_shows_what_metrics_jsonl_holds(trained):
    # the run holds a validation split (conftest), so val_acc is among the scalars
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(trained)
    assert sorted(scalars) == sorted(SCALARS)
    for name in SCALARS:
        steps, values = zip(*scalars[name])
        assert steps == (1, 2, 3)
        np.testing.assert_allclose(values, [r[name] for r in records], rtol=1e-6)


@pytest.mark.slow
def test_a_constant_rate_run_continues_for_longer(data_dir, splits, tmp_path):
    """d2l's 2-epoch run resumed with --epochs 3 ends as the 3-epoch run made in one go."""
    two = quick_run(data_dir)
    three = dataclasses.replace(two, train=dataclasses.replace(two.train, epochs=3))
    straight = fit(three, small(splits), tmp_path / "straight", log=lambda line: None)
    fit(two, small(splits), tmp_path / "longer", log=lambda line: None)
    longer = fit(three, small(splits), tmp_path / "longer", resume=True, log=lambda line: None)
    assert results(longer) == results(straight)  # bitwise
    assert json.loads((tmp_path / "longer" / "config.json").read_text())["train"]["epochs"] == 3


def test_a_cosine_run_keeps_its_length():
    saved = RunConfig(recipe=RECIPES["strong"]).result_fields()
    longer = {**saved, "train": {**saved["train"], "epochs": 20}}
    with pytest.raises(CheckpointError, match=r"^--resume with --epochs 20: this run's cosine "
                                              r"learning-rate schedule spans its 10 epochs"):
        with_epochs(saved, longer)
    d2l = RunConfig().result_fields()
    longer = {**d2l, "train": {**d2l["train"], "epochs": 20}}
    assert with_epochs(d2l, longer) == longer


def test_every_model_field_can_be_set_from_the_command_line():
    args = cli.parse_args(["--preset", "densenet121", "--precision", "bf16", "--model",
                           "growth_rate=12", "block_config=6,12,24,16", "stem_channels=24",
                           "conv_bias=true", "dtype=float32"])
    model = cli.run_config(args).to_dict()["model"]  # what config.json records
    assert (model["growth_rate"], model["block_config"], model["stem_channels"]) == \
        (12, (6, 12, 24, 16), 24)
    assert model["conv_bias"] is True and model["bottleneck"] is True
    assert model["dtype"] == "float32"  # --model wins over --precision

