"""Seconds per training epoch: the reference tutorial's loop against ours, and against the hardware bound.

One process, one run, the same data (Fashion-MNIST when a local copy exists, else MNIST-shaped IDX files
written here), the reference experiment's MLP (784-256-128 encoder, mirrored decoder, 128-64-10 head):

  (a) the tutorial's loop: torchvision dataset, DataLoader(batch_size=32, shuffle=True), per-sample
      ToTensor() + Normalize((0.5,), (0.5,));
  (b) our `fit` at batch 32: tensors in memory, batches by index; the head trains on features the
      frozen encoder computed once (as our head phase does);
  (c) our `fit` at --batch-size (default: configs/fashion_mnist.yaml's);
  (d) the bound: the epoch's FLOPs (forward, and backward for trained layers) at the matmul rate
      measured in this process.

Usage: python benchmarks/speed.py [--batch-size N] [--limit N] [--data DIR]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.loader import load_config  # noqa: E402
from configs.schema import AugmentConfig, ModelConfig, TrainConfig  # noqa: E402
from models.networks import build_model  # noqa: E402
from models.objectives import classification_loss, reconstruction_loss  # noqa: E402
from models.training import encode, fit, freeze  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
REFERENCE = ModelConfig(kind="mlp", encoder_widths=[256, 128], head_widths=[64], activation="relu")


def prepare_root(data: Path | None, root: Path) -> str:
    """Fill `root/FashionMNIST/raw` with decompressed IDX files; returns where they came from."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    source = data or (FASHION if FASHION.exists() else None)
    for name in FILES + ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        if source is not None:
            with gzip.open(source / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if source is not None:
        return f"Fashion-MNIST from {source}"
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 60_000), ("t10k", 10_000)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, count) + labels.tobytes())
    return "MNIST-shaped random IDX files (no local Fashion-MNIST)"


def tutorial_epochs(root: Path, limit: int) -> dict[str, float]:
    """(a): the reference tutorial's loop, one epoch per phase."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = datasets.FashionMNIST(str(root), train=True, download=False, transform=transform)
    dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128))
    decoder = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 784))
    head = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    seconds = {}

    def epoch(phase, parameters, step):
        optimizer = torch.optim.Adam(parameters, lr=1e-3)
        started = time.perf_counter()
        for images, labels in loader:
            optimizer.zero_grad()
            step(images.view(-1, 784), labels).backward()
            optimizer.step()
        seconds[phase] = time.perf_counter() - started

    epoch("pretrain", [*encoder.parameters(), *decoder.parameters()], lambda x, y: F.mse_loss(decoder(encoder(x)), x))

    def frozen_encoder_step(x, y):
        with torch.no_grad():
            features = encoder(x)
        return F.cross_entropy(head(features), y)

    epoch("head", head.parameters(), frozen_encoder_step)
    epoch("finetune", [*encoder.parameters(), *head.parameters()], lambda x, y: F.cross_entropy(head(encoder(x)), y))
    return seconds


def our_epochs(root: Path, limit: int, batch_size: int) -> dict[str, float]:
    """(b) and (c): our `fit`, one epoch per phase, on in-memory tensors normalised as (a)."""
    from torchvision import datasets

    raw = datasets.FashionMNIST(str(root), train=True, download=False)
    images = ((raw.data[:limit].float() / 255 - 0.5) / 0.5).unsqueeze(1)  # (N, 1, 28, 28)
    labels = raw.targets[:limit]
    torch.manual_seed(0)
    model = build_model(REFERENCE, (1, 28, 28), 10)
    config = TrainConfig(epochs=1, batch_size=batch_size)
    no_validation = lambda m: {"val/loss": 0.0}  # noqa: E731 - (a) validates nothing either
    seconds = {}

    def epoch(phase, trained, groups, loss_fn, data):
        started = time.perf_counter()
        fit(trained, groups, loss_fn, data, no_validation, config, lambda stats: None, torch.Generator().manual_seed(0))
        seconds[phase] = time.perf_counter() - started

    autoencoder = [{"params": [*model.encoder.parameters(), *model.decoder.parameters()]}]
    warm_up = (images[:512], labels[:512])  # first calls pay one-off setup (kernels, allocator): not an epoch's cost
    epoch("pretrain", model, autoencoder, reconstruction_loss(AugmentConfig()), warm_up)
    epoch("pretrain", model, autoencoder, reconstruction_loss(AugmentConfig()), (images, labels))
    freeze(model.encoder)
    started = time.perf_counter()
    features = encode(model.encoder, images, 4096)
    encoding = time.perf_counter() - started
    epoch("head", model.head, [{"params": list(model.head.parameters())}], classification_loss(), (features, labels))
    seconds["head"] += encoding
    model.encoder.requires_grad_(True)
    finetune = [{"params": [*model.encoder.parameters(), *model.head.parameters()]}]
    epoch("finetune", model, finetune, classification_loss(), (images, labels))
    return seconds


def matmul_flops_per_second() -> float:
    """float32 matmul throughput of this process's torch, in FLOP/s (best of 5)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - started) / 10)
    return 2 * 1024**3 / best


def epoch_flops(count: int) -> dict[str, float]:
    """(d)'s numerator: 2 FLOPs per multiply-add forward; backward twice that for trained layers."""

    def flops(layers, trained):
        forward = sum(2 * count * i * o for i, o in layers)
        return forward * (3 if trained else 1)

    encoder, decoder, head = [(784, 256), (256, 128)], [(128, 256), (256, 784)], [(128, 64), (64, 10)]
    return {
        "pretrain": flops(encoder + decoder, True),
        "head": flops(encoder, False) + flops(head, True),  # the encoder runs once, forward only
        "finetune": flops(encoder + head, True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_batch = load_config(REPO / "configs" / "fashion_mnist.yaml").pretrain.batch_size
    parser.add_argument("--batch-size", type=int, default=default_batch, help="(c)'s batch size")
    parser.add_argument("--limit", type=int, default=60_000, help="training images per epoch")
    parser.add_argument("--data", type=Path, help="a folder of Fashion-MNIST's .gz IDX files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        source = prepare_root(args.data, root)
        count = min(args.limit, 60_000)
        print(f"{source}; {count} training images per epoch; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        tutorial = tutorial_epochs(root, count)
        ours_32 = our_epochs(root, count, 32)
        ours = our_epochs(root, count, args.batch_size)
    rate = matmul_flops_per_second()
    bound = {phase: flops / rate for phase, flops in epoch_flops(count).items()}
    print(f"matmul rate {rate / 1e9:.1f} GFLOP/s")
    print(f"{'phase':<9} {'(a) tutorial':>13} {'(b) ours@32':>12} {f'(c) ours@{args.batch_size}':>13} "
          f"{'(d) bound':>10} {'a/b':>6} {'a/c':>6} {'c/d':>6}")
    for phase in ("pretrain", "head", "finetune"):
        a, b, c, d = tutorial[phase], ours_32[phase], ours[phase], bound[phase]
        print(f"{phase:<9} {a:>12.3f}s {b:>11.3f}s {c:>12.3f}s {d:>9.3f}s {a / b:>6.1f} {a / c:>6.1f} {c / d:>6.1f}")


if __name__ == "__main__":
    main()
