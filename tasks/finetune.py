"""Stage 3: end-to-end finetuning, the encoder at a lower learning rate than the head."""

from __future__ import annotations

from prefect import task

from configs.schema import FinetuneConfig
from models.evaluation import best_val_acc, classification_validator
from models.networks import TwoStageModel
from models.objectives import classification_loss, inverse_frequency_weights
from tasks.checkpoints import load_model
from tasks.data import load_splits
from tasks.keys import PHASE_CACHE
from tasks.phase import TrainingPhase, open_phase
from tasks.results import Checkpoint, DataBundle, LabeledSubset, RunContext


@task(name="finetune", cache_policy=PHASE_CACHE, persist_result=True)
def finetune(
    config: FinetuneConfig, data: DataBundle, labeled: LabeledSubset, head: Checkpoint, run: RunContext
) -> Checkpoint:
    """Stage 3: train encoder and head together on labeled images; returns the finetuned checkpoint."""
    with open_phase("finetune", locals()) as phase:  # locals(): the task's parameters, as Prefect keys its result
        return train_end_to_end(phase, config, data, labeled, head)


def train_end_to_end(
    phase: TrainingPhase, config: FinetuneConfig, data: DataBundle, labeled: LabeledSubset, head: Checkpoint
) -> Checkpoint:
    splits = load_splits(data, phase.device)
    model = load_model(head, phase.device)
    model.decoder.requires_grad_(False)  # not part of the classifier; kept only so checkpoints match
    groups = param_groups(model, config)
    phase.log_parameter_counts(model, groups)
    images, labels = splits.labeled(labeled)
    weights = inverse_frequency_weights(labels, data.num_classes) if config.class_weighted else None
    validate = classification_validator(splits.val_x, splits.val_y)
    loss = classification_loss(weights, config.augment, config.label_smoothing)
    frozen_for = config.unfreeze_after_epochs

    def unfreeze_after(epoch: int) -> None:  # per epoch, so a resumed run is frozen or not as the epoch says
        model.encoder.requires_grad_(epoch > frozen_for)

    result = phase.fit(model, groups, loss, (images, labels), validate, config,
                       on_epoch_start=unfreeze_after if frozen_for else None)
    headline = {"finetune/best_val_acc": best_val_acc(result, validate, model)}
    return phase.finish(model, head.model, data.input_shape, headline)


def param_groups(model: TwoStageModel, config: FinetuneConfig) -> list[dict]:
    """The head at the configured lr (first group, the logged `lr`), the encoder at lr * encoder_lr_ratio."""
    return [
        {"params": list(model.head.parameters())},
        {"params": list(model.encoder.parameters()), "lr": config.optimizer.lr * config.encoder_lr_ratio},
    ]
