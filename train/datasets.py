"""The data sets a run trains on, by name: Fashion-MNIST from its four files (train.data),
any image-classification data set of tensorflow-datasets prepared in a folder, or a folder
of images with one sub-folder per class ("folder:PATH").

Each split is a random-access source: `len(source)` examples, `source.read(indices)` →
(images (n, H, W, C) uint8, labels (n,) int32). The on-device input path reads a split
whole (`materialize`); the streaming path (train.stream) reads it batch by batch.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from train import data
from train.data import DataError, Split

FOLDER_PREFIX = "folder:"
# torchvision's ImageNet statistics, which its released weights expect (pixels in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_EXAMPLES = 10_000  # training images the per-channel mean and std are measured on
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
HOLD_OUT_EVERY = 10  # a folder without train/ and test/: every 10th image is a test image


class Source(Protocol):
    """A split read at random: what both input paths take."""

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, H, W, C) uint8, labels (n,) int32) of the examples `indices`."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a data set is, from its metadata: its name, the shape its images are read in
    (H, W, C), its classes."""

    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.image_shape[-1]


@dataclasses.dataclass(frozen=True)
class Dataset:
    info: DatasetInfo
    splits: dict[str, Source]  # "train", and "test": the data set's test (or validation) split


FASHION_MNIST = DatasetInfo("fashion_mnist", (data.IMAGE_SIZE, data.IMAGE_SIZE, 1),
                            data.CLASS_NAMES)


@dataclasses.dataclass(frozen=True)
class Rows:
    """Examples start..stop of another source (a validation hold-out, --limit-train)."""

    source: Source
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.source.read(np.asarray(indices) + self.start)


def rows(source: Source, start: int, stop: int) -> Source:
    """Examples start..stop of `source`: a Split's arrays sliced, any other source viewed."""
    if isinstance(source, Split):
        return Split(source.images[start:stop], source.labels[start:stop])
    return Rows(source, start, stop)


def split_for_validation(train: Source, validation: int) -> tuple[Source, Source]:
    """(training, validation) splits: the last `validation` training examples held out.
    ValueError, in one line, if that leaves nothing to train on."""
    if not 0 <= validation < len(train):
        raise ValueError(f"--validation {validation} must lie in 0..{len(train) - 1}: the "
                         f"training split has {len(train)} examples")
    keep = len(train) - validation
    return rows(train, 0, keep), rows(train, keep, len(train))


def materialize(source: Source, chunk: int = 4096) -> Split:
    """The whole split in host memory, as the on-device input path places it."""
    if isinstance(source, Split):
        return source
    parts = [source.read(np.arange(start, min(start + chunk, len(source))))
             for start in range(0, len(source), chunk)]
    return Split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def channel_stats(source: Source, examples: int = STATS_EXAMPLES) -> tuple[tuple, tuple]:
    """(mean, std) per channel of pixels in [0, 1], over up to `examples` training images
    spread evenly over the split (always the same ones)."""
    indices = np.unique(np.linspace(0, len(source) - 1, min(examples, len(source))).astype(int))
    images = materialize(_Indexed(source, indices)).images
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return (tuple(round(float(v), 6) for v in pixels.mean(0)),
            tuple(round(max(float(v), 1e-6), 6) for v in pixels.std(0)))


@dataclasses.dataclass(frozen=True)
class _Indexed:
    source: Source
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.source.read(self.indices[np.asarray(indices)])


def imagenet_stats(channels: int) -> tuple[tuple, tuple]:
    """torchvision's ImageNet mean and std; for grey images, their means over R, G, B."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return ((round(float(np.mean(IMAGENET_MEAN)), 6),) * channels,
            (round(float(np.mean(IMAGENET_STD)), 6),) * channels)


def open_dataset(config: data.DataConfig, resize: int) -> Dataset:
    """The data set `config.dataset` names, its splits ready to read; images of varying
    size (image folders, some tfds data sets) are read resized to `resize` × `resize`.
    DataError, in one line, for a name, folder or data set that cannot be read."""
    name = config.dataset
    if name.startswith(FOLDER_PREFIX):
        return open_folder(Path(name[len(FOLDER_PREFIX):]).expanduser(), resize)
    if name == "fashion_mnist" and config.source == "idx":
        return Dataset(FASHION_MNIST, data.load(config))
    if name == "fashion_mnist" and config.data_dir and _idx_folder(Path(config.data_dir)):
        # --data-source tfds over the four files: tfds prepares them (train.data)
        return Dataset(FASHION_MNIST, data.load(config))
    return open_tfds(name, config.data_dir, resize, download=config.download)


def describe(config: data.DataConfig) -> str:
    """"Fashion-MNIST (idx)", "cifar10 (tensorflow-datasets)", "folder:PATH"."""
    if config.dataset == "fashion_mnist":
        return f"Fashion-MNIST ({config.source})"
    if config.dataset.startswith(FOLDER_PREFIX):
        return config.dataset
    return f"{config.dataset} (tensorflow-datasets)"


def class_names(config: data.DataConfig, num_classes: int) -> tuple[str, ...]:
    """The names of a run's classes: its data set's, or numbers for a network with another
    number of outputs."""
    if len(config.class_names) == num_classes:
        return config.class_names
    return tuple(config.class_names) + tuple(str(i) for i in range(len(config.class_names),
                                                                   num_classes))


def _idx_folder(folder: Path) -> bool:
    return all((folder / name).exists() for name in data.FILES)


# ---------------------------------------------------------------- tensorflow-datasets


def tfds_data_dir(data_dir: str | None) -> str:
    """Where tensorflow-datasets data sets are prepared: --data-dir, else $TFDS_DATA_DIR,
    else tfds's own default (~/tensorflow_datasets)."""
    return str(Path(data_dir or os.environ.get("TFDS_DATA_DIR")
                    or Path.home() / "tensorflow_datasets").expanduser())


