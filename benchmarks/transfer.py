"""Seconds per finetuning epoch of a torchvision backbone against our `cnn` encoder, at image sizes 32 and 64, on
this machine (the CPU it prints, `amp` as `twostage run` resolves it here).

Each encoder trains end to end through `fit` (finetune's parameter groups, a linear head, batch 64) on --images
Fashion-MNIST training images (a local copy; else random images of that shape), resized to each size; grayscale
goes into the backbones as 3 repeated channels, as in the pipeline. Prints the median over --rounds epochs, the
time per 1,000 images, and each encoder's ratio to `cnn` at the same size. `benchmarks/results.py --parts transfer`
puts the same table in RESULTS.md.

Usage: python benchmarks/transfer.py [--images 2048] [--rounds 3] [--backbones resnet18 mobilenet_v3_small]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.loader import load_config  # noqa: E402
from configs.schema import ModelConfig  # noqa: E402
from models.device import cpu_summary, resolve_amp  # noqa: E402
from models.networks import build_model  # noqa: E402
from models.objectives import classification_loss  # noqa: E402
from models.training import fit  # noqa: E402
from tasks.finetune import param_groups  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def images(count: int) -> tuple[torch.Tensor, str]:
    if FASHION.exists():
        import gzip

        import numpy as np

        raw = np.frombuffer(gzip.open(FASHION).read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:count]
        return torch.tensor(raw, dtype=torch.float32) / 255, f"Fashion-MNIST ({FASHION.parent})"
    return torch.rand(count, 1, 28, 28), "random images of Fashion-MNIST's shape"


def measure(count: int, rounds: int, backbones: list[str], say=print) -> dict:
    """Seconds per finetuning epoch of `cnn` and each backbone at sizes 32 and 64; `say` gets each row's line."""
    base = load_config(REPO / "configs" / "transfer_resnet18.yaml", ["finetune.batch_size=64", "finetune.epochs=1"])
    amp = resolve_amp(base.amp, "cpu")
    pixels, source = images(count)
    labels = torch.randint(0, 10, (len(pixels),))
    cnn = load_config(REPO / "configs" / "fashion_mnist_cnn.yaml").model
    encoders = {"cnn": cnn, **{name: ModelConfig(kind="backbone", backbone=name, head_widths=[]) for name in backbones}}
    made = {"machine": f"{cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {amp.message}",
            "images": f"{len(pixels)} images of {source}", "rounds": rounds, "rows": []}
    say(made["machine"])
    say(f"finetuning epoch on {made['images']}, batch 64, median of {rounds}:")
    loss = classification_loss(None, base.finetune.augment, base.finetune.label_smoothing)
    for size in (32, 64):
        resized = F.interpolate(pixels, size=(size, size), mode="bilinear")
        seconds = {}
        for name, config in encoders.items():
            torch.manual_seed(0)
            model = build_model(config, (1, size, size), 10)
            times = []
            for _ in range(rounds + 1):  # the first epoch warms the kernels up
                started = time.perf_counter()
                fit(model, param_groups(model, base.finetune), loss, (resized, labels), lambda m: {"loss/val": 0.0},
                    base.finetune, lambda stats: None, torch.Generator().manual_seed(0), amp=amp.enabled)
                times.append(time.perf_counter() - started)
            seconds[name] = statistics.median(times[1:])
            row = {"size": size, "encoder": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                   "seconds": seconds[name], "per_1000": 1000 * seconds[name] / len(pixels),
                   "ratio": seconds[name] / seconds["cnn"]}
            made["rows"].append(row)
            say(f"  {size}x{size} {name:<20} {row['params_m']:6.2f} M params  {row['seconds']:7.2f} s/epoch  "
                f"{row['per_1000']:6.3f} s per 1,000 images  x{row['ratio']:.1f}")
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    args = parser.parse_args(argv)
    measure(args.images, args.rounds, args.backbones)
    return 0


if __name__ == "__main__":
    sys.exit(main())
