"""Loss functions for `fit`, the stage-1 objectives (OBJECTIVES), and batched tensor augmentation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from configs.schema import AugmentConfig, PretrainConfig
from models.evaluation import evaluating, reconstruction_error
from models.networks import TwoStageModel, projection_head
from models.training import LossFn


def reconstruction_loss(augment: AugmentConfig, noise_std: float = 0.0, mask_fraction: float = 0.0) -> LossFn:
    """Stage 1 (autoencoder, denoising): MSE between the decoder's output and the (augmented) input.

    With `noise_std` or `mask_fraction` > 0 the encoder sees a corrupted copy (Gaussian noise; that share
    of pixels zeroed, i.e. set to the mean) and the target stays clean: a denoising autoencoder. Unlike the
    tutorial's `MSE(features, features.detach())`, which is identically zero, this loss depends on every
    encoder weight through the decoder.
    """

    def loss(model: nn.Module, images: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
        clean = augment_batch(images, augment) if augment.enabled else images
        # The noise drawn at its std and added in place: the same values as clean + std * randn_like(clean),
        # in half the time on an AVX2 CPU (0.26 s against 0.56 s per Fashion-MNIST epoch at batch 256).
        seen = torch.empty_like(clean).normal_(0.0, noise_std).add_(clean) if noise_std else clean
        if mask_fraction:
            seen = seen * (torch.rand_like(seen) >= mask_fraction)
        return F.mse_loss(model.reconstruct(seen), clean)

    return loss


def contrastive_loss(augment: AugmentConfig, temperature: float) -> LossFn:
    """Stage 1 (contrastive): NT-Xent between the projections of two augmentations of each image.

    `model` maps images to projections (an encoder followed by a projection head).
    """

    def loss(model: nn.Module, images: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
        views = torch.cat([augment_batch(images, augment), augment_batch(images, augment)])  # (2B, C, H, W)
        return nt_xent(model(views), temperature)

    return loss


def nt_xent(projections: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for (2B, D) projections whose rows i and i + B are two views of one image."""
    z = F.normalize(projections, dim=1)
    similarity = z @ z.T / temperature  # (2B, 2B)
    count = len(z)
    similarity = similarity.masked_fill(torch.eye(count, dtype=torch.bool, device=z.device), float("-inf"))
    partner = (torch.arange(count, device=z.device) + count // 2) % count
    return F.cross_entropy(similarity, partner)


def classification_loss(
    class_weights: torch.Tensor | None = None, augment: AugmentConfig | None = None, label_smoothing: float = 0.0
) -> LossFn:
    """Stages 2 and 3: cross-entropy of the model's logits, optionally class-weighted and label-smoothed, on
    optionally augmented images (the training batches only: validation does not go through the loss)."""

    def loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if augment is not None and augment.enabled:
            inputs = augment_batch(inputs, augment)
        return F.cross_entropy(model(inputs), targets, weight=class_weights, label_smoothing=label_smoothing)

    return loss


def inverse_frequency_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Weights that make each class contribute equally to the loss (mean weight 1 over samples)."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return len(labels) / (num_classes * counts)


def augment_batch(images: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """Random rotation, scale, translation, horizontal flip and noise, drawn per image, all on-device.

    images: (B, C, H, W), normalised; borders are filled by replicating the edge pixels.
    """
    batch = images.shape[0]
    device = images.device

    def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1)
        return torch.rand(*shape, device=device) * 2 - 1

    if config.rotation_deg or config.scale_delta or config.translate_fraction:
        angle = uniform(batch) * math.radians(config.rotation_deg)
        scale = 1 + uniform(batch) * config.scale_delta
        shift = uniform(batch, 2) * config.translate_fraction * 2  # grid coordinates span [-1, 1]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1
        )  # (B, 2, 3)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    if config.hflip:
        flip = torch.rand(batch, device=device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if config.noise_std:
        images = images + config.noise_std * torch.randn_like(images)
    return images


# ----------------------------------------------------------------------------------- stage-1 objectives


@dataclass
class Stage1:
    """What one stage-1 objective trains: a module sharing the model's encoder, its parameters, and its loss."""

    trained: nn.Module
    parameters: list[nn.Parameter]
    loss: LossFn
    validation_loss: Callable[[torch.Tensor], float]  # validation images -> the objective's loss/val


@dataclass(frozen=True)
class Objective:
    """A row of OBJECTIVES: how to set stage 1 up, the metric the pipeline reports, whether a decoder learns."""

    headline: str  # the final loss/val under this name on the parent run, e.g. "pretrain/recon_loss"
    reconstructs: bool  # the decoder learns to reconstruct: worth a figure of inputs and reconstructions
    setup: Callable[[TwoStageModel, PretrainConfig], Stage1]


def _reconstruction(noise_std: float, mask_fraction: float, model: TwoStageModel, config: PretrainConfig) -> Stage1:
    """Encoder and decoder reconstruct the input; validated by the clean reconstruction error."""
    return Stage1(
        trained=model,
        parameters=[*model.encoder.parameters(), *model.decoder.parameters()],
        loss=reconstruction_loss(config.augment, noise_std, mask_fraction),
        validation_loss=lambda images: reconstruction_error(model, images, batch_size=1024),
    )


def _contrastive(model: TwoStageModel, config: PretrainConfig) -> Stage1:
    """The encoder and a projection head (dropped afterwards) pull two augmentations of an image together."""
    device = next(model.parameters()).device
    trained = nn.Sequential(model.encoder, projection_head(model.feature_size, config.projection_dim).to(device))
    loss = contrastive_loss(config.augment, config.temperature)
    devices = [device.index or 0] if device.type == "cuda" else []

    @torch.no_grad()
    def validation_loss(images: torch.Tensor, batch_size: int = 512) -> float:
        """The same augmentations on every validation (seed 0), without disturbing training's random stream."""
        with torch.random.fork_rng(devices=devices), evaluating(trained):
            torch.manual_seed(0)
            losses = [loss(trained, images[i : i + batch_size], None) for i in range(0, len(images), batch_size)]
        return torch.stack(losses).mean().item()

    return Stage1(trained, list(trained.parameters()), loss, validation_loss)


OBJECTIVES: dict[str, Objective] = {
    "autoencoder": Objective("pretrain/recon_loss", True, lambda model, config: _reconstruction(0.0, 0.0, model, config)),
    "denoising": Objective(
        "pretrain/recon_loss", True,
        lambda model, config: _reconstruction(config.noise_std, config.mask_fraction, model, config),
    ),
    "contrastive": Objective("pretrain/contrastive_loss", False, _contrastive),
}
