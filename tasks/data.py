"""Data phase: split and fingerprint the raw data set (tasks/sources.py), cache the prepared tensors, and choose
which training labels head and finetune may use.

The prepared file holds uint8 images, so it stays small; `load_splits` normalises them on the device. It does not
depend on `data.label_fraction`: the labeled subset is its own value (`LabeledSubset`), drawn from where the
split draws left the random generator, so one prepared file serves every share of the labels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from prefect import get_run_logger, task
from torch.nn import functional as F

from configs.errors import UserError
from configs.schema import DataConfig, fingerprint
from tasks import tracking
from tasks.files import torch_bytes, write_atomically
from tasks.results import DataBundle, LabeledSubset, RunContext
from tasks.sources import RawData, image_files, load_raw

NOT_CONTENT = {"root", "mirror", "download", "retries", "retry_delay_s", "label_fraction"}  # where, how, which labels


@dataclass
class Splits:
    """Normalised float tensors on one device, and the generator state the labeled subset is drawn with."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    label_draws: torch.Tensor  # torch.Generator state after the split draws

    def labeled_indices(self, fraction: float) -> torch.Tensor:
        """Sorted indices of a stratified `fraction` of the training examples (at least one per class)."""
        generator = torch.Generator().set_state(self.label_draws)
        return stratified_subset(self.train_y.cpu(), fraction, generator)

    def labeled(self, subset: LabeledSubset) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the labeled training examples; with every label used, the tensors themselves."""
        if subset.count == len(self.train_y):  # indexing would copy the whole training set
            return self.train_x, self.train_y
        index = self.labeled_indices(subset.fraction).to(self.train_y.device)
        return self.train_x[index], self.train_y[index]


@task(name="data")
def prepare_data(config: DataConfig, run: RunContext) -> tuple[DataBundle, LabeledSubset]:
    """Data phase: the prepared splits' file and fingerprint, and the labeled subset (runs every time: it notices
    fresh data)."""
    with tracking.phase_run(run, "data") as child:
        bundle = prepare(config, rebuild=run.rerun == "data", logger=get_run_logger())
        labeled = label_subset(bundle, config.label_fraction)
        bundle = bundle.model_copy(update={"seconds": time.perf_counter() - child.started})
        sizes = {**bundle.sizes, "labeled": labeled.count}
        child.log_params({"source": bundle.source, "fingerprint": labeled.fingerprint, **sizes})
        child.tag_parent({"twostage.data_fingerprint": labeled.fingerprint})
        shapes = {split: (bundle.sizes[split], *bundle.input_shape) for split in ("train", "val", "test")}
        child.log_datasets(shapes, name=config.dataset, digest=labeled.fingerprint, source=str(bundle.path))
        child.log_metrics({"time/data_s": bundle.seconds}, on_parent=True)
        get_run_logger().info(
            "data: %s from %s, %s; images %s, normalised with mean %s std %s", config.dataset, bundle.source,
            ", ".join(f"{k} {v}" for k, v in sizes.items()), "x".join(map(str, bundle.input_shape)),
            _rounded(bundle.mean), _rounded(bundle.std),
        )
        return bundle, labeled


def _rounded(values: list[float]) -> str:
    return "[" + ", ".join(f"{value:.3f}" for value in values) + "]"


def prepare(config: DataConfig, rebuild: bool = False, logger: logging.Logger | None = None) -> DataBundle:
    """Return the prepared splits for `config`, from the cache when it holds them (unless `rebuild`); an unreadable
    cache file is named in a warning and rebuilt."""
    key = fingerprint(_content_settings(config), _folder_listing(config))
    path = Path(config.root) / "prepared" / f"{config.dataset}-{key[:16]}.pt"
    if path.exists() and not rebuild:
        try:
            return _bundle(path, torch.load(path, weights_only=True), source=f"cache {path}")
        except Exception as error:  # noqa: BLE001 - truncated, corrupted, or not ours: any failure means rebuild
            (logger or logging.getLogger(__name__)).warning(
                "%s: unreadable prepared data (%s: %s); rebuilding it", path, type(error).__name__,
                str(error).strip().splitlines()[0][:200] if str(error).strip() else "",
            )
    raw = load_raw(config)
    saved = _split(conform(raw, config), config)
    write_atomically(str(path), torch_bytes(saved))
    return _bundle(path, saved, source=raw.source)


def conform(raw: RawData, config: DataConfig) -> RawData:
    """The raw images at `data.image_size` (bilinear, antialiased) with `data.channels` (RGB to Pillow's luma
    before resizing, grayscale repeated to RGB after it), where those are set and differ from the data set's own."""
    def conformed(images: torch.Tensor | None) -> torch.Tensor | None:
        if images is None:
            return None
        if config.channels == 1 and images.shape[1] == 3:  # Pillow's convert("L"), to the same integer
            luma = torch.tensor([19595, 38470, 7471], dtype=torch.int64).view(1, 3, 1, 1)
            images = ((images.long() * luma).sum(1, keepdim=True) + 0x8000).bitwise_right_shift(16).byte()
        if config.image_size and images.shape[2:] != (config.image_size, config.image_size):
            size = (config.image_size, config.image_size)
            pixels = images.shape[1] * max(images.shape[2] * images.shape[3], config.image_size**2)
            per_chunk = max(1, 2**24 // pixels)  # 64 MB of floats in and out at a time
            images = torch.cat([
                F.interpolate(chunk.float(), size=size, mode="bilinear", antialias=True).round_().clamp_(0, 255).byte()
                for chunk in images.split(per_chunk)
            ])
        if config.channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1).contiguous()
        return images

    return replace(raw, train_images=conformed(raw.train_images), test_images=conformed(raw.test_images))


