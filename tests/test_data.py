"""Data: real loading code on tiny IDX archives and PNG folders, deterministic stratified splits, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from configs.schema import DataConfig
from conftest import tiny_mnist
from tasks.data import label_subset, load_splits, prepare, stratified_subset
from tasks.sources import DataNotFoundError


def test_digits_splits_are_deterministic_stratified_and_disjoint(tmp_path):
    config = DataConfig(dataset="digits", root=tmp_path, val_fraction=0.1, test_fraction=0.2)
    bundle = prepare(config)
    assert bundle.source == "scikit-learn (bundled)"
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    assert sum(bundle.sizes[k] for k in ("train", "val", "test")) == 1797
    assert bundle.sizes["test"] == pytest.approx(0.2 * 1797, abs=10)
    splits = load_splits(bundle, "cpu")
    for labels in (splits.train_y, splits.val_y, splits.test_y):
        assert set(labels.tolist()) == set(range(10))  # every class in every split
    again = prepare(DataConfig(dataset="digits", root=tmp_path / "other"))
    assert again.fingerprint == bundle.fingerprint
    assert torch.equal(load_splits(again, "cpu").val_x, splits.val_x)
    assert prepare(DataConfig(dataset="digits", root=tmp_path, split_seed=1)).fingerprint != bundle.fingerprint


def test_training_split_is_normalised_to_zero_mean_unit_std(tmp_path):
    splits = load_splits(prepare(DataConfig(dataset="digits", root=tmp_path)), "cpu")
    assert splits.train_x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert splits.train_x.std().item() == pytest.approx(1.0, abs=1e-2)


def test_a_built_in_data_set_is_resized_to_image_size_and_repeated_to_three_channels(tmp_path):
    own = load_splits(prepare(DataConfig(dataset="digits", root=tmp_path)), "cpu")
    bundle = prepare(DataConfig(dataset="digits", root=tmp_path, image_size=16, channels=3))
    assert bundle.input_shape == (3, 16, 16)
    splits = load_splits(bundle, "cpu")
    assert torch.equal(splits.train_x[:, 0], splits.train_x[:, 2])  # grayscale repeated: one image in each channel
    assert torch.equal(splits.train_y, own.train_y)  # the same splits, only the pixels' shape differs
    resized = torch.nn.functional.interpolate(own.train_x[:4], size=(16, 16), mode="bilinear")
    assert torch.corrcoef(torch.stack([resized.flatten(), splits.train_x[:4, :1].flatten()]))[0, 1] > 0.95


def test_rgb_images_become_grayscale_as_pillow_converts_them():
    from tasks.data import conform
    from tasks.sources import RawData

    rgb = torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = RawData(rgb, torch.zeros(4, dtype=torch.int64), None, None, ["a"], "test")
    gray = conform(raw, DataConfig(dataset="cifar10", channels=1)).train_images
    pillow = [np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).convert("L")) for image in rgb]
    assert gray.shape == (4, 1, 256, 256) and np.array_equal(gray[:, 0].numpy(), np.stack(pillow))  # 262,144 pixels


def test_label_fraction_keeps_a_stratified_subset_and_pretraining_keeps_every_image(tmp_path):
    bundle = prepare(DataConfig(dataset="digits", root=tmp_path, label_fraction=0.1))
    labeled = label_subset(bundle, 0.1)
    splits = load_splits(bundle, "cpu")
    assert labeled.count == pytest.approx(0.1 * bundle.sizes["train"], abs=10)
    assert len(splits.train_x) == bundle.sizes["train"]
    chosen = splits.labeled_indices(0.1)
    counts = torch.bincount(splits.train_y[chosen], minlength=10)
    assert counts.min() >= 10 and counts.max() <= 15
    images, labels = splits.labeled(labeled)
    assert torch.equal(images, splits.train_x[chosen]) and torch.equal(labels, splits.train_y[chosen])


def test_with_every_label_the_labeled_training_set_is_the_training_tensors_themselves(tmp_path):
    bundle = prepare(DataConfig(dataset="digits", root=tmp_path))
    splits = load_splits(bundle, "cpu")
    images, labels = splits.labeled(label_subset(bundle, 1.0))
    assert images is splits.train_x and labels is splits.train_y  # no 54,000-image copy per phase


def test_every_data_set_the_config_accepts_has_a_source():
    from typing import get_args

    from configs.schema import DatasetName
    from tasks.sources import SOURCES

    assert set(SOURCES) == set(get_args(DatasetName))


def test_one_prepared_file_serves_every_share_of_the_labels(tmp_path):
    shares = [prepare(DataConfig(dataset="digits", root=tmp_path, label_fraction=f)) for f in (0.1, 1.0)]
    assert shares[0].path == shares[1].path and shares[0].fingerprint == shares[1].fingerprint
    assert label_subset(shares[0], 0.1).fingerprint != label_subset(shares[0], 1.0).fingerprint


def test_stratified_subset_takes_at_least_one_of_each_class():
    labels = torch.tensor([0] * 50 + [1] * 3)
    chosen = stratified_subset(labels, 0.01, torch.Generator().manual_seed(0))
    assert sorted(labels[chosen].tolist()) == [0, 1]


def test_second_prepare_comes_from_the_cache(tmp_path):
    config = DataConfig(dataset="digits", root=tmp_path)
    first = prepare(config)
    second = prepare(config)
    assert second.source.startswith("cache ") and second.path == first.path
    assert second.fingerprint == first.fingerprint


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_loads_offline_from_a_mirror_of_idx_archives(tmp_path, compress):
    tiny_mnist(tmp_path / "mirror", train=200, test=50, compress=compress)
    config = DataConfig(dataset="mnist", root=tmp_path / "data", mirror=tmp_path / "mirror", download=False)
    bundle = prepare(config)
    assert bundle.source == f"mirror {tmp_path / 'mirror'}"
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert bundle.sizes["test"] == 50 and bundle.sizes["train"] + bundle.sizes["val"] == 200
    splits = load_splits(bundle, "cpu")
    assert splits.test_x.shape == (50, 1, 28, 28)
    assert bundle.class_names[0] == "0 - zero"


def test_fashion_mnist_uses_the_torchvision_folder_once_it_is_filled(tmp_path):
    tiny_mnist(tmp_path / "mirror")
    root = tmp_path / "data"
    prepare(DataConfig(dataset="fashion_mnist", root=root, mirror=tmp_path / "mirror", download=False))
    # Another split of the same raw files needs no mirror: torchvision's folder under data.root has them.
    bundle = prepare(DataConfig(dataset="fashion_mnist", root=root, val_fraction=0.2, download=False))
    assert bundle.source == f"local copy {root / 'torchvision'}"
    assert bundle.class_names[0] == "T-shirt/top"


def test_missing_data_offline_names_the_data_set_the_places_and_the_fix(tmp_path):
    config = DataConfig(dataset="kmnist", root=tmp_path / "data", mirror=tmp_path / "empty", download=False)
    with pytest.raises(DataNotFoundError) as caught:
        prepare(config)
    message = str(caught.value)
    assert "kmnist not found" in message
    assert str(tmp_path / "data" / "torchvision") in message and str(tmp_path / "empty") in message
    assert "download disabled" in message and "Fix:" in message and "data.mirror" in message
    assert "\n" not in message


def write_png_folder(folder, per_class: int = 12, size: int = 10):
    rng = np.random.default_rng(0)
    for label, color in enumerate([(250, 20, 20), (20, 250, 20), (20, 20, 250)]):
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = np.clip(np.array(color) + rng.integers(-20, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"class_{label}" / f"{index}.png")


def test_image_folder_loads_class_per_folder_pngs_resized(tmp_path):
    write_png_folder(tmp_path / "images")
    config = DataConfig(dataset="image_folder", image_folder=tmp_path / "images", image_size=16, channels=3, root=tmp_path)
    bundle = prepare(config)
    assert bundle.class_names == ["class_0", "class_1", "class_2"]
    assert bundle.input_shape == (3, 16, 16)
    assert sum(bundle.sizes[k] for k in ("train", "val", "test")) == 36
    splits = load_splits(bundle, "cpu")
    red = splits.train_x[splits.train_y == 0].mean(dim=(0, 2, 3))
    assert red[0] > red[1] and red[0] > red[2]


def test_new_images_in_the_folder_invalidate_the_cache(tmp_path):
    write_png_folder(tmp_path / "images", per_class=6)
    config = DataConfig(dataset="image_folder", image_folder=tmp_path / "images", root=tmp_path)
    first = prepare(config)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "images" / "class_0" / "new.png")
    second = prepare(config)
    assert not second.source.startswith("cache") and second.fingerprint != first.fingerprint


def test_an_unreadable_image_is_named(tmp_path):
    write_png_folder(tmp_path / "images", per_class=3)
    (tmp_path / "images" / "class_1" / "broken.png").write_bytes(b"not a png")
    config = DataConfig(dataset="image_folder", image_folder=tmp_path / "images", root=tmp_path)
    with pytest.raises(DataNotFoundError, match="broken.png: not a readable image"):
        prepare(config)


def test_every_unreadable_image_of_a_folder_is_named_in_one_line(tmp_path):
    write_png_folder(tmp_path / "images", per_class=3)
    for name in ("a.png", "b.jpg"):
        (tmp_path / "images" / "class_1" / name).write_bytes(b"not an image")
    config = DataConfig(dataset="image_folder", image_folder=tmp_path / "images", root=tmp_path)
    with pytest.raises(DataNotFoundError) as caught:
        prepare(config)
    message = str(caught.value)
    assert "2 of 11 images are unreadable" in message and "a.png" in message and "b.jpg" in message
    assert "\n" not in message and message.endswith("fix: remove or replace them")


def test_a_16_bit_image_keeps_its_range_scaled_to_8_bits(tmp_path):
    from tasks.sources import read_image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63,000 of 65,535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = read_image(tmp_path / "ramp.png", channels=1, height=8, width=8)
    assert pixels.max() == round(63_000 * 255 / 65_535) and pixels[0, 0, 1] == round(1000 * 255 / 65_535)
    assert len(np.unique(pixels)) > 60  # not clipped to 255 from the first 256 values on


def test_a_decompression_bomb_is_refused_by_name(tmp_path):
    from tasks.sources import read_image

    Image.new("L", (13_500, 13_500)).save(tmp_path / "bomb.png")  # 177 kB, 182 million pixels decoded
    with pytest.raises(DataNotFoundError, match="bomb.png: refused, a decompression bomb"):
        read_image(tmp_path / "bomb.png", 1, 8, 8)


def test_the_phases_of_a_run_share_one_loaded_copy_of_the_splits(tmp_path):
    bundle = prepare(DataConfig(dataset="digits", root=tmp_path))
    first, second = load_splits(bundle, "cpu"), load_splits(bundle, "cpu")
    assert first.train_x is second.train_x
    assert first.train_x.dtype == torch.float32 and abs(first.train_x.mean().item()) < 0.05
