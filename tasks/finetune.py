"""Stage 3: end-to-end finetuning, the encoder at a lower learning rate than the head."""

from __future__ import annotations

from prefect import task

from configs.schema import FinetuneConfig
from models.objectives import classification_loss, inverse_frequency_weights
from tasks.data import load_splits
from tasks.phase import PHASE_CACHE, best_val_acc, classification_validator, load_model, training_phase
from tasks.results import Checkpoint, DataBundle, RunContext


@task(name="finetune", cache_policy=PHASE_CACHE, persist_result=True)
def finetune(config: FinetuneConfig, data: DataBundle, head: Checkpoint, run: RunContext) -> Checkpoint:
    """Stage 3: train encoder and head together on labeled images; returns the finetuned checkpoint."""
    with training_phase("finetune", run) as phase:
        splits = load_splits(data, run.device)
        model = load_model(head, run.device)
        model.decoder.requires_grad_(False)  # not part of the classifier; kept only so checkpoints match
        groups = param_groups(model, config.encoder_lr_ratio)
        phase.log_parameter_counts(model, groups)
        images, labels = splits.labeled_train()
        weights = inverse_frequency_weights(labels, data.num_classes) if config.class_weighted else None
        validate = classification_validator(splits.val_x, splits.val_y)
        loss = classification_loss(weights, config.augment, config.label_smoothing)
        result = phase.fit(model, groups, loss, (images, labels), validate, config)
        headline = {"finetune/best_val_acc": best_val_acc(result, validate, model)}
        return phase.finish(model, result, head.model, data.input_shape, headline)


def param_groups(model, encoder_lr_ratio: float) -> list[dict]:
    """The head at the configured lr (first group, the logged `lr`), the encoder at lr * ratio."""
    return [
        {"params": list(model.head.parameters()), "lr_scale": 1.0},
        {"params": list(model.encoder.parameters()), "lr_scale": encoder_lr_ratio},
    ]
