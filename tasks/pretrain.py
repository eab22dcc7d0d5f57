"""Stage 1: self-supervised pretraining of the encoder, by the objective the config names (OBJECTIVES)."""

from __future__ import annotations

import torch
from prefect import task
from torch import nn

from configs.schema import ModelConfig, PretrainConfig
from models.evaluation import encode, evaluating, first_block_maps
from models.networks import build_model
from models.objectives import OBJECTIVES
from tasks import plots
from tasks.data import load_splits
from tasks.keys import PHASE_CACHE
from tasks.phase import TrainingPhase, open_phase
from tasks.results import Checkpoint, DataBundle, RunContext
from tasks.weights import load_starting_weights


@task(name="pretrain", cache_policy=PHASE_CACHE, persist_result=True)
def pretrain(config: PretrainConfig, model_config: ModelConfig, data: DataBundle, run: RunContext) -> Checkpoint:
    """Stage 1: train the encoder on every training image, without labels; returns the model's checkpoint."""
    with open_phase("pretrain", locals()) as phase:  # locals(): the task's parameters, as Prefect keys its result
        return train_encoder(phase, config, model_config, data)


def train_encoder(phase: TrainingPhase, config: PretrainConfig, model_config: ModelConfig, data: DataBundle) -> Checkpoint:
    splits = load_splits(data, phase.device)
    model = build_model(model_config, data.input_shape, data.num_classes)
    if model_config.kind == "backbone":
        source = load_starting_weights(model.encoder, model_config)
        phase.logger.info("pretrain: backbone %s, starting from %s", model_config.backbone, source or "random weights")
    model = model.to(phase.device)
    objective = OBJECTIVES[config.objective]
    stage1 = objective.setup(model, config)
    groups = [{"params": stage1.parameters}]
    phase.log_parameter_counts(nn.ModuleList([model, stage1.trained]), groups)
    validate = lambda trained: {"loss/val": stage1.validation_loss(splits.val_x)}  # noqa: E731
    phase.fit(stage1.trained, groups, stage1.loss, (splits.train_x, splits.train_y), validate, config)

    headline = {objective.headline: stage1.validation_loss(splits.val_x)}
    if objective.reconstructs:
        with evaluating(model), torch.inference_mode():
            sample = splits.val_x[:8]
            phase.child.log_figure(plots.reconstructions(sample, model.reconstruct(sample)), "reconstructions.png")
    maps = first_block_maps(model.encoder, splits.val_x[:4])
    if maps is not None:  # a convolutional encoder: what its first block sees
        phase.child.log_figure(plots.feature_maps(splits.val_x[:4], maps, "first convolutional block after "
                                                  "pretraining (validation images)"), "feature_maps.png")
    features = encode(model.encoder, splits.val_x, 1024)
    title = f"validation features after {config.objective} pretraining (PCA)"
    phase.child.log_figure(plots.feature_projection(features, splits.val_y, data.class_names, title), "features_pca.png")
    return phase.finish(model, model_config, data.input_shape, headline)