def open_tfds(name: str, data_dir: str | None, resize: int, download: bool = False) -> Dataset:
    """A tensorflow-datasets image-classification data set prepared in `data_dir`, read
    through its random-access source (ArrayRecord files), or whole where it was prepared as
    TFRecord files. Nothing is downloaded unless `download`."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f'--dataset {name} needs tensorflow-datasets: pip install -e ".[tfds]"'
                        ) from None
    tfds.disable_progress_bar()
    folder = tfds_data_dir(data_dir)
    try:
        builder = tfds.builder(name, data_dir=folder)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"--dataset {name}: tensorflow-datasets has no data set of that name; "
                        f"see `tfds.list_builders()`, or pass folder:PATH for a folder of "
                        f"images") from None
    except Exception as error:  # noqa: BLE001 (a malformed name or version)
        raise DataError(f"--dataset {name}: {str(error).splitlines()[0]}") from None
    image_key, label_key = _supervised_keys(builder, name)
    if download:
        builder.download_and_prepare()
    splits = _split_names(builder, name, folder)
    try:
        sources = {ours: tfds.data_source(name, split=theirs, data_dir=folder, download=False)
                   for ours, theirs in splits.items()}
    except Exception as error:  # noqa: BLE001 (not prepared, or prepared as TFRecord)
        if not _prepared(builder):
            raise DataError(f"--dataset {name} is not prepared in {folder}; prepare it once "
                            f"with `tfds build {name} --data_dir {folder} --file_format "
                            f"array_record` (or pass --download), or pass --data-dir where it "
                            f"is") from None
        if "TFRECORD" not in str(error).upper():
            raise DataError(f"--dataset {name} in {folder} cannot be read "
                            f"({str(error).splitlines()[0]})") from None
        sources = {ours: _tfrecord_split(builder, theirs, image_key, label_key)
                   for ours, theirs in splits.items()}
    shape = builder.info.features[image_key].shape
    fixed = None not in shape[:2]
    image_shape = (*(shape[:2] if fixed else (resize, resize)), shape[2] or 3)
    label = builder.info.features[label_key]
    names = tuple(label.names) if getattr(label, "names", None) else tuple(
        str(i) for i in range(label.num_classes))
    info = DatasetInfo(name, tuple(int(d) for d in image_shape), names)
    return Dataset(info, {ours: source if isinstance(source, Split) else
                          TfdsSource(source, image_key, label_key, None if fixed else resize)
                          for ours, source in sources.items()})


def _supervised_keys(builder, name: str) -> tuple[str, str]:
    keys = builder.info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        image_key, label_key = "image", "label"
    features = builder.info.features
    if image_key not in features or label_key not in features or not hasattr(
            features[label_key], "num_classes") or len(features[image_key].shape or ()) != 3:
        raise DataError(f"--dataset {name} is not an image-classification data set (it has no "
                        f"image and class label features); choose one that is, e.g. cifar10")
    return image_key, label_key


def _split_names(builder, name: str, folder: str) -> dict[str, str]:
    """{"train": ..., "test": the data set's test split, else its validation split}."""
    available = list(builder.info.splits.keys()) if builder.info.splits else []
    if not available:  # not prepared (or mocked): tfds's usual names
        return {"train": "train", "test": "test"}
    test = next((s for s in ("test", "validation") if s in available), None)
    if "train" not in available or test is None:
        raise DataError(f"--dataset {name} in {folder} has splits {', '.join(available)}; a "
                        f"run needs train and test (or validation)")
    return {"train": "train", "test": test}


def _prepared(builder) -> bool:
    try:
        return bool(builder.is_prepared())
    except Exception:  # noqa: BLE001
        return False


def _tfrecord_split(builder, split: str, image_key: str, label_key: str) -> Split:
    """A split prepared as TFRecord files (tfds's default format), read whole: such files
    cannot be read at random, so only the on-device path takes them."""
    import tensorflow_datasets as tfds

    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return Split(np.asarray(arrays[image_key], np.uint8), np.asarray(arrays[label_key], np.int32))


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A tfds random-access source's (image, label) examples; images of varying size
    resized to `size` × `size` as they are read."""

    source: object
    image_key: str
    label_key: str
    size: int | None = None

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = [int(i) for i in indices]
        try:
            records = self.source.__getitems__(keys)  # one batched read of ArrayRecord files
        except TypeError:  # sources without batched reads (tfds's mock data)
            records = [self.source[key] for key in keys]
        images = [np.asarray(r[self.image_key], np.uint8) for r in records]
        if self.size is not None:
            images = [resized(image, self.size) for image in images]
        labels = np.asarray([r[self.label_key] for r in records], np.int32)
        return np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8), labels


def resized(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 → (size, size, C), bilinear and antialiased (Pillow's)."""
    from PIL import Image

    if image.shape[:2] == (size, size):
        return image
    channels = image.shape[-1]
    picture = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(picture.resize((size, size), Image.BILINEAR))
    return out.reshape(size, size, channels)


# ---------------------------------------------------------------- image folders


def open_folder(folder: Path, resize: int) -> Dataset:
    """A folder with one sub-folder per class (class names: the sub-folders' names, in
    order), optionally below train/ and test/ (or val/); without them, every
    HOLD_OUT_EVERY-th image of each class (in name order) is a test image. Images: any
    size, grey or colour (the run is grey only if every image is), read resized to
    `resize` × `resize`. DataError, in one line, naming an empty folder, a single class or
    the files that are not images Pillow can read."""
    label = f"--dataset folder:{folder}"
    if not folder.is_dir():
        raise DataError(f"{label}: {'not a folder' if folder.exists() else 'no such folder'}; "
                        f"pass a folder holding one sub-folder of images per class")
    test_name = next((n for n in ("test", "val", "validation") if (folder / n).is_dir()), None)
    if (folder / "train").is_dir() and test_name:
        train_files = _class_files(folder / "train", label + "/train")
        classes = tuple(sorted(train_files))
        test_files = _class_files(folder / test_name, f"{label}/{test_name}")
        unknown = sorted(set(test_files) - set(classes))
        if unknown:
            raise DataError(f"{label}: {test_name}/ has classes that train/ lacks "
                            f"({', '.join(unknown[:5])}); give every class training images")
    else:
        every = _class_files(folder, label)
        classes = tuple(sorted(every))
        train_files = {c: [f for i, f in enumerate(fs) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
                       for c, fs in every.items()}
        test_files = {c: fs[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY] for c, fs in every.items()}
    if len(classes) < 2:
        raise DataError(f"{label} holds one class ({classes[0]}); a classifier needs at least "
                        f"two sub-folders of images")
    modes = _check_images(folder, [f for fs in (*train_files.values(), *test_files.values())
                                   for f in fs], label)
    channels = 1 if modes <= set(GREY_MODES) else 3
    info = DatasetInfo(f"{FOLDER_PREFIX}{folder}", (resize, resize, channels), classes)
    return Dataset(info, {split: FolderSource(*_listing(files, classes), resize, channels)
                          for split, files in (("train", train_files), ("test", test_files))})


def _class_files(folder: Path, label: str) -> dict[str, list[Path]]:
    """{class: its image files in name order}; DataError, in one line, if there are none."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*") if p.is_file() and
                       p.suffix.lower() in IMAGE_SUFFIXES and
                       not any(part.startswith(".") for part in p.relative_to(sub).parts))
        if files:
            classes[sub.name] = files
    if not classes:
        loose = any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
        raise DataError(f"{label} holds no class sub-folders with images"
                        f"{' (its images lie loose in it)' if loose else ''}; put each class's "
                        f"images in a sub-folder named after the class")
    return classes


def _check_images(root: Path, files: list[Path], label: str) -> set[str]:
    """The colour modes of `files`, read from their headers; DataError, in one line,
    naming those Pillow cannot read."""
    from PIL import Image, UnidentifiedImageError

    modes, bad = set(), []
    for path in files:
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            bad.append(f"{path.relative_to(root)} ({str(error).splitlines()[0]})")
    if bad:
        raise DataError(f"{label}: {len(bad)} file{'s' if len(bad) > 1 else ''} cannot be read "
                        f"as an image: {'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}; "
                        f"remove or replace {'them' if len(bad) > 1 else 'it'}")
    return modes


def _listing(files: dict[str, list[Path]], classes: tuple[str, ...]
             ) -> tuple[tuple[Path, ...], np.ndarray]:
    pairs = [(path, classes.index(c)) for c in sorted(files) for path in files[c]]
    return tuple(p for p, _ in pairs), np.asarray([y for _, y in pairs], np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class FolderSource:
    """Image files and their labels, each decoded, converted to `channels` and resized
    to `size` × `size` as it is read."""

    files: tuple[Path, ...]
    labels: np.ndarray
    size: int
    channels: int

    def __len__(self) -> int:
        return len(self.files)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        images = np.zeros((len(indices), self.size, self.size, self.channels), np.uint8)
        for row, i in enumerate(indices):
            images[row] = self.image(self.files[i])
        return images, self.labels[indices]

    def image(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as picture:
                picture = picture.convert("L" if self.channels == 1 else "RGB")
                picture = picture.resize((self.size, self.size), Image.BILINEAR)
                return np.asarray(picture).reshape(self.size, self.size, self.channels)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"{path} cannot be read as an image "
                            f"({str(error).splitlines()[0]}); remove or replace it, then "
                            f"continue with --resume") from None
