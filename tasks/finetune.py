"""Stage 3: end-to-end finetuning, the encoder at a lower learning rate than the head."""

from __future__ import annotations

from prefect import task

from configs.schema import FinetuneConfig
from models.objectives import classification_loss, inverse_frequency_weights
from models.training import fit
from tasks import tracking
from tasks.data import load_splits
from tasks.phase import (
    classification_validator, epoch_reporter, finish_phase, load_model, log_parameter_counts, run_fit,
    seeded_generator,
)
from tasks.results import Checkpoint, DataBundle, RunContext


@task(name="finetune")
def finetune(config: FinetuneConfig, data: DataBundle, head: Checkpoint, run: RunContext) -> Checkpoint:
    """Stage 3: train encoder and head together on labeled images; returns the finetuned checkpoint."""
    with tracking.phase_run(run, "finetune") as child:
        generator = seeded_generator(run, "finetune")
        splits = load_splits(data, run.device)
        model = load_model(head, run.device)
        model.decoder.requires_grad_(False)  # not part of the classifier; kept only so checkpoints match
        log_parameter_counts(child, model)
        images, labels = splits.train_x[splits.labeled], splits.train_y[splits.labeled]
        weights = inverse_frequency_weights(labels, data.num_classes) if config.class_weighted else None
        result = run_fit("finetune", lambda: fit(
            model,
            param_groups(model, config.encoder_lr_ratio),
            classification_loss(weights),
            (images, labels),
            classification_validator(splits.val_x, splits.val_y),
            config,
            epoch_reporter("finetune", child),
            generator,
        ))
        checkpoint = finish_phase(
            "finetune", model, result, child, run,
            (config, head.sha256, data.fingerprint, run.seed), head.model, data.input_shape,
        )
        child.log_metrics({"finetune/val_acc": checkpoint.metrics["val/acc"]}, on_parent=True)
        return checkpoint


def param_groups(model, encoder_lr_ratio: float) -> list[dict]:
    """The head at the configured lr (first group, the logged `lr`), the encoder at lr * ratio."""
    return [
        {"params": list(model.head.parameters()), "lr_scale": 1.0},
        {"params": list(model.encoder.parameters()), "lr_scale": encoder_lr_ratio},
    ]
