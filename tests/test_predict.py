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
    grey, note = predict.read_image(tmp_path / "red.jpg", channels=1)
    assert grey.shape == (28, 28, 1) and grey.dtype == np.uint8 and note is None
    assert abs(int(grey[14, 14, 0]) - 76) <= 2
    np.save(tmp_path / "grey.npy", np.full((28, 28), 200, np.uint8))
    assert (predict.read_image(tmp_path / "grey.npy", channels=3)[0] == 200).all()
    np.save(tmp_path / "small.npy", np.full((14, 14, 1), 100, np.int64))
    assert (predict.read_image(tmp_path / "small.npy", channels=1)[0] == 100).all()
    rgb = np.zeros((28, 28, 3), np.float32)
    rgb[..., 1] = 0.6  # the mean of R, G, B: 0.2, i.e. 51
    np.save(tmp_path / "rgb.npy", rgb)
    assert (predict.read_image(tmp_path / "rgb.npy", channels=1)[0] == 51).all()


@pytest.mark.parametrize("values, pixel, note", [
    (np.full((28, 28), 0.5, np.float32), 128, "float32 pixels, scaled from [0, 1]"),
    (np.full((28, 28), 1.0), 255, "float64 pixels, scaled from [0, 1]"),
    (np.full((28, 28), 65535, np.uint16), 255, "16-bit pixels, scaled from 0..65535"),
    (np.full((28, 28), 257 * 40, np.uint16), 40, "16-bit pixels, scaled from 0..65535"),
    (np.full((28, 28), 255, np.int32), 255, None),
    (np.full((28, 28), 7, np.uint8), 7, None),
])
def test_pixel_values_are_read_by_one_rule(tmp_path, values, pixel, note):
    np.save(tmp_path / "image.npy", values)
    image, said = predict.read_image(tmp_path / "image.npy", channels=1)
    assert (image == pixel).all() and said == note


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 28 * 28).astype(np.uint16).reshape(28, 28)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    for channels in (1, 3):
        image, note = predict.read_image(tmp_path / "deep.png", channels=channels)
        np.testing.assert_array_equal(
            image, np.repeat(np.round(ramp / 257.0).astype(np.uint8)[..., None], channels, -1))
        assert note == "16-bit pixels, scaled from 0..65535"


@pytest.mark.parametrize("name, content, message", [
    ("absent.png", None, "no such file"),
    ("text.png", b"hello", "not an image Pillow can read"),
    ("cube.npy", np.zeros((2, 3, 4, 5), np.uint8), "holds an array of shape (2, 3, 4, 5)"),
    ("words.npy", np.array(["a", "b"]), "holds <U1 values; expected pixels: uint8 0..255"),
    ("flat.npy", np.zeros((0, 28), np.uint8), "holds an empty image of shape (0, 28, 1)"),
    ("wide.npy", np.full((28, 28), 1.5, np.float32),
     "holds float32 values from 1.5 to 1.5; floats are read as pixels in [0, 1]"),
    ("negative.npy", np.full((28, 28), -0.25), "holds float64 values from -0.25 to -0.25"),
    ("nan.npy", np.full((28, 28), np.nan, np.float32), "holds 784 values that are NaN or "
                                                       "infinite"),
    ("large.npy", np.full((28, 28), 300, np.int16), "holds int16 values from 300 to 300; "
                                                    "expected pixels 0..255"),
    ("flags.npy", np.ones((28, 28), bool), "holds bool values"),
    ("folder", "folder", "is a folder"),
])
def test_a_bad_file_is_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.mkdir()
    elif content is not None:
        np.save(path, content)
    with pytest.raises(ValueError) as raised:
        predict.read_image(path, channels=1)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_folder_gives_its_images_in_name_order(tmp_path):
    (tmp_path / "b" / ".hidden").mkdir(parents=True)
    for name in ("b/2.png", "a.npy", "b/1.JPG", "b/.hidden/3.png", "notes.txt", ".4.png"):
        (tmp_path / name).write_bytes(b"")
    assert predict.image_files(tmp_path) == [tmp_path / "a.npy", tmp_path / "b" / "1.JPG",
                                             tmp_path / "b" / "2.png"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".5.png").write_bytes(b"")
    (tmp_path / "other" / "readme.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="^this folder holds no image or .npy files$"):
        predict.image_files(tmp_path / "other")


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
    empty = str(tmp_path / "empty.npy")
    np.save(empty, np.zeros((0, 28), np.uint8))
    scaled = str(tmp_path / "scaled.npy")
    np.save(scaled, images[1].astype(np.float32) / 255)
    folder = tmp_path / "folder"
    (folder / "inner").mkdir(parents=True)
    Image.fromarray(images[1][..., 0]).save(folder / "inner" / "b.png")
    np.save(folder / "a.npy", images[0])
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "nothing").mkdir()
    code = predict.main(["--workdir", str(trained), png, broken, empty, npy, big, scaled,
                         str(folder), str(tmp_path / "nothing")])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert code == 1  # three arguments failed, the others were classified
    assert lines[:2] == [expected_line(trained, png, images[0]),
                         expected_line(trained, npy, images[1])]
    assert lines[2].startswith(f"{big}: ") and lines[2].count(",") == 2
    assert lines[3:] == [expected_line(trained, scaled, images[1]),
                         expected_line(trained, str(folder / "a.npy"), images[0]),
                         expected_line(trained, str(folder / "inner" / "b.png"), images[1])]
    assert captured.err.splitlines() == [
        f"error: {broken}: not an image Pillow can read (cannot identify image file "
        f"{broken!r}); pass PNG, JPEG or .npy",
        f"error: {empty}: holds an empty image of shape (0, 28, 1)",
        f"note: {scaled}: float32 pixels, scaled from [0, 1]",
        f"error: {tmp_path / 'nothing'}: this folder holds no image or .npy files"]
