"""Seconds per training epoch: the reference tutorial's loop against ours, and against the hardware bound.

One process, one run, the same data (Fashion-MNIST when a local copy exists, else MNIST-shaped IDX files
written here), on the CPU it prints (model, the instruction sets that matter, torch's kernel level):

  (a) the tutorial's loop: torchvision dataset, DataLoader(batch_size=32, shuffle=True), per-sample
      ToTensor() + Normalize((0.5,), (0.5,)), the reference MLP (784-256-128 encoder, 128-64-10 head), float32;
  (b) our `fit` with the same MLP at batch 32, float32: tensors in memory, batches by index; the head
      trains on features the frozen encoder computed once (as our head phase does);
  (c) our `fit` with CONFIG's settings (default configs/fashion_mnist.yaml): its network, each phase's batch
      size and loss, and `amp` as `twostage run` resolves it on this machine (the line above the table);
  (d) the bound for (c): its epoch's FLOPs (torch's FlopCounterMode on one batch, times the batches) at the
      matmul rate measured here in (c)'s precision.

To see a CPU without bfloat16 units on one that has them, limit torch's kernels to AVX2:
ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/speed.py

Usage: python benchmarks/speed.py [-c CONFIG] [--set KEY=VALUE ...] [--limit N] [--data DIR]
"""

from __future__ import annotations

import argparse
import gzip
import os
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
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.loader import load_config  # noqa: E402
from configs.schema import ModelConfig, PipelineConfig, TrainConfig  # noqa: E402
from models.device import cpu_summary, resolve_amp  # noqa: E402
from models.evaluation import encode  # noqa: E402
from models.networks import build_model  # noqa: E402
from models.objectives import OBJECTIVES, classification_loss  # noqa: E402
from models.training import fit  # noqa: E402
from tasks.finetune import param_groups  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
REFERENCE = ModelConfig(kind="mlp", encoder_widths=[256, 128], head_widths=[64], activation="relu")
PHASES = ("pretrain", "head", "finetune")


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