def label_subset(bundle: DataBundle, fraction: float) -> LabeledSubset:
    """The stratified `fraction` of the bundle's training labels that head and finetune use."""
    count = len(load_splits(bundle, "cpu").labeled_indices(fraction))
    return LabeledSubset(fraction=fraction, count=count, fingerprint=fingerprint(bundle.fingerprint, fraction))


def _content_settings(config: DataConfig) -> str:
    """The settings that decide the prepared tensors; not where they are found, retries, or which labels are used."""
    return str(config.model_dump(mode="json", exclude=NOT_CONTENT))


def _folder_listing(config: DataConfig) -> list[str]:
    """For image_folder: names, sizes and times of the files, so fresh images invalidate the cache."""
    if config.dataset != "image_folder" or not Path(config.image_folder).is_dir():
        return []
    try:
        files = image_files(Path(config.image_folder))
    except FileNotFoundError:  # no class folders: loading says so
        return []
    return [f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path, _ in files]


def _bundle(path: Path, saved: dict, source: str) -> DataBundle:
    return DataBundle(
        path=path,
        fingerprint=saved["fingerprint"],
        dataset=saved["dataset"],
        source=source,
        class_names=saved["class_names"],
        input_shape=tuple(saved["train_images"].shape[1:]),
        mean=saved["mean"].tolist(),
        std=saved["std"].tolist(),
        sizes={split: len(saved[f"{split}_images"]) for split in ("train", "val", "test")},
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
        saved["label_draws"],
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
    if config.mean is None:
        scaled = train_images.float() / 255  # (N, C, H, W)
        mean, std = scaled.mean(dim=(0, 2, 3)), scaled.std(dim=(0, 2, 3)).clamp(min=1e-6)
    else:
        mean, std = torch.tensor(config.mean), torch.tensor(config.std)
        if len(mean) != images.shape[1]:
            raise UserError(
                f"data.mean has {len(mean)} values but {config.dataset} images have {images.shape[1]} channels"
            )
    digest = hashlib.sha256()
    for tensor in (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels):
        if tensor is not None:
            digest.update(tensor.contiguous().numpy().tobytes())
    digest.update(fingerprint(_content_settings(config)).encode())
    return {
        "dataset": config.dataset,
        "fingerprint": digest.hexdigest(),  # every image and label, and the split settings
        "class_names": raw.class_names,
        "train_images": train_images, "train_labels": train_labels,
        "val_images": images[val], "val_labels": labels[val],
        "test_images": test_images, "test_labels": test_labels,
        "label_draws": generator.get_state(),  # the labeled subset continues these draws
        "mean": mean.float(), "std": std.float(),
    }


def _complement(indices: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[indices] = False
    return keep.nonzero().flatten()
