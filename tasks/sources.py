"""Where raw data sets come from: SOURCES maps each `data.dataset` to a loader of uint8 images, labels and class names.

The torchvision sets are looked for, in order, in torchvision's folder under `data.root`; in a local directory of
their original archives (`data.mirror`, then the system copy Debian's packages install); then in torchvision's
download, which verifies the archives' checksums. Adding a data set is one entry in SOURCES.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from configs.errors import UserError
from configs.schema import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataNotFoundError(UserError):
    """The data set is nowhere to be found: the message names the places looked and the fix."""


class DownloadFailedError(DataNotFoundError):
    """The download was tried and failed: worth the data task's retries, unlike the other input errors."""


@dataclass
class RawData:
    train_images: torch.Tensor  # (N, C, H, W) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor | None  # None: no official test split
    test_labels: torch.Tensor | None
    class_names: list[str]
    source: str


def load_raw(config: DataConfig) -> RawData:
    return SOURCES[config.dataset](config)


def load_digits(config: DataConfig) -> RawData:
    from sklearn.datasets import load_digits

    digits = load_digits()  # bundled with scikit-learn: 1,797 real 8x8 digits, pixel values 0..16
    images = torch.from_numpy(np.round(digits.images * 255 / 16).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return RawData(images, labels, None, None, [str(name) for name in digits.target_names], "scikit-learn (bundled)")


def copy_idx_files(dataset_class, mirror: Path, root: Path) -> bool:
    """MNIST-style sets: decompress the mirror's IDX files into torchvision's raw folder; True when all were there.

    torchvision's existence check looks for the decompressed files. Debian's package re-compressed the archives
    (their md5s differ), but the decompressed bytes are the originals.
    """
    names = [Path(url_name).name.removesuffix(".gz") for url_name, _md5 in dataset_class.resources]
    found = {name: next((c for c in (mirror / name, mirror / f"{name}.gz") if c.exists()), None) for name in names}
    if None in found.values():
        return False
    raw_folder = root / dataset_class.__name__ / "raw"
    raw_folder.mkdir(parents=True, exist_ok=True)
    for name, source in found.items():
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, open(raw_folder / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return True


def extract_archive(dataset_class, mirror: Path, root: Path) -> bool:
    """CIFAR-style sets: extract the mirror's original archive, whose md5 torchvision knows; True when it was there."""
    from torchvision.datasets.utils import check_integrity, extract_archive

    archive = mirror / dataset_class.filename
    if not check_integrity(str(archive), dataset_class.tgz_md5):  # missing, or not the original archive
        return False
    extract_archive(str(archive), str(root))
    return True


@dataclass(frozen=True)
class TorchvisionSet:
    """A torchvision data set: its class's name, how a mirror's archives become its files, where systems keep it."""

    class_name: str
    from_mirror: Callable[[type, Path, Path], bool]
    system_mirrors: tuple[Path, ...] = ()
    install_hint: str = ""

    def __call__(self, config: DataConfig) -> RawData:
        from torchvision import datasets

        dataset_class = getattr(datasets, self.class_name)
        root = Path(config.root) / "torchvision"
        looked, source = [str(root)], f"local copy {root}"
        loaded = _open(dataset_class, root, download=False)
        for mirror in [m for m in (config.mirror, *self.system_mirrors) if m is not None] if loaded is None else []:
            looked.append(str(mirror))
            if self.from_mirror(dataset_class, Path(mirror), root):
                loaded, source = _open(dataset_class, root, download=False), f"mirror {mirror}"
                break
        error_type, failure = DataNotFoundError, "download disabled (data.download: false)"
        if loaded is None and config.download:
            try:
                loaded = _open(dataset_class, root, download=True, raise_errors=True)
                source = "download (checksums verified)"
            except Exception as error:  # noqa: BLE001 - any network or checksum failure ends in the message below
                error_type, failure = DownloadFailedError, f"download failed: {str(error).splitlines()[0]}"
        if loaded is None:
            raise error_type(
                f"data set {config.dataset} not found in {', '.join(looked)}; {failure}. Fix: {self.install_hint}"
                "set data.mirror to a directory with its original archives, or go online with data.download: true"
            )
        train, test = loaded
        return RawData(*_as_tensors(train), *_as_tensors(test), list(train.classes), source)


def _open(dataset_class, root: Path, download: bool, raise_errors: bool = False):
    try:
        return dataset_class(root, train=True, download=download), dataset_class(root, train=False, download=download)
    except RuntimeError:
        if raise_errors:
            raise
        return None


def _as_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(dataset.data)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64)


def image_files(folder: Path) -> list[tuple[Path, str]]:
    """(file, class folder name) of every image in `folder`'s class folders, sorted (torchvision's own walk)."""
    from torchvision.datasets.folder import find_classes, make_dataset

    classes, class_to_index = find_classes(folder)
    files = make_dataset(folder, class_to_index, extensions=IMAGE_SUFFIXES, allow_empty=True)
    return [(Path(path), classes[index]) for path, index in files]


def load_image_folder(config: DataConfig) -> RawData:
    folder = Path(config.image_folder)
    if not folder.is_dir():
        raise DataNotFoundError(f"data.image_folder {folder} is not a directory; fix: point it at a folder of class folders")
    try:
        files = image_files(folder)
    except FileNotFoundError:  # no class folders at all
        files = []
    class_names = sorted({label for _, label in files})
    if len(class_names) < 2:
        raise DataNotFoundError(
            f"data.image_folder {folder} holds images of {len(class_names)} class folder(s); "
            "fix: put each class's images in a subfolder named for the class (at least two)"
        )
    images, unreadable, size = [], [], config.image_size or 32
    for path, _ in files:
        try:
            images.append(read_image(path, config.channels or 3, size, size))
        except DataNotFoundError as error:
            unreadable.append(str(error).split("; fix:")[0])
    if unreadable:
        raise DataNotFoundError(
            f"data.image_folder {folder}: {len(unreadable)} of {len(files)} images are unreadable: "
            f"{'; '.join(unreadable)}; fix: remove or replace them"
        )
    labels = [class_names.index(label) for _, label in files]
    return RawData(
        torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), None, None, class_names,
        f"image folder {folder}",
    )


