"""Running a model without training it: metrics, features, and the validations `fit` calls after each epoch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from models.training import FitResult, Validate


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval() (BatchNorm statistics, no Dropout) for the block, then in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.inference_mode()
def classification_metrics(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> tuple[float, float, torch.Tensor]:
    """(mean cross-entropy, accuracy, predicted classes) of `model` in eval mode."""
    with evaluating(model):
        logits = torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])
    loss = nn.functional.cross_entropy(logits, targets).item()
    predictions = logits.argmax(dim=1)
    return loss, (predictions == targets).float().mean().item(), predictions


@torch.inference_mode()
def reconstruction_error(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> float:
    """Mean squared error of `model.reconstruct` on `inputs`, in eval mode."""
    total = torch.zeros((), device=inputs.device)
    with evaluating(model):
        for i in range(0, len(inputs), batch_size):
            batch = inputs[i : i + batch_size]
            total += nn.functional.mse_loss(model.reconstruct(batch), batch, reduction="sum")
    return (total / inputs.numel()).item()


@torch.no_grad()  # not inference_mode: the features are inputs of a later backward pass
def encode(encoder: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Features of a frozen encoder in eval mode, computed once: (N, ...) -> (N, features)."""
    with evaluating(encoder):
        return torch.cat([encoder(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def classification_validator(inputs: torch.Tensor, targets: torch.Tensor) -> Validate:
    """`validate` for the supervised phases: loss/val and acc/val of the model on (inputs, targets)."""

    def validate(model: nn.Module) -> dict[str, float]:
        loss, accuracy, _ = classification_metrics(model, inputs, targets, batch_size=1024)
        return {"loss/val": loss, "acc/val": accuracy}

    return validate


def best_val_acc(result: FitResult, validate: Validate, model: nn.Module) -> float:
    """The best epoch's acc/val; with no epochs (`epochs: 0`), the model's as it is."""
    if not result.history:
        return validate(model)["acc/val"]
    return max(stats.val["acc/val"] for stats in result.history)


def first_block_maps(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
    """What the encoder's first convolution outputs for `images` (B, C, H, W): its (B, channels, h, w) feature
    maps, after the activation when one follows; None for an encoder without convolutions (an MLP)."""
    modules = list(encoder.modules())
    first = next((index for index, module in enumerate(modules) if isinstance(module, nn.Conv2d)), None)
    if first is None:
        return None
    after = next((m for m in modules[first + 1:first + 3] if isinstance(m, nn.ReLU | nn.GELU | nn.LeakyReLU)),
                 modules[first])
    captured: list[torch.Tensor] = []
    handle = after.register_forward_hook(lambda module, inputs, output: captured.append(output.detach()))
    try:
        with evaluating(encoder), torch.inference_mode():
            encoder(images)
    finally:
        handle.remove()
    return captured[0].float().cpu()
