"""Stage 2: a classification head on the frozen, pretrained encoder."""

from __future__ import annotations

from prefect import task

from configs.schema import HeadConfig
from models.evaluation import best_val_acc, classification_validator, encode
from models.objectives import classification_loss, inverse_frequency_weights
from models.training import freeze
from tasks.checkpoints import load_model
from tasks.data import load_splits
from tasks.keys import PHASE_CACHE
from tasks.phase import TrainingPhase, open_phase
from tasks.results import Checkpoint, DataBundle, LabeledSubset, RunContext


@task(name="head", cache_policy=PHASE_CACHE, persist_result=True)
def train_head(
    config: HeadConfig, data: DataBundle, labeled: LabeledSubset, pretrained: Checkpoint, run: RunContext
) -> Checkpoint:
    """Stage 2: train the head on labeled images with the encoder frozen; returns the whole model's checkpoint."""
    with open_phase("head", locals()) as phase:  # locals(): the task's parameters, as Prefect keys its result
        return train_head_on_frozen_encoder(phase, config, data, labeled, pretrained)


def train_head_on_frozen_encoder(
    phase: TrainingPhase, config: HeadConfig, data: DataBundle, labeled: LabeledSubset, pretrained: Checkpoint
) -> Checkpoint:
    splits = load_splits(data, phase.device)
    model = load_model(pretrained, phase.device)
    freeze(model.encoder)  # no gradients; train_mode keeps it in eval(), so BatchNorm stats stay too
    head_only = [{"params": list(model.head.parameters())}]
    phase.log_parameter_counts(model, head_only)
    images, labels = splits.labeled(labeled)
    weights = inverse_frequency_weights(labels, data.num_classes) if config.class_weighted else None
    if config.cache_features:  # the encoder never changes in this phase: run it once, not every epoch
        trained = model.head
        inputs, val_inputs = encode(model.encoder, images, 1024), encode(model.encoder, splits.val_x, 1024)
    else:
        trained, inputs, val_inputs = model, images, splits.val_x
    validate = classification_validator(val_inputs, splits.val_y)
    loss = classification_loss(weights, label_smoothing=config.label_smoothing)
    result = phase.fit(trained, head_only, loss, (inputs, labels), validate, config)
    headline = {"head/best_val_acc": best_val_acc(result, validate, trained)}
    return phase.finish(model, pretrained.model, data.input_shape, headline)
