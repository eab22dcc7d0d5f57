"""What a phase's progress display costs the training loop: `fit` with no progress, with the plain periodic lines,
and with the live rich line on a (virtual) terminal, in one process, alternating, on the same data.

The work is the quickstart's finetune phase (digits, its MLP, batch 64, about 21 steps an epoch of ~0.3 ms each
here): the smallest steps we ship, so the largest share a per-step callback can take. Prints each variant's median
seconds per epoch over --rounds rounds and its ratio to no progress.

Usage: python benchmarks/progress.py [--rounds 7] [--epochs 40]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.loader import load_config  # noqa: E402
from models.device import cpu_summary  # noqa: E402
from models.networks import build_model  # noqa: E402
from models.objectives import classification_loss  # noqa: E402
from models.training import fit  # noqa: E402
from tasks.finetune import param_groups  # noqa: E402
from tasks.progress import PhaseProgress  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    os.environ["TWOSTAGE_PROGRESS_EVERY_S"] = "10"
    logging.basicConfig(level=logging.INFO, stream=io.StringIO())  # the plain lines are formatted, not shown

    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    config = load_config(REPO / "configs" / "quickstart.yaml", [f"finetune.epochs={args.epochs}"])
    loss = classification_loss(None, config.finetune.augment, config.finetune.label_smoothing)

    def epoch_seconds(progress: str) -> float:
        torch.manual_seed(0)
        model = build_model(config.model, (1, 8, 8), 10)
        console = Console(file=io.StringIO(), force_terminal=True, width=160) if progress == "live line" else None
        display = None if progress == "none" else PhaseProgress(
            "finetune", args.epochs, 1, logging.getLogger("phase"), console=console)
        started = time.perf_counter()
        fit(model, param_groups(model, config.finetune), loss, (images, labels), lambda m: {"loss/val": 0.0},
            config.finetune, lambda stats: display and display.epoch(stats.epoch, "line", "metrics"),
            torch.Generator().manual_seed(0), on_batch=display.batch if display else None)
        seconds = (time.perf_counter() - started) / args.epochs
        if display:
            display.close(finished=True)
        return seconds

    variants = ["none", "plain lines", "live line"]
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    epoch_seconds("none")  # warm-up
    for _ in range(args.rounds):
        for variant in variants:
            times[variant].append(epoch_seconds(variant))
    print(f"{cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"quickstart finetune on digits ({len(images)} images, batch {config.finetune.batch_size}), "
          f"{args.epochs} epochs x {args.rounds} rounds, median seconds per epoch:")
    base = statistics.median(times["none"])
    for variant in variants:
        median = statistics.median(times[variant])
        print(f"  {variant:<12} {median * 1000:7.2f} ms   x{median / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
