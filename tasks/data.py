"""Data phase: find the raw data set, split and fingerprint it, and cache the prepared tensors.

Sources, in order: the cache of prepared tensors; a local directory of the original archives
(`data.mirror`, then the system copy Debian's packages install); torchvision's download, which verifies
the archives' checksums. The prepared file holds uint8 images, so it stays small; `load_splits`
normalises them on the device.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task

from configs.errors import ConfigError
from configs.schema import DataConfig, fingerprint
from tasks import tracking
from tasks.files import save_atomically
from tasks.results import DataBundle, RunContext

SYSTEM_MIRRORS = {"fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")]}
INSTALL_HINTS = {"fashion_mnist": "apt-get install dataset-fashion-mnist, "}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataNotFoundError(ConfigError):
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


@dataclass
class Splits:
    """Normalised float tensors on one device; `labeled` indexes the training labels stages 2-3 may use."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    labeled: torch.Tensor

    def labeled_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the labeled training examples; with every label used, the tensors themselves."""
        if len(self.labeled) == len(self.train_y):  # indexing would copy the whole training set
            return self.train_x, self.train_y
        return self.train_x[self.labeled], self.train_y[self.labeled]


@task(name="prepare_data")
def prepare_data(config: DataConfig, run: RunContext, rebuild: bool = False) -> DataBundle:
    """Data phase: the prepared splits' file and fingerprint (runs every time: it notices fresh data)."""
    with tracking.phase_run(run, "data") as child:
        bundle = prepare(config, rebuild=rebuild)
        bundle = bundle.model_copy(update={"seconds": time.perf_counter() - child.started})
        child.log_params({"source": bundle.source, "fingerprint": bundle.fingerprint, **bundle.sizes})
        child.tag_parent({"twostage.data_fingerprint": bundle.fingerprint})
        shapes = {split: (bundle.sizes[split], *bundle.input_shape) for split in ("train", "val", "test")}
        child.log_datasets(shapes, name=config.dataset, digest=bundle.fingerprint, source=str(bundle.path))
        child.log_metrics({"time/data_s": bundle.seconds}, on_parent=True)
        get_run_logger().info(
            "data: %s from %s, %s", config.dataset, bundle.source, ", ".join(f"{k} {v}" for k, v in bundle.sizes.items())
        )
        return bundle


def prepare(config: DataConfig, rebuild: bool = False) -> DataBundle:
    """Return the prepared splits for `config`, from the cache when it holds them (unless `rebuild`)."""
    key = fingerprint(_content_settings(config), _folder_listing(config))
    path = Path(config.root) / "prepared" / f"{config.dataset}-{key[:16]}.pt"
    if path.exists() and not rebuild:
        saved = torch.load(path, weights_only=True)
        return _bundle(path, saved, source=f"cache {path}")
    raw = load_raw(config)
    saved = _split(raw, config)
    save_atomically(saved, path)
    return _bundle(path, saved, source=raw.source)


def _content_settings(config: DataConfig) -> str:
    """The settings that decide the prepared tensors; not where they are found or how often to retry."""
    return str(config.model_dump(mode="json", exclude={"root", "mirror", "download", "retries", "retry_delay_s"}))


def _bundle(path: Path, saved: dict, source: str) -> DataBundle:
    return DataBundle(
        path=path,
        fingerprint=saved["fingerprint"],
        images_fingerprint=saved["images_fingerprint"],
        dataset=saved["dataset"],
        source=source,
        class_names=saved["class_names"],
        input_shape=tuple(saved["train_images"].shape[1:]),
        mean=saved["mean"].tolist(),
        std=saved["std"].tolist(),
        sizes={
            "train": len(saved["train_images"]),
            "val": len(saved["val_images"]),
            "test": len(saved["test_images"]),
            "labeled": len(saved["labeled"]),
        },
    )


def load_splits(bundle: DataBundle, device: torch.device | str) -> Splits:
    """The bundle's splits as normalised float32 tensors on `device`, loaded once for all phases of a run.

    The tensors are shared: every phase only reads them (batches, augmentations and features are copies).
    """
    return _load_splits(Path(bundle.path), bundle.fingerprint, str(device))


