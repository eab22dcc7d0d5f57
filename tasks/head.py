"""Stage 2: a classification head on the frozen, pretrained encoder."""

from __future__ import annotations

from prefect import task

from configs.schema import HeadConfig
from models.objectives import classification_loss, inverse_frequency_weights
from models.training import encode, fit, freeze
from tasks import tracking
from tasks.data import load_splits
from tasks.phase import (
    classification_validator, epoch_reporter, finish_phase, load_model, log_parameter_counts, run_fit,
    seeded_generator,
)
from tasks.results import Checkpoint, DataBundle, RunContext


@task(name="train_head")
def train_head(config: HeadConfig, data: DataBundle, pretrained: Checkpoint, run: RunContext) -> Checkpoint:
    """Stage 2: train the head on labeled images with the encoder frozen; returns the whole model's checkpoint."""
    with tracking.phase_run(run, "head") as child:
        generator = seeded_generator(run, "head")
        splits = load_splits(data, run.device)
        model = load_model(pretrained, run.device)
        freeze(model.encoder)  # no gradients; train_mode keeps it in eval(), so BatchNorm stats stay too
        log_parameter_counts(child, model)
        images, labels = splits.train_x[splits.labeled], splits.train_y[splits.labeled]
        weights = inverse_frequency_weights(labels, data.num_classes) if config.class_weighted else None
        if config.cache_features:  # the encoder never changes in this phase: run it once, not every epoch
            trained, inputs, val_inputs = model.head, encode(model.encoder, images, 1024), encode(model.encoder, splits.val_x, 1024)
        else:
            trained, inputs, val_inputs = model, images, splits.val_x
        result = run_fit("head", lambda: fit(
            trained,
            [{"params": list(model.head.parameters())}],
            classification_loss(weights),
            (inputs, labels),
            classification_validator(val_inputs, splits.val_y),
            config,
            epoch_reporter("head", child),
            generator,
        ))
        checkpoint = finish_phase(
            "head", model, result, child, run,
            (config, pretrained.sha256, data.fingerprint, run.seed), pretrained.model, data.input_shape,
        )
        child.log_metrics({"head/val_acc": checkpoint.metrics["val/acc"]}, on_parent=True)
        return checkpoint
