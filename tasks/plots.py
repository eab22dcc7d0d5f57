"""Figures logged as MLflow artifacts (matplotlib's object API: no pyplot, no GUI backend)."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from models.training import EpochStats


def loss_curves(history: list[EpochStats], title: str) -> Figure:
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    epochs = [stats.epoch for stats in history]
    axes.plot(epochs, [stats.train_loss for stats in history], marker="o", label="train/loss")
    axes.plot(epochs, [stats.val["val/loss"] for stats in history], marker="o", label="val/loss")
    if "val/acc" in history[0].val:
        twin = axes.twinx()
        twin.plot(epochs, [stats.val["val/acc"] for stats in history], color="tab:green", marker="s", label="val/acc")
        twin.set_ylabel("val/acc")
        twin.legend(loc="center right")
    axes.set(xlabel="epoch", ylabel="loss", title=title)
    axes.legend(loc="upper right")
    return figure


def reconstructions(inputs: torch.Tensor, outputs: torch.Tensor) -> Figure:
    """Inputs (top row) above their reconstructions (bottom row); tensors (B, C, H, W), any scale."""
    count = len(inputs)
    figure = Figure(figsize=(1.2 * count, 2.6), layout="constrained")
    grid = figure.subplots(2, count, squeeze=False)
    low, high = inputs.min().item(), inputs.max().item()
    for column in range(count):
        for row, images in enumerate((inputs, outputs)):
            picture = images[column].permute(1, 2, 0).clamp(low, high).cpu().numpy()
            picture = (picture - low) / max(high - low, 1e-8)
            axes = grid[row][column]
            axes.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
            axes.set_axis_off()
    grid[0][0].set_title("input", fontsize=8, loc="left")
    grid[1][0].set_title("reconstruction", fontsize=8, loc="left")
    return figure


def confusion_matrix(matrix: np.ndarray, class_names: list[str]) -> Figure:
    size = max(4.0, 0.5 * len(class_names) + 2)
    figure = Figure(figsize=(size, size), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
    threshold = matrix.max() / 2
    for true in ticks:
        for predicted in ticks:
            value = matrix[true, predicted]
            color = "white" if value > threshold else "black"
            axes.text(predicted, true, str(value), ha="center", va="center", fontsize=7, color=color)
    return figure
