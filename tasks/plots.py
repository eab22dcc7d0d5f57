"""Figures logged as MLflow artifacts (matplotlib's object API: no pyplot, no GUI backend)."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure


def reconstructions(inputs: torch.Tensor, outputs: torch.Tensor) -> Figure:
    """Inputs (top row) above their reconstructions (bottom row), 2 pixels apart; tensors (B, C, H, W), any scale."""
    from torchvision.utils import make_grid

    images = torch.cat([inputs, outputs.clamp(inputs.min(), inputs.max())]).detach().float().cpu()
    grid = make_grid(images, nrow=len(inputs), padding=2, normalize=True, value_range=(images.min().item(),
                     images.max().item()), pad_value=1.0)  # (3, rows, columns), white gaps
    figure = Figure(figsize=(1.2 * len(inputs), 2.6))
    axes = figure.add_axes((0, 0, 1, 0.9))
    axes.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    axes.set_axis_off()
    figure.suptitle("inputs (top), reconstructions (bottom)", fontsize=9)
    return figure


def feature_maps(images: torch.Tensor, maps: torch.Tensor, title: str, channels: int = 8) -> Figure:
    """What the network sees: each image (left) and its first `channels` feature maps of the first convolutional
    block, one row per image, each map scaled to its own range."""
    from torchvision.utils import make_grid

    maps = maps[:, :channels]
    size = maps.shape[-2:]
    shown = torch.nn.functional.interpolate(images.float().cpu().mean(1, keepdim=True), size=size, mode="bilinear")
    tiles = torch.cat([shown, maps], dim=1).flatten(0, 1).unsqueeze(1)  # (B * (1 + channels), 1, h, w)
    low = tiles.amin(dim=(1, 2, 3), keepdim=True)
    high = tiles.amax(dim=(1, 2, 3), keepdim=True)
    tiles = (tiles - low) / (high - low).clamp_min(1e-8)
    grid = make_grid(tiles, nrow=1 + maps.shape[1], padding=1, pad_value=1.0)
    figure = Figure(figsize=(1.1 * (1 + maps.shape[1]), 1.1 * len(maps) + 0.5))
    axes = figure.add_axes((0, 0, 1, 0.88))
    axes.imshow(grid[0].numpy(), cmap="gray", interpolation="nearest")
    axes.set_axis_off()
    figure.suptitle(title, fontsize=9)
    return figure


def confusion_matrix(matrix: np.ndarray, class_names: list[str]) -> Figure:
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.5 * len(class_names) + 2)
    figure = Figure(figsize=(size, size))  # fixed margins: a layout engine doubles the drawing time
    figure.subplots_adjust(left=0.2, bottom=0.2, right=0.95, top=0.92)
    axes = figure.subplots()
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(
        ax=axes, cmap="Blues", xticks_rotation=45, colorbar=True, text_kw={"fontsize": 7})
    axes.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
    return figure


def f1_bars(per_class: dict[str, dict[str, float]]) -> Figure:
    names = list(per_class)
    figure = Figure(figsize=(max(5.0, 0.5 * len(names) + 2), 3.5))
    figure.subplots_adjust(bottom=0.3, top=0.9)
    axes = figure.subplots()
    axes.bar(range(len(names)), [per_class[name]["f1"] for name in names], color="tab:blue")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set(ylim=(0, 1), ylabel="F1", title="test F1 per class")
    return figure


def feature_projection(features: torch.Tensor, labels: torch.Tensor, class_names: list[str], title: str) -> Figure:
    """The features' first two principal components, coloured by class."""
    from sklearn.decomposition import PCA

    points = PCA(n_components=2, svd_solver="full").fit_transform(features.float().cpu().numpy())
    labels = labels.cpu().numpy()
    figure = Figure(figsize=(6, 5))
    axes = figure.subplots()
    for index, name in enumerate(class_names):
        chosen = labels == index
        axes.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.7, label=name, color=_colour(index))
    axes.set(xlabel="PC 1", ylabel="PC 2", title=title)
    axes.legend(markerscale=3, fontsize=7, loc="best")
    return figure


def pipeline_curves(histories: dict[str, dict[str, list[tuple[int, float]]]]) -> Figure:
    """loss/train and loss/val of every training phase, one after another on one epoch axis.

    histories: {phase: {"loss/train": [(epoch, value), ...], "loss/val": [...]}} in phase order.
    """
    figure = Figure(figsize=(8, 4))
    axes = figure.subplots()
    offset = 0
    for index, (phase, metrics) in enumerate(histories.items()):
        for name, style, marker in (("loss/train", "-", "o"), ("loss/val", "--", "x")):
            points = metrics.get(name, [])
            axes.plot([offset + step for step, _ in points], [value for _, value in points], style,
                      marker=marker if len(points) == 1 else None,  # one epoch: a point, not an invisible line
                      color=_colour(index), label=f"{phase} {name}")
        last = max((step for points in metrics.values() for step, _ in points), default=0)
        offset += last
        axes.axvline(offset + 0.5, color="grey", linewidth=0.5)
    axes.set(xlabel="epoch (phases one after another)", ylabel="loss", title="training phases")
    if any(value > 0 for metrics in histories.values() for points in metrics.values() for _, value in points):
        axes.set_yscale("log")
        axes.legend(fontsize=7, ncol=3)
    else:  # every phase reused from another MLflow store, or trained for 0 epochs
        axes.text(0.5, 0.5, "no epochs logged in this MLflow store", ha="center", transform=axes.transAxes)
    return figure


def comparison(curves: dict[str, list[tuple[int, float]]], values: dict[str, float], metric: str,
               errors: dict[str, float] | None = None) -> Figure:
    """Left: validation accuracy per epoch of each run, overlaid; right: `metric` per run (± `errors`, when given:
    a std over seeds)."""
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2)
    for index, (run, points) in enumerate(curves.items()):
        left.plot([step for step, _ in points], [value for _, value in points], color=_colour(index), label=run)
    left.set(xlabel="epoch (head, then finetune)", ylabel="acc/val", title="validation accuracy")
    left.legend(fontsize=7)
    names = list(values)
    heights = [values[name] for name in names]
    spreads = [errors.get(name, 0.0) for name in names] if errors else None
    bars = right.bar(range(len(names)), heights, yerr=spreads, capsize=3 if errors else 0,
                     color=[_colour(i) for i in range(len(names))])
    right.bar_label(bars, fmt="%.4f", fontsize=7)
    low = min(h - (spreads[i] if spreads else 0) for i, h in enumerate(heights))
    high = max(h + (spreads[i] if spreads else 0) for i, h in enumerate(heights))
    pad = max(0.01, (high - low) * 0.5)  # zoomed in: runs often differ in the third digit
    right.set_ylim(low - pad, high + pad)
    right.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    right.set(ylabel=metric, title=metric)
    return figure


def _colour(index: int):
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)
