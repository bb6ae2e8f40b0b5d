"""train.predict: image files of any size and kind, classified as the trained network does
in evaluation; bad files named in one line each."""
import functools

import jax
import numpy as np
import pytest
from PIL import Image

from train import predict
from train.checkpoint import load_run
from train.data import CLASS_NAMES
from train.steps import infer


def test_images_are_brought_to_28_by_28_in_the_run_s_channels(tmp_path):
    colour = np.zeros((100, 80, 3), np.uint8)
    colour[..., 0] = 255  # pure red: grey 76 in Pillow's "L"
    Image.fromarray(colour).save(tmp_path / "red.jpg", quality=100)
    grey = predict.read_image(tmp_path / "red.jpg", channels=1)
    assert grey.shape == (28, 28, 1) and grey.dtype == np.uint8
    assert abs(int(grey[14, 14, 0]) - 76) <= 2
    np.save(tmp_path / "grey.npy", np.full((28, 28), 200, np.uint8))
    assert (predict.read_image(tmp_path / "grey.npy", channels=3) == 200).all()
    np.save(tmp_path / "small.npy", np.full((14, 14, 1), 100.0))
    assert (predict.read_image(tmp_path / "small.npy", channels=1) == 100).all()


@pytest.mark.parametrize("name, content, message", [
    ("absent.png", None, "no such file"),
    ("text.png", b"hello", "not an image Pillow can read"),
    ("cube.npy", np.zeros((2, 3, 4, 5), np.uint8), "holds an array of shape (2, 3, 4, 5)"),
    ("words.npy", np.array(["a", "b"]), "holds <U1 values; expected pixels 0..255"),
])
def test_a_bad_file_is_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content)
    with pytest.raises(ValueError) as raised:
        predict.read_image(path, channels=1)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def expected_line(trained, name: str, image: np.ndarray, k: int = 3) -> str:
    run, state, _, _ = load_run(trained)
    logits = jax.jit(functools.partial(infer, model=run.model, resize=run.train.resize))(
        state.variables, image[None])
    return f"{name}: {predict.top_k(np.asarray(jax.nn.softmax(logits[0])), CLASS_NAMES, k)}"


@pytest.mark.slow
def test_files_are_classified_as_the_network_classifies_the_test_images(trained, splits,
                                                                         tmp_path, capsys):
    images = splits["test"].images[:2]
    png, npy = str(tmp_path / "first.png"), str(tmp_path / "second.npy")
    Image.fromarray(images[0][..., 0]).save(png)
    np.save(npy, images[1])
    big = str(tmp_path / "big.jpg")
    Image.fromarray(np.kron(images[0][..., 0], np.ones((4, 4), np.uint8))).convert("RGB").save(big)
    broken = str(tmp_path / "broken.png")
    (tmp_path / "broken.png").write_bytes(b"no image")
    code = predict.main(["--workdir", str(trained), png, broken, npy, big])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert code == 1  # one file failed, the others were classified
    assert lines[:2] == [expected_line(trained, png, images[0]),
                         expected_line(trained, npy, images[1])]
    assert lines[2].startswith(f"{big}: ") and lines[2].count(",") == 2
    assert captured.err.startswith(f"error: {broken}: not an image Pillow can read")
    assert captured.err.count("\n") == 1
