"""Encoder, decoder and head, built from a `ModelConfig` for images of shape (C, H, W)."""

from __future__ import annotations

import math

import torch
from torch import nn

from configs.errors import UserError
from configs.schema import ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


class TwoStageModel(nn.Module):
    """encoder -> features (feature_size of them) -> head (classification); encoder -> decoder (reconstruction)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, head: nn.Module, feature_size: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head
        self.feature_size = feature_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes) logits
        return self.head(self.encoder(images))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.decoder(self.encoder(images))

    def classifier(self) -> nn.Sequential:
        """The inference model (encoder then head) without the decoder, sharing these modules."""
        return nn.Sequential(self.encoder, self.head)


def build_model(config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> TwoStageModel:
    if config.kind == "backbone":
        encoder = Backbone(config.backbone)
        features, decoder = encoder.features(input_shape), nn.Sequential()  # no decoder: stage 1 is contrastive
    else:
        encoder, decoder = (_mlp_autoencoder if config.kind == "mlp" else _cnn_autoencoder)(config, input_shape)
        features = config.encoder_widths[-1]
    return TwoStageModel(encoder, decoder, _mlp(features, [*config.head_widths, num_classes], config), features)


class BackboneError(UserError):
    """A torchvision model that cannot serve as a backbone here: the message names it and what to choose."""


class Backbone(nn.Module):
    """A torchvision classification model without its classifier: images -> its pooled features. Grayscale images
    are repeated to the 3 channels it takes. Its weights are `net`'s (keys `net.<torchvision key>`)."""

    CLASSIFIERS = ("fc", "classifier", "heads", "head")  # what torchvision's model families call the last layers

    def __init__(self, name: str):
        super().__init__()
        from torchvision.models import get_model

        self.name = name
        self.net = get_model(name, weights=None)
        self.classifier_name = next(n for n in self.CLASSIFIERS if isinstance(getattr(self.net, n, None), nn.Module))
        setattr(self.net, self.classifier_name, nn.Identity())

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 1 or 3, H, W) -> (B, features)
        return self.net(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images)

    def features(self, input_shape: tuple[int, int, int]) -> int:
        """The feature size for images of `input_shape`: one forward pass of a blank image."""
        was_training = self.training
        try:
            with torch.no_grad():
                output = self.eval()(torch.zeros(2, *input_shape))
        except (RuntimeError, AssertionError, ValueError) as error:
            raise BackboneError(f"model.backbone {self.name} does not take images of shape {input_shape} "
                                f"({str(error).splitlines()[0][:160]}); choose another backbone or data.image_size") from None
        finally:
            self.train(was_training)
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            raise BackboneError(f"model.backbone {self.name} gives no feature vector per image without its "
                                "classifier; choose e.g. resnet18, resnet34, mobilenet_v3_small or efficientnet_b0")
        return output.shape[1]


def _mlp(in_features: int, widths: list[int], config: ModelConfig) -> nn.Sequential:
    """Linear layers; activation (and optional batchnorm, dropout) between them, none after the last."""
    layers: list[nn.Module] = []
    for index, width in enumerate(widths):
        layers.append(nn.Linear(in_features, width))
        if index < len(widths) - 1:
            if config.batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(ACTIVATIONS[config.activation]())
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
        in_features = width
    return nn.Sequential(*layers)


def _mlp_autoencoder(config: ModelConfig, input_shape: tuple[int, int, int]) -> tuple[nn.Module, nn.Module]:
    pixels = math.prod(input_shape)
    widths = config.encoder_widths
    encoder = nn.Sequential(nn.Flatten(), *_mlp(pixels, widths, config))
    mirrored = [*reversed(widths[:-1]), pixels]
    decoder = nn.Sequential(*_mlp(widths[-1], mirrored, config), nn.Unflatten(1, input_shape))
    return encoder, decoder


def _cnn_autoencoder(config: ModelConfig, input_shape: tuple[int, int, int]) -> tuple[nn.Module, nn.Module]:
    """Stride-2 3x3 convs, then linear layers; the decoder mirrors both with transposed convs."""
    channels, height, width = input_shape
    sizes = [(channels, height, width)]
    conv_layers: list[nn.Module] = []
    for out_channels in config.conv_channels:
        in_channels, h, w = sizes[-1]
        conv_layers.append(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1))
        if config.batchnorm:
            conv_layers.append(nn.BatchNorm2d(out_channels))
        conv_layers.append(ACTIVATIONS[config.activation]())
        sizes.append((out_channels, (h - 1) // 2 + 1, (w - 1) // 2 + 1))
    flat = math.prod(sizes[-1])
    encoder = nn.Sequential(*conv_layers, nn.Flatten(), *_mlp(flat, config.encoder_widths, config))

    widths = config.encoder_widths
    deconv_layers: list[nn.Module] = [
        *_mlp(widths[-1], [*reversed(widths[:-1]), flat], config),
        ACTIVATIONS[config.activation](),
        nn.Unflatten(1, sizes[-1]),
    ]
    pairs = list(zip(sizes[:0:-1], sizes[-2::-1]))  # ((C, h, w) in, (C', 2h or 2h-1, ...) out) per layer
    for index, ((in_channels, h, w), (out_channels, target_h, target_w)) in enumerate(pairs):
        # A stride-2 transposed conv gives 2h - 1 rows; output_padding adds the row the conv dropped.
        padding = (target_h - (2 * h - 1), target_w - (2 * w - 1))
        deconv_layers.append(nn.ConvTranspose2d(in_channels, out_channels, 3, 2, 1, output_padding=padding))
        if index < len(pairs) - 1:
            deconv_layers.append(ACTIVATIONS[config.activation]())
    return encoder, nn.Sequential(*deconv_layers)


def projection_head(features: int, dim: int) -> nn.Sequential:
    """SimCLR's projection head: trained with the encoder in contrastive pretraining, then dropped."""
    return nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, dim))