class Phase:
    """One phase's epoch as our pipeline trains it: the trained module, its parameter groups, loss, batch size."""

    def __init__(self, trained: nn.Module, groups: list[dict], loss, config: TrainConfig, encoder: nn.Module | None = None):
        self.trained, self.groups, self.loss, self.config = trained, groups, loss, config
        self.encoder = encoder  # the frozen encoder whose features are computed once (head phase), else None

    def epoch(self, images: torch.Tensor, labels: torch.Tensor, amp: bool) -> float:
        started = time.perf_counter()
        if self.encoder is not None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                images = encode(self.encoder, images, 4096).float()
        config = self.config.model_copy(update={"epochs": 1})
        fit(self.trained, self.groups, self.loss, (images, labels), lambda m: {"loss/val": 0.0}, config,
            lambda stats: None, torch.Generator().manual_seed(0), amp=amp)
        return time.perf_counter() - started

    def flops(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """FLOPs of one epoch: one batch's forward and backward under FlopCounterMode, times the batches."""
        batch = self.config.batch_size
        counted = 0.0
        if self.encoder is not None:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                features = self.encoder(images[:batch])
            counted += counter.get_total_flops()
        else:
            features = images[:batch]
        with FlopCounterMode(display=False) as counter:
            self.loss(self.trained, features, labels[:batch]).backward()
        self.trained.zero_grad(set_to_none=True)
        return (counted + counter.get_total_flops()) * len(images) / batch


def config_phases(config: PipelineConfig, input_shape: tuple[int, int, int], classes: int) -> dict[str, Phase]:
    """(c)'s phases, set up as tasks/pretrain.py, head.py and finetune.py set them up."""
    torch.manual_seed(0)
    model = build_model(config.model, input_shape, classes)
    stage1 = OBJECTIVES[config.pretrain.objective].setup(model, config.pretrain)
    head_loss = classification_loss(label_smoothing=config.head.label_smoothing)
    finetune_loss = classification_loss(augment=config.finetune.augment, label_smoothing=config.finetune.label_smoothing)
    return {
        "pretrain": Phase(stage1.trained, [{"params": stage1.parameters}], stage1.loss, config.pretrain),
        "head": Phase(model.head, [{"params": list(model.head.parameters())}], head_loss, config.head, model.encoder),
        "finetune": Phase(model, param_groups(model, config.finetune), finetune_loss, config.finetune),
    }


def config_epochs(images: torch.Tensor, labels: torch.Tensor, config: PipelineConfig, amp: bool):
    """(c) seconds per phase, and (d)'s FLOPs. Each phase first trains on 1,024 images: first calls pay one-off
    setup (kernels, allocator), which is not an epoch's cost."""
    phases = config_phases(config, tuple(images.shape[1:]), 10)
    seconds, flops = {}, {}
    for name, phase in phases.items():
        phase.epoch(images[:1024], labels[:1024], amp)
        seconds[name] = phase.epoch(images, labels, amp)
        flops[name] = phase.flops(images, labels)
    return seconds, flops


def reference_epochs(images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """(b): the reference MLP at batch 32, float32."""
    reference = PipelineConfig(
        model=REFERENCE,
        pretrain={"batch_size": 32}, head={"batch_size": 32}, finetune={"batch_size": 32, "encoder_lr_ratio": 1.0},
    )
    return config_epochs(images, labels, reference, amp=False)[0]


def matmul_flops_per_second(dtype: torch.dtype) -> float:
    """Matmul throughput in `dtype` of this process's torch, in FLOP/s (best of 5)."""
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - started) / 10)
    return 2 * 1024**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/fashion_mnist.yaml", help="(c)'s config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--limit", type=int, default=60_000, help="training images per epoch")
    parser.add_argument("--data", type=Path, help="a folder of Fashion-MNIST's .gz IDX files")
    args = parser.parse_args()
    config = load_config(args.config if Path(args.config).exists() else REPO / args.config, args.overrides)
    amp = resolve_amp(config.amp, "cpu")
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        source = prepare_root(args.data, root)
        count = min(args.limit, 60_000)
        print(f"{source}; {count} training images per epoch; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
        print(cpu_summary() + (f", oneDNN limited to {limit}" if limit else ""))
        print(f"(c) = {' '.join([args.config, *args.overrides])}: {amp.message}")
        from torchvision import datasets

        raw = datasets.FashionMNIST(str(root), train=True, download=False)
        images = ((raw.data[:count].float() / 255 - 0.5) / 0.5).unsqueeze(1)  # (N, 1, 28, 28), normalised as (a)
        labels = raw.targets[:count]
        tutorial = tutorial_epochs(root, count)
        ours_32 = reference_epochs(images, labels)
        ours, flops = config_epochs(images, labels, config, amp.enabled)
    dtype = torch.bfloat16 if amp.enabled else torch.float32
    rate = matmul_flops_per_second(dtype)
    print(f"matmul rate {rate / 1e9:.1f} GFLOP/s in {str(dtype).removeprefix('torch.')}")
    batches = "/".join(str(getattr(config, phase).batch_size) for phase in PHASES)
    print(f"{'phase':<9} {'(a) tutorial':>13} {'(b) ours@32':>12} {'(c) config':>11} {'(d) bound':>10} "
          f"{'a/b':>6} {'a/c':>6} {'c/d':>6}   (c)'s batch sizes {batches}")
    for phase in PHASES:
        a, b, c, d = tutorial[phase], ours_32[phase], ours[phase], flops[phase] / rate
        print(f"{phase:<9} {a:>12.4f}s {b:>11.4f}s {c:>10.4f}s {d:>9.4f}s {a / b:>6.1f} {a / c:>6.1f} {c / d:>6.1f}")


if __name__ == "__main__":
    main()
