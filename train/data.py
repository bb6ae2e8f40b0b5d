"""Fashion-MNIST: the four official IDX files, checked by sha256, from a folder, a
download, or tensorflow-datasets; every source yields the same uint8 arrays.

images: (N, 28, 28, 1) uint8, labels: (N,) int32.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np

ENV_VAR = "FASHION_MNIST_DIR"
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# The official files' sha256 (identical to the checksums tensorflow-datasets records).
FILES = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
NUM_CLASSES = 10
IMAGE_SIZE = 28  # height and width of every image
# d2l's get_fashion_mnist_labels, in label order
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "ankle boot")
SOURCES = ("idx", "tfds")


class DataError(Exception):
    """Missing, corrupt or unreadable data; the message says what to do."""


INPUTS = ("auto", "device", "stream")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data set, where it lies, how its pixels are normalised and how it reaches the
    devices. `dataset`: "fashion_mnist" (its four files, read as `source` says), any
    image-classification data set of tensorflow-datasets by name, or "folder:PATH" (see
    train.datasets). `mean`/`std`: per channel, of pixels in [0, 1], subtracted and divided
    by before the network (None: pixels ÷ 255 only, as d2l). `input`: "device" holds each
    split on the devices, "stream" reads batches as training goes (train.stream), "auto"
    streams a split larger than `device_limit_mib` (None: a quarter of one device's
    memory); both give the same results. `image_shape` and `class_names` are the data
    set's, recorded by the trainer for evaluation, prediction and export."""

    source: str = "idx"
    data_dir: str | None = None  # None: $FASHION_MNIST_DIR, else the per-user cache
    download: bool = True        # fetch missing files (Fashion-MNIST: into the cache folder)
    dataset: str = "fashion_mnist"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input: str = "auto"
    device_limit_mib: float | None = None
    image_shape: tuple[int, int, int] = (IMAGE_SIZE, IMAGE_SIZE, 1)
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self):  # JSON gives lists: tuples keep the config hashable
        for name in ("mean", "std", "image_shape", "class_names"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if (self.mean is None) != (self.std is None) or (
                self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError(f"mean {self.mean} and std {self.std} must both be given, with "
                             f"one value per channel")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS}, got {self.input!r}")

    @property
    def normalize(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std), or None for pixels ÷ 255 only."""
        return None if self.mean is None else (self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class Split:
    """A split held whole in host memory."""

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of the examples `indices` (train.datasets.Source)."""
        return self.images[indices], self.labels[indices]

    def head(self, n: int) -> "Split":
        return Split(self.images[:n], self.labels[:n])



def default_cache_dir() -> Path:
    """Per-user cache folder, as torchvision and Keras keep one."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "densenet_jax" / "fashion-mnist"


def resolve_data_dir(data_dir: str | None) -> tuple[Path, bool]:
    """(folder, whether it is the cache, where missing files may be downloaded)."""
    if data_dir:
        return Path(data_dir), False
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), False
    return default_cache_dir(), True


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(name: str, folder: Path, base_url: str = MIRROR, timeout: float = 60.0,
             deadline: float = 600.0) -> Path:
    """Fetch one official file into `folder`, checking its sha256. The bytes go to a
    temporary file first, so a failed or partial download never replaces a good file.
    `timeout` bounds each read, `deadline` the whole download (seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{name}.*.part"):  # left by a download that was killed
        stale.unlink(missing_ok=True)
    target = folder / name
    url = base_url + name
    print(f"downloading {url} into {folder}", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            copy_until(response, out, time.monotonic() + deadline, url)
            size, received = response.headers.get("Content-Length"), out.tell()
        if size is not None and received != int(size):
            raise DataError(f"could not download {url}: the connection dropped after "
                            f"{received} of {size} bytes; try again, or download the file "
                            f"by hand into {folder}")
        if (actual := sha256(Path(tmp))) != FILES[name]:
            raise DataError(f"downloaded {url} has sha256 {actual}, expected {FILES[name]}; "
                            f"the mirror served a different file, try again later")
        os.replace(tmp, target)
    except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, cut transfers
        raise DataError(f"could not download {url}: {error}; download the four Fashion-MNIST "
                        f"files by hand into {folder} or pass --data-dir") from error
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def copy_until(source, out, end: float, url: str, chunk: int = 1 << 16) -> None:
    """Copy `source` to `out` as shutil.copyfileobj does, but give up at monotonic time
    `end`: a server that trickles bytes would otherwise keep a run waiting forever."""
    while block := source.read1(chunk):  # whatever has arrived: read() waits for all
        out.write(block)
        if time.monotonic() > end:
            raise DataError(f"could not download {url}: still incomplete after the deadline "
                            f"({out.tell()} bytes received); try again, or download the file "
                            f"by hand into the data folder")


def ensure_files(folder: Path, may_download: bool, base_url: str = MIRROR) -> None:
    """Every official file present with its official sha256, downloading where allowed."""
    if not may_download and not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"data folder {folder} {what}; pass --data-dir (or set "
                        f"{ENV_VAR}) to a folder holding the four Fashion-MNIST .gz files")
    for name, expected in FILES.items():
        path = folder / name
        if not path.exists():
            if not may_download:
                raise DataError(f"{path} is missing; put the official Fashion-MNIST file "
                                f"{name} there (from {MIRROR}{name})")
            download(name, folder, base_url)
        elif (actual := readable_sha256(path)) != expected:
            raise DataError(f"{path} has sha256 {actual}, expected {expected}; the file is "
                            f"damaged or not the official one: replace it with {MIRROR}{name}")


def readable_sha256(path: Path) -> str:
    """`sha256(path)`; DataError, in one line, for a folder or an unreadable file."""
    if path.is_dir():
        raise DataError(f"{path} is a folder, expected the Fashion-MNIST file {path.name}; "
                        f"replace it with {MIRROR}{path.name}")
    try:
        return sha256(path)
    except OSError as error:
        raise DataError(f"cannot read {path} ({error.strerror}); make it readable, or pass "
                        f"--data-dir to another copy") from None


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Array from a gzipped IDX file of unsigned bytes (magic 0x00000801 for labels,
    0x00000803 for images)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a readable gzip file ({error}); replace it with "
                        f"{MIRROR}{path.name}") from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != expected_ndim:
        raise DataError(f"{path} has IDX magic {data[:4].hex() or 'none'}, expected "
                        f"0000080{expected_ndim} (unsigned bytes, {expected_ndim} dimensions)")
    header = 4 + 4 * expected_ndim
    if len(data) < header:
        raise DataError(f"{path} ends inside its IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_ndim))
    if len(data) - header != int(np.prod(shape)):
        raise DataError(f"{path} holds {len(data) - header} bytes of data but its header "
                        f"declares shape {shape} ({int(np.prod(shape))} bytes)")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_idx_split(folder: Path, split: str) -> Split:
    image_file, label_file = SPLIT_FILES[split]
    images = read_idx(folder / image_file, 3)
    labels = read_idx(folder / label_file, 1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{folder / image_file} holds images of {images.shape[1:]}, "
                        f"expected 28×28")
    if len(images) != len(labels):
        raise DataError(f"{folder / image_file} holds {len(images)} images but "
                        f"{folder / label_file} {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{folder / label_file} has label {labels.max()}, expected 0..9")
    return Split(images[..., None], labels.astype(np.int32))


def read_tfds_split(folder: Path, split: str) -> Split:
    """The same split through tensorflow-datasets, which reads the official files from
    `folder` as its manual_dir (no network) and prepares its records in the cache (the
    data folder may be read-only). tfds shuffles: same examples, another order."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DataError('--data-source tfds needs tensorflow-datasets: '
                        'pip install -e ".[tfds]"') from error
    tfds.disable_progress_bar()
    builder = tfds.builder("fashion_mnist", data_dir=str(default_cache_dir().parent / "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(folder)))
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return Split(arrays["image"].astype(np.uint8), arrays["label"].astype(np.int32))


def load(config: DataConfig) -> dict[str, Split]:
    """{"train": Split, "test": Split} from the configured source."""
    if config.source not in SOURCES:
        raise DataError(f"unknown data source {config.source!r}; choose one of {SOURCES}")
    folder, is_cache = resolve_data_dir(config.data_dir)
    ensure_files(folder, may_download=is_cache and config.download)
    reader = read_idx_split if config.source == "idx" else read_tfds_split
    return {split: reader(folder, split) for split in SPLIT_FILES}