def read_image(path: Path, channels: int, height: int, width: int) -> np.ndarray:
    """An image file as uint8 pixels (C, H, W): converted to grayscale or RGB, resized bilinearly.

    16- and 32-bit integer images are scaled to 8 bits (not clipped at 255); an image that would decode to more
    pixels than Pillow's decompression-bomb limit is refused.

    Raises:
        DataNotFoundError: the file is missing, not an image, or a decompression bomb; the message names it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = _eight_bits(image).convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except Image.DecompressionBombError as error:
        raise DataNotFoundError(f"{path}: refused, a decompression bomb ({error}); fix: remove or replace it") from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise DataNotFoundError(f"{path}: not a readable image ({reason}); fix: remove or replace it") from None
    return pixels.reshape(height, width, channels).transpose(2, 0, 1)


def _eight_bits(image):
    """A 16- or 32-bit integer grayscale image as 8-bit "L", its range scaled (Pillow's own conversion clips at 255)."""
    from PIL import Image

    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return image
    values = np.asarray(image).astype(np.float64)
    full_scale = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2.0**32 - 1
    return Image.fromarray(np.clip(np.round(values * 255 / full_scale), 0, 255).astype(np.uint8), mode="L")


FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist

SOURCES: dict[str, Callable[[DataConfig], RawData]] = {
    "digits": load_digits,
    "mnist": TorchvisionSet("MNIST", copy_idx_files),
    "fashion_mnist": TorchvisionSet("FashionMNIST", copy_idx_files, (FASHION_MNIST_DEBIAN,),
                                    "apt-get install dataset-fashion-mnist, "),
    "kmnist": TorchvisionSet("KMNIST", copy_idx_files),
    "cifar10": TorchvisionSet("CIFAR10", extract_archive),
    "image_folder": load_image_folder,
}
