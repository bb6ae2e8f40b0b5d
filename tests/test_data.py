"""Fashion-MNIST loading: the real files, corrupt files, downloads, and tfds."""
import gzip
import hashlib
import http.server
import shutil
import threading
import time
from collections import Counter

import numpy as np
import pytest

from train import data

FIRST_TRAIN_LABELS = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
FIRST_TEST_LABELS = [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def test_real_files_have_the_official_checksums(data_dir):
    for name, expected in data.FILES.items():
        assert data.sha256(data_dir / name) == expected


def test_real_splits(splits):
    train, test = splits["train"], splits["test"]
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28, 1) and test.labels.shape == (10000,)
    assert Counter(train.labels.tolist()) == {c: 6000 for c in range(10)}
    assert Counter(test.labels.tolist()) == {c: 1000 for c in range(10)}
    assert train.labels[:10].tolist() == FIRST_TRAIN_LABELS
    assert test.labels[:10].tolist() == FIRST_TEST_LABELS
    assert abs(train.images.mean() - 72.940) < 1e-3


def write_idx(path, header: bytes, payload: bytes, compress=True):
    raw = header + payload
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def idx_header(magic_dims: int, *shape) -> bytes:
    return bytes([0, 0, 8, magic_dims]) + b"".join(n.to_bytes(4, "big") for n in shape)


@pytest.mark.parametrize("make, message", [
    (lambda p: write_idx(p, bytes([0, 0, 9, 3]) + (2).to_bytes(4, "big") * 3, b""),
     "IDX magic 00000903, expected 00000803"),
    (lambda p: write_idx(p, idx_header(1, 4), b"\0" * 4), "IDX magic 00000801, expected 00000803"),
    (lambda p: write_idx(p, idx_header(3, 2, 28, 28), b"\0" * 100),
     r"holds 100 bytes of data but its header declares shape \(2, 28, 28\)"),
    (lambda p: write_idx(p, idx_header(3, 2, 28), b""), "ends inside its IDX header"),
    (lambda p: write_idx(p, idx_header(3, 1, 28, 28), b"\0" * 784, compress=False),
     "is not a readable gzip file"),
    (lambda p: p.write_bytes(gzip.compress(idx_header(3, 1, 28, 28) + b"\0" * 784)[:-20]),
     "is not a readable gzip file"),
])
def test_corrupt_idx_files(tmp_path, make, message):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    make(path)
    with pytest.raises(data.DataError, match=message):
        data.read_idx(path, 3)


