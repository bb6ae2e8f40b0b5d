"""Data sets beyond Fashion-MNIST: tensorflow-datasets by name (cifar10's mock data, no
network), folders of images, normalisation, and the streaming input path, which must give
what the on-device path gives."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import TINY
from train import datasets, evaluate, export, main as cli, predict, stream
from train.config import RunConfig, TrainConfig
from train.data import DataConfig, DataError, Split
from train.loop import fit
from train.pipeline import epoch_batches, preprocess, training_batch_sizes


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def make_folder(root, classes=("cat", "dog", "owl"), per_class=24, grey=False, split=True,
                seed=0):
    """Image folders as people have them: PNG and JPEG, odd sizes, grey and colour mixed
    (all grey with `grey`); below train/ and test/ with `split`. Each class has its own
    brightness, so that a network can learn it."""
    rng = np.random.default_rng(seed)
    for subset, count in ((("train", per_class), ("test", per_class // 3)) if split
                          else (("", per_class),)):
        for label, name in enumerate(classes):
            folder = root / subset / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(20, 50, 2)
                base = 40 + 80 * label
                pixels = np.clip(rng.normal(base, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if grey or i % 3 == 0:
                    image = image.convert("L")
                suffix = ".jpg" if i % 2 else ".png"
                image.save(folder / f"{i:03d}{suffix}")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("photos"))


def test_a_folder_is_read_with_its_classes_channels_and_size(photos, tmp_path):
    dataset = datasets.open_folder(photos, 32)
    assert dataset.info.class_names == ("cat", "dog", "owl")
    assert dataset.info.image_shape == (32, 32, 3)  # colour: not every image is grey
    assert [len(dataset.splits[s]) for s in ("train", "test")] == [72, 24]
    images, labels = dataset.splits["train"].read(np.array([0, 30, 71]))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2]
    grey = datasets.open_folder(make_folder(tmp_path / "grey", grey=True, split=False), 28)
    assert grey.info.image_shape == (28, 28, 1)
    # no train/ and test/: every tenth image of each class is a test image
    assert [len(grey.splits[s]) for s in ("train", "test")] == [66, 6]


@pytest.mark.parametrize("setup, message", [
    (lambda root: root.mkdir(), "holds no class sub-folders with images; put each class's"),
    (lambda root: make_folder(root, classes=("cat",)), "holds one class (cat); a classifier"),
    (lambda root: (make_folder(root), (root / "train" / "dog" / "bad.png").write_bytes(b"no")),
     "1 file cannot be read as an image: train/dog/bad.png"),
    (lambda root: None, "no such folder"),
])
def test_bad_folders_are_one_line(tmp_path, capsys, setup, message):
    root = tmp_path / "data"
    setup(root)
    code = cli.main(["--dataset", f"folder:{root}", "--workdir", str(tmp_path / "run"),
                     "--resize", "32", *TINY])
    assert code == 1 and message in one_error_line(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_and_unprepared_data_sets_are_one_line(tmp_path, capsys):
    assert cli.main(["--dataset", "cifar_eleven", "--data-dir", str(tmp_path),
                     "--workdir", str(tmp_path / "run")]) == 1
    assert "tensorflow-datasets has no data set of that name" in one_error_line(capsys)
    assert cli.main(["--dataset", "cifar10", "--data-dir", str(tmp_path),
                     "--workdir", str(tmp_path / "run")]) == 1
    assert (f"--dataset cifar10 is not prepared in {tmp_path}; prepare it once with `tfds "
            f"build cifar10 --data_dir {tmp_path}") in one_error_line(capsys)


def test_channels_set_against_the_data_set_are_one_line(data_dir, tmp_path, capsys):
    assert cli.main(["--data-dir", str(data_dir), "--workdir", str(tmp_path), *TINY,
                     "in_channels=3"]) == 1
    assert ("--model in_channels=3, but --dataset fashion_mnist has 1-channel images"
            in one_error_line(capsys))


def test_normalisation_is_applied_per_channel_after_resizing():
    images = np.full((1, 4, 4, 3), 255, np.uint8)
    x = preprocess(images, 8, ((0.5, 0.25, 0.0), (0.5, 0.25, 2.0)))
    assert x.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(x[0, 0, 0], [1.0, 3.0, 0.5])


def test_normalize_choices(photos):
    info = datasets.open_folder(photos, 32).info
    assert cli.normalization("auto", info, "w.pth", None) == datasets.imagenet_stats(3)
    assert cli.normalization("auto", info, None, lambda: ((0.1,) * 3, (0.2,) * 3)) == (
        (0.1,) * 3, (0.2,) * 3)
    assert cli.normalization("auto", datasets.FASHION_MNIST, None, None) == (None, None)
    assert cli.normalization("imagenet", datasets.FASHION_MNIST, None, None) == (
        (0.449,), (0.226,))
    assert cli.normalization("0.5,0.5,0.5/2,2,2", info, None, None) == ((0.5,) * 3, (2.0,) * 3)
    with pytest.raises(ValueError, match="give 3 mean and 3 positive std values"):
        cli.normalization("0.5/2", info, None, None)


def test_channel_stats_are_the_training_images():
    images = np.zeros((4, 2, 2, 3), np.uint8)
    images[..., 0] = 255
    images[:2, ..., 1] = 255
    mean, std = datasets.channel_stats(Split(images, np.zeros(4, np.int32)))
    assert mean == (1.0, 0.5, 0.0) and std == (1e-6, 0.5, 1e-6)


@pytest.mark.slow
def test_a_folder_trains_resumes_evaluates_predicts_and_exports(photos, tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["--dataset", f"folder:{photos}", "--workdir", str(workdir), "--resize", "32",
            "--batch-size", "16", *TINY]
    assert cli.main([*args, "--epochs", "1"]) == 0
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["in_channels"] == 3 and config["model"]["num_classes"] == 3
    assert config["data"]["class_names"] == ["cat", "dog", "owl"]
    assert len(config["data"]["mean"]) == 3  # measured on the training images
    assert cli.main([*args, "--epochs", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from epoch 1" in out and "epoch 3/3" in out

    assert evaluate.main(["--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-5].startswith("class ") and "owl" in out

    picture = photos / "test" / "owl" / "000.png"
    assert predict.main(["--workdir", str(workdir), str(picture)]) == 0
    assert capsys.readouterr().out.startswith(f"{picture}: ")
    out_file = tmp_path / "model.jax"
    assert export.main(["--workdir", str(workdir), "--out", str(out_file)]) == 0
    exported = jax.export.deserialize(out_file.read_bytes())
    images, _ = datasets.open_folder(photos, 32).splits["test"].read(np.arange(4))
    f, shape = export.inference_function(workdir)
    assert shape == (32, 32, 3)
    np.testing.assert_allclose(exported.call(images), f(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cifar10_by_name_trains_resumes_evaluates_predicts_and_exports(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    workdir = tmp_path / "run"
    args = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "tfds"), "--workdir",
            str(workdir), "--batch-size", "32", *TINY]
    with tfds.testing.mock_data(num_examples=96, policy=tfds.testing.MockPolicy.USE_CODE):
        assert cli.main([*args, "--epochs", "1"]) == 0
        out = capsys.readouterr().out
        assert "loading cifar10 (tensorflow-datasets)" in out
        config = json.loads((workdir / "config.json").read_text())
        assert config["train"]["resize"] == 32  # the data set's image size
        assert (config["model"]["in_channels"], config["model"]["num_classes"]) == (3, 10)
        assert config["data"]["image_shape"] == [32, 32, 3]
        assert cli.main([*args, "--epochs", "2", "--resume", "--input", "stream"]) == 0
        assert "resumed from epoch 1" in capsys.readouterr().out
        assert evaluate.main(["--workdir", str(workdir)]) == 0
        assert "test acc" in capsys.readouterr().out
    image = tmp_path / "rgb.png"
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(image)
    assert predict.main(["--workdir", str(workdir), str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "m.jax")]) == 0
    assert "uint8 images (batch, 32, 32, 3)" in capsys.readouterr().out


# ---------------------------------------------------------------- the streaming path


def quick(data_dir, input_path, epochs=2, **train):
    return RunConfig(model=cli.model_config(cli.parse_args(list(TINY))),
                     train=TrainConfig(epochs=epochs, batch_size=100, resize=32, **train),
                     data=DataConfig(data_dir=str(data_dir), input=input_path))


def small_splits(splits):
    # 601 examples: the last batch of one example joins the one before
    return {"train": splits["train"].head(601), "test": splits["test"].head(300)}


def results(history):
    return [{k: v for k, v in r.items() if k not in ("examples_per_sec", "train_seconds")}
            for r in history]


@pytest.mark.slow
def test_streaming_equals_the_on_device_path(data_dir, splits, tmp_path):
    """Same batches, same steps: bitwise the same metrics and weights on the CPU, a
    validation split included."""
    histories, params = {}, {}
    for path in ("device", "stream"):
        run = quick(data_dir, path, validation=100)
        histories[path] = fit(run, small_splits(splits), tmp_path / path, log=lambda line: None)
        _, state, _, _ = stream_free_load(tmp_path / path)
        params[path] = jax.tree.leaves(state.params)
    assert results(histories["stream"]) == results(histories["device"])
    for a, b in zip(params["stream"], params["device"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def stream_free_load(workdir):
    from train.checkpoint import load_run
    return load_run(workdir)


def _interrupt_after_epoch_1(line):
    if line.startswith("epoch 1/"):
        raise KeyboardInterrupt


@pytest.mark.slow
def test_a_resumed_streaming_run_equals_an_uninterrupted_one(data_dir, splits, tmp_path):
    run = quick(data_dir, "stream", epochs=3)
    straight = fit(run, small_splits(splits), tmp_path / "straight", log=lambda line: None)
    with pytest.raises(KeyboardInterrupt):
        fit(run, small_splits(splits), tmp_path / "resumed", log=_interrupt_after_epoch_1)
    meta = json.loads(next((tmp_path / "resumed" / "checkpoints" / "1").rglob(
        "meta/metadata")).read_text())
    assert meta["reader"]["next_index"] == 6  # after epoch 1's 6 batches (the last of 101)
    resumed = fit(run, small_splits(splits), tmp_path / "resumed", resume=True,
                  log=lambda line: None)
    assert results(resumed) == results(straight)


def test_streamed_batches_are_the_on_device_batches():
    key = jax.random.key(3)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    batches = stream.TrainingBatches(key, 601, 100, 2, mesh)
    assert len(batches) == 2 * 6
    for epoch in (1, 2):
        expected = epoch_batches(jax.random.fold_in(key, epoch), 601, 100)
        for b, indices in enumerate(expected):
            mine, size = batches[(epoch - 1) * 6 + b]
            np.testing.assert_array_equal(mine, np.asarray(indices))
            assert size == len(indices)


class FakeDevice:
    def __init__(self, process_index):
        self.process_index = process_index


class FakeMesh:
    """Two processes of two devices each, as `local_rows` sees a mesh."""

    devices = np.asarray([FakeDevice(p) for p in (0, 0, 1, 1)])
    size = 4


@pytest.mark.parametrize("num_examples, batch_size", [(1000, 100), (1001, 100), (998, 100)])
def test_each_process_reads_a_disjoint_shard_and_together_the_whole_split(
        monkeypatch, num_examples, batch_size):
    """Over an epoch, the rows each of two processes reads: the ones of its devices for
    batches split over the mesh (disjoint); all rows of a batch the mesh does not divide
    (replicated). Together, every training example once."""
    read = {}
    for process in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda: process)
        batches = stream.TrainingBatches(jax.random.key(0), num_examples, batch_size, 1,
                                         FakeMesh())
        read[process] = [batches[i][0] for i in range(len(batches))]
    sizes = training_batch_sizes(num_examples, batch_size)
    union = []
    for size, mine, theirs in zip(sizes, read[0], read[1]):
        if size % 4 == 0:
            assert len(mine) == len(theirs) == size // 2 and not set(mine) & set(theirs)
            union += [*mine, *theirs]
        else:
            np.testing.assert_array_equal(mine, theirs)
            union += list(mine)
    assert sorted(union) == list(range(num_examples))


def test_auto_streams_what_exceeds_the_device_limit(splits):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    lines = []
    parts = [splits["train"].head(1024)]  # 784 kB
    assert stream.input_path(DataConfig(device_limit_mib=1), parts, mesh, lines.append) == "device"
    assert stream.input_path(DataConfig(device_limit_mib=0.5), parts, mesh,
                             lines.append) == "stream"
    assert lines[-1] == ("input: 0.8 MiB of images, streamed through grain, 4 reader threads "
                         "(the device limit: 0 MiB, --device-limit)")


def test_data_errors_in_a_streamed_folder_name_the_file(photos, tmp_path):
    source = datasets.open_folder(photos, 32).splits["train"]
    broken = datasets.FolderSource((tmp_path / "gone.png",), np.zeros(1, np.int32), 32, 3)
    with pytest.raises(DataError, match="gone.png cannot be read as an image"):
        broken.read(np.arange(1))
    assert source.read(np.arange(2))[0].shape == (2, 32, 32, 3)
