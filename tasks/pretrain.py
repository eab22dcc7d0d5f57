"""Stage 1: self-supervised pretraining of the encoder as an autoencoder."""

from __future__ import annotations

import torch
from prefect import task

from configs.schema import ModelConfig, PretrainConfig
from models.networks import build_model
from models.objectives import reconstruction_loss
from models.training import encode, reconstruction_error
from tasks import plots
from tasks.data import load_splits
from tasks.phase import PHASE_CACHE, training_phase
from tasks.results import Checkpoint, DataBundle, RunContext


@task(name="pretrain", cache_policy=PHASE_CACHE, persist_result=True)
def pretrain(config: PretrainConfig, model_config: ModelConfig, data: DataBundle, run: RunContext) -> Checkpoint:
    """Stage 1: train encoder + decoder to reconstruct every training image; returns their checkpoint."""
    with training_phase("pretrain", run) as phase:
        splits = load_splits(data, run.device)
        model = build_model(model_config, data.input_shape, data.num_classes).to(run.device)
        autoencoder = [{"params": [*model.encoder.parameters(), *model.decoder.parameters()]}]
        phase.log_parameter_counts(model, autoencoder)
        result = phase.fit(
            model,
            autoencoder,
            reconstruction_loss(config.augment, config.denoise_std),
            (splits.train_x, splits.train_y),  # every training image: stage 1 needs no labels
            lambda m: {"val/loss": reconstruction_error(m, splits.val_x, batch_size=1024)},
            config,
        )
        model.eval()
        with torch.inference_mode():
            sample = splits.val_x[:8]
            phase.child.log_figure(plots.reconstructions(sample, model.reconstruct(sample)), "reconstructions.png")
        features = encode(model.encoder, splits.val_x, 1024)
        title = "validation features after pretraining (PCA)"
        phase.child.log_figure(plots.feature_projection(features, splits.val_y, data.class_names, title), "features_pca.png")
        headline = {"pretrain/recon_loss": reconstruction_error(model, splits.val_x, batch_size=1024)}
        return phase.finish(model, result, model_config, data.input_shape, headline)