def test_image_and_label_counts_must_agree(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", idx_header(3, 3, 28, 28), b"\0" * 3 * 784)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_header(1, 2), b"\0\1")
    with pytest.raises(data.DataError, match="holds 3 images but .* 2 labels"):
        data.read_idx_split(tmp_path, "test")


def test_wrong_image_size(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", idx_header(3, 1, 32, 32), b"\0" * 1024)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_header(1, 1), b"\0")
    with pytest.raises(data.DataError, match=r"images of \(32, 32\), expected 28×28"):
        data.read_idx_split(tmp_path, "test")


def copy_data(data_dir, tmp_path):
    folder = tmp_path / "fashion"
    shutil.copytree(data_dir, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def test_missing_folder_and_missing_file(tmp_path, data_dir):
    with pytest.raises(data.DataError, match="does not exist; pass --data-dir"):
        data.load(data.DataConfig(data_dir=str(tmp_path / "nowhere")))
    folder = copy_data(data_dir, tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz is missing"):
        data.load(data.DataConfig(data_dir=str(folder)))


def test_checksum_mismatch(tmp_path, data_dir):
    folder = copy_data(data_dir, tmp_path)
    with open(folder / "train-labels-idx1-ubyte.gz", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz has sha256 .*, expected "
                                             "a04f1713.*damaged or not the official one"):
        data.load(data.DataConfig(data_dir=str(folder)))


class Server:
    """A local HTTP server on 127.0.0.1 serving `files`; names in `drop` are cut off
    after half their bytes (the connection closes mid-file)."""

    def __init__(self, files: dict[str, bytes], drop=(), trickle=()):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path.lstrip("/") in trickle:  # a byte every 50 ms: never idle long
                    try:
                        for byte in body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.05)
                    except ConnectionError:  # the client gave up
                        return
                cut = len(body) // 2 if self.path.lstrip("/") in drop else len(body)
                self.wfile.write(body[:cut])

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def small_files(monkeypatch):
    """Four small stand-in files, with their checksums made the 'official' ones."""
    files = {name: gzip.compress(name.encode() * 1000) for name in data.FILES}
    monkeypatch.setattr(data, "FILES", {n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    return files


def test_download_good_files(tmp_path, small_files):
    server = Server(small_files)
    try:
        data.ensure_files(tmp_path / "cache", may_download=True, base_url=server.url)
    finally:
        server.close()
    for name, body in small_files.items():
        assert (tmp_path / "cache" / name).read_bytes() == body
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(small_files)


def test_download_with_wrong_checksum_keeps_nothing(tmp_path, small_files):
    name = "train-labels-idx1-ubyte.gz"
    server = Server({**small_files, name: b"not the official file"})
    try:
        with pytest.raises(data.DataError, match=f"downloaded .*{name} has sha256"):
            data.download(name, tmp_path, base_url=server.url)
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []


def test_dropped_connection_never_replaces_a_good_file(tmp_path, small_files):
    name = "t10k-images-idx3-ubyte.gz"
    good = tmp_path / name
    good.write_bytes(b"a good file from before")
    server = Server(small_files, drop={name})
    try:
        with pytest.raises(data.DataError, match=f"could not download .*{name}"):
            data.download(name, tmp_path, base_url=server.url)
    finally:
        server.close()
    assert good.read_bytes() == b"a good file from before"
    assert list(tmp_path.iterdir()) == [good]


def test_a_trickling_server_meets_the_deadline(tmp_path, small_files, capsys):
    name = "train-labels-idx1-ubyte.gz"
    server = Server(small_files, trickle={name})
    try:
        with pytest.raises(data.DataError, match=f"could not download .*{name}: still "
                                                 f"incomplete after the deadline"):
            data.download(name, tmp_path, base_url=server.url, timeout=5, deadline=1)
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err == f"downloading {server.url}{name} into {tmp_path}\n"


def test_stale_partial_downloads_are_removed(tmp_path, small_files):
    name = "t10k-labels-idx1-ubyte.gz"
    stale = tmp_path / f".{name}.abc123.part"
    stale.write_bytes(b"half a file from a killed run")
    server = Server(small_files)
    try:
        data.download(name, tmp_path, base_url=server.url)
    finally:
        server.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("damage", ["folder_for_file", "data_dir_is_file"])
def test_file_system_mistakes_in_the_data_folder_are_one_line(data_dir, tmp_path, damage):
    folder = copy_data(data_dir, tmp_path)
    if damage == "folder_for_file":
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()
        (folder / "t10k-labels-idx1-ubyte.gz").mkdir()
        message = "t10k-labels-idx1-ubyte.gz is a folder, expected the Fashion-MNIST file"
    else:
        folder = tmp_path / "a_file"
        folder.write_text("")
        message = "a_file is not a folder; pass --data-dir"
    with pytest.raises(data.DataError, match=message) as error:
        data.load(data.DataConfig(data_dir=str(folder)))
    assert "\n" not in str(error.value)


def test_cache_folder_is_the_default(monkeypatch, tmp_path):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.resolve_data_dir(None) == (tmp_path / "densenet_jax" / "fashion-mnist", True)
    monkeypatch.setenv(data.ENV_VAR, "/some/folder")
    assert data.resolve_data_dir(None)[0].as_posix() == "/some/folder"
    assert data.resolve_data_dir("/flag/wins")[0].as_posix() == "/flag/wins"


def multiset(split):
    """Sorted (label, image bytes) pairs: the examples regardless of order."""
    return sorted(zip(split.labels.tolist(), (image.tobytes() for image in split.images)))


@pytest.mark.slow
def test_tfds_and_idx_sources_agree(data_dir, splits, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # tfds prepares its records here
    tfds_splits = data.load(data.DataConfig(source="tfds", data_dir=str(data_dir)))
    for name in ("train", "test"):
        assert tfds_splits[name].images.shape == splits[name].images.shape
        assert multiset(tfds_splits[name]) == multiset(splits[name])


def test_tfds_missing_says_how_to_install(data_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorflow_datasets", None)
    with pytest.raises(data.DataError, match=r'needs tensorflow-datasets: pip install -e "\.\[tfds\]"'):
        data.load(data.DataConfig(source="tfds", data_dir=str(data_dir)))
