"""Stage 2: a classification head on the frozen, pretrained encoder."""

from __future__ import annotations

from prefect import task

from configs.schema import HeadConfig
from models.objectives import classification_loss, inverse_frequency_weights
from models.training import encode, freeze
from tasks.data import load_splits
from tasks.phase import PHASE_CACHE, best_val_acc, classification_validator, load_model, training_phase
from tasks.results import Checkpoint, DataBundle, RunContext


@task(name="train_head", cache_policy=PHASE_CACHE, persist_result=True)
def train_head(config: HeadConfig, data: DataBundle, pretrained: Checkpoint, run: RunContext) -> Checkpoint:
    """Stage 2: train the head on labeled images with the encoder frozen; returns the whole model's checkpoint."""
    with training_phase("head", run) as phase:
        splits = load_splits(data, run.device)
        model = load_model(pretrained, run.device)
        freeze(model.encoder)  # no gradients; train_mode keeps it in eval(), so BatchNorm stats stay too
        head_only = [{"params": list(model.head.parameters())}]
        phase.log_parameter_counts(model, head_only)
        images, labels = splits.labeled_train()
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
        return phase.finish(model, result, pretrained.model, data.input_shape, headline)
