"""Networks built from config: shapes for every data set's images, and the reference architecture exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from configs.schema import ModelConfig
from models.networks import build_model


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 13, 21)])
def test_encoder_decoder_and_head_shapes(kind, shape):
    config = ModelConfig(kind=kind, encoder_widths=[48, 12], head_widths=[16], batchnorm=True, dropout=0.1)
    model = build_model(config, shape, num_classes=7).eval()
    images = torch.randn(5, *shape)
    assert model.encoder(images).shape == (5, 12)
    assert model.reconstruct(images).shape == (5, *shape)
    assert model(images).shape == (5, 7)


def test_reference_mlp_is_built_exactly():
    config = ModelConfig(kind="mlp", encoder_widths=[256, 128], head_widths=[64], activation="relu")
    model = build_model(config, (1, 28, 28), num_classes=10)
    encoder = [m for m in model.encoder if not isinstance(m, nn.Flatten)]
    assert [type(m) for m in encoder] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (encoder[0].in_features, encoder[0].out_features, encoder[2].out_features) == (784, 256, 128)
    assert [type(m) for m in model.head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (model.head[0].in_features, model.head[0].out_features, model.head[2].out_features) == (128, 64, 10)


def test_classifier_shares_the_trained_modules_without_the_decoder():
    model = build_model(ModelConfig(), (1, 8, 8), num_classes=10)
    classifier = model.classifier()
    assert classifier[0] is model.encoder and classifier[1] is model.head
    images = torch.randn(3, 1, 8, 8)
    assert torch.equal(classifier(images), model(images))