@functools.lru_cache(maxsize=1)  # one data set in memory: a run's phases share it, the next data set replaces it
def _load_splits(path: Path, fingerprint: str, device: str) -> Splits:
    saved = torch.load(path, weights_only=True)
    mean = saved["mean"].to(device).view(1, -1, 1, 1)
    std = saved["std"].to(device).view(1, -1, 1, 1)
    scale, shift = 1 / (255 * std), mean / std

    def images(name: str) -> torch.Tensor:  # (x / 255 - mean) / std, in place: one pass, one allocation
        return saved[f"{name}_images"].to(device).float().mul_(scale).sub_(shift)

    def labels(name: str) -> torch.Tensor:
        return saved[f"{name}_labels"].to(device)

    return Splits(
        images("train"), labels("train"), images("val"), labels("val"), images("test"), labels("test"),
        saved["labeled"].to(device),
    )


def stratified_subset(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of `fraction` of each class (at least one per class), drawn with `generator`."""
    chosen = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        chosen.append(members[: max(1, round(fraction * len(members)))])
    return torch.cat(chosen).sort().values


def _split(raw: RawData, config: DataConfig) -> dict:
    generator = torch.Generator().manual_seed(config.split_seed)
    images, labels = raw.train_images, raw.train_labels
    if raw.test_images is None:
        test = stratified_subset(labels, config.test_fraction, generator)
        rest = _complement(test, len(labels))
        test_images, test_labels = images[test], labels[test]
        images, labels = images[rest], labels[rest]
    else:
        test_images, test_labels = raw.test_images, raw.test_labels
    val = stratified_subset(labels, config.val_fraction, generator)
    train = _complement(val, len(labels))
    train_images, train_labels = images[train], labels[train]
    labeled = stratified_subset(train_labels, config.label_fraction, generator)
    if config.mean is None:
        scaled = train_images.float() / 255  # (N, C, H, W)
        mean, std = scaled.mean(dim=(0, 2, 3)), scaled.std(dim=(0, 2, 3)).clamp(min=1e-6)
    else:
        mean, std = torch.tensor(config.mean), torch.tensor(config.std)
        if len(mean) != images.shape[1]:
            raise ConfigError(
                f"data.mean has {len(mean)} values but {config.dataset} images have {images.shape[1]} channels"
            )
    digest = hashlib.sha256()
    for tensor in (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels):
        if tensor is not None:
            digest.update(tensor.contiguous().numpy().tobytes())
    digest.update(fingerprint(_content_settings(config.model_copy(update={"label_fraction": 1.0}))).encode())
    images_fingerprint = digest.hexdigest()  # what pretraining sees: every training image, no labels
    return {
        "dataset": config.dataset,
        "images_fingerprint": images_fingerprint,
        "fingerprint": fingerprint(images_fingerprint, config.label_fraction),
        "class_names": raw.class_names,
        "train_images": train_images, "train_labels": train_labels,
        "val_images": images[val], "val_labels": labels[val],
        "test_images": test_images, "test_labels": test_labels,
        "labeled": labeled,
        "mean": mean.float(), "std": std.float(),
    }


def _complement(indices: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[indices] = False
    return keep.nonzero().flatten()


# ----------------------------------------------------------------------------------- raw sources


def load_raw(config: DataConfig) -> RawData:
    if config.dataset == "digits":
        return _load_digits()
    if config.dataset == "image_folder":
        return _load_image_folder(config)
    return _load_torchvision(config)


def _load_digits() -> RawData:
    from sklearn.datasets import load_digits

    digits = load_digits()  # bundled with scikit-learn: 1,797 real 8x8 digits, pixel values 0..16
    images = torch.from_numpy(np.round(digits.images * 255 / 16).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return RawData(images, labels, None, None, [str(name) for name in digits.target_names], "scikit-learn (bundled)")


def _torchvision_class(dataset: str):
    from torchvision import datasets

    return {
        "mnist": datasets.MNIST,
        "fashion_mnist": datasets.FashionMNIST,
        "kmnist": datasets.KMNIST,
        "cifar10": datasets.CIFAR10,
    }[dataset]


def _load_torchvision(config: DataConfig) -> RawData:
    dataset_class = _torchvision_class(config.dataset)
    root = Path(config.root) / "torchvision"
    mirrors = [m for m in [config.mirror, *SYSTEM_MIRRORS.get(config.dataset, [])] if m is not None]
    looked = [str(root)]
    source = f"local copy {root}"
    loaded = _open_torchvision(dataset_class, root, download=False)
    for mirror in mirrors if loaded is None else []:
        looked.append(str(mirror))
        if _copy_from_mirror(dataset_class, Path(mirror), root):
            loaded = _open_torchvision(dataset_class, root, download=False)
            source = f"mirror {mirror}"
            break
    error_type, failure = DataNotFoundError, "download disabled (data.download: false)"
    if loaded is None and config.download:
        try:
            loaded = _open_torchvision(dataset_class, root, download=True, raise_errors=True)
            source = "download (checksums verified)"
        except Exception as error:  # noqa: BLE001 - any network or checksum failure ends in the message below
            error_type, failure = DownloadFailedError, f"download failed: {str(error).splitlines()[0]}"
    if loaded is None:
        hint = INSTALL_HINTS.get(config.dataset, "")
        raise error_type(
            f"data set {config.dataset} not found in {', '.join(looked)}; {failure}. "
            f"Fix: {hint}set data.mirror to a directory with its original archives, or go online with data.download: true"
        )
    train, test = loaded
    return RawData(*_as_tensors(train), *_as_tensors(test), list(train.classes), source)


def _open_torchvision(dataset_class, root: Path, download: bool, raise_errors: bool = False):
    try:
        return dataset_class(root, train=True, download=download), dataset_class(root, train=False, download=download)
    except RuntimeError:
        if raise_errors:
            raise
        return None


def _copy_from_mirror(dataset_class, mirror: Path, root: Path) -> bool:
    """Put the mirror's archives where torchvision looks; True when every file was there."""
    if dataset_class.__name__ == "CIFAR10":
        from torchvision.datasets.utils import check_integrity, extract_archive

        archive = mirror / dataset_class.filename
        if not check_integrity(str(archive), dataset_class.tgz_md5):  # missing, or not the original archive
            return False
        extract_archive(str(archive), str(root))
        return True
    # MNIST-style sets: torchvision's existence check looks for the decompressed IDX files. Debian's
    # package re-compressed the archives (their md5s differ), but the decompressed bytes are the originals.
    names = [Path(url_name).name.removesuffix(".gz") for url_name, _md5 in dataset_class.resources]
    found = {}
    for name in names:
        candidates = [mirror / name, mirror / f"{name}.gz"]
        found[name] = next((c for c in candidates if c.exists()), None)
    if None in found.values():
        return False
    raw_folder = root / dataset_class.__name__ / "raw"
    raw_folder.mkdir(parents=True, exist_ok=True)
    for name, source in found.items():
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, open(raw_folder / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return True


def _as_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(dataset.data)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64)


def _image_files(folder: Path) -> list[tuple[Path, str]]:
    return sorted(
        (path, class_dir.name)
        for class_dir in folder.iterdir() if class_dir.is_dir()
        for path in class_dir.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES
    )


def _folder_listing(config: DataConfig) -> list[str]:
    """For image_folder: names, sizes and times of the files, so fresh images invalidate the cache."""
    if config.dataset != "image_folder" or not Path(config.image_folder).is_dir():
        return []
    return [f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path, _ in _image_files(config.image_folder)]


def _load_image_folder(config: DataConfig) -> RawData:
    folder = Path(config.image_folder)
    if not folder.is_dir():
        raise DataNotFoundError(f"data.image_folder {folder} is not a directory; fix: point it at a folder of class folders")
    files = _image_files(folder)
    class_names = sorted({label for _, label in files})
    if len(class_names) < 2:
        raise DataNotFoundError(
            f"data.image_folder {folder} holds images of {len(class_names)} class folder(s); "
            "fix: put each class's images in a subfolder named for the class (at least two)"
        )
    images, labels = [], []
    for path, label in files:
        images.append(read_image(path, config.channels, config.image_size, config.image_size))
        labels.append(class_names.index(label))
    return RawData(
        torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), None, None, class_names,
        f"image folder {folder}",
    )


def read_image(path: Path, channels: int, height: int, width: int) -> np.ndarray:
    """An image file as uint8 pixels (C, H, W): converted to grayscale or RGB, resized bilinearly.

    Raises:
        DataNotFoundError: the file is missing or not an image; the message names it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise DataNotFoundError(f"{path}: not a readable image ({reason}); fix: remove or replace it") from None
    return pixels.reshape(height, width, channels).transpose(2, 0, 1)
