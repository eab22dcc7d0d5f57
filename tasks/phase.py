"""What the three training phases share: seeding, progress and metric logging, checkpoint files."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from prefect import get_run_logger

from configs.loader import ConfigError
from configs.schema import ModelConfig, fingerprint
from models.networks import TwoStageModel, build_model, count_parameters
from models.training import EpochStats, FitResult, NonFiniteLossError, Validate, classification_metrics
from tasks import plots
from tasks.results import Checkpoint, RunContext
from tasks.tracking import PhaseRun

PHASE_SEEDS = {"pretrain": 1, "head": 2, "finetune": 3}


def seeded_generator(context: RunContext, phase: str) -> torch.Generator:
    """Seed torch for this phase (weights, noise, augmentation) and return the batch-order generator."""
    seed = context.seed * 100 + PHASE_SEEDS[phase]
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def epoch_reporter(phase: str, child: PhaseRun) -> Callable[[EpochStats], None]:
    """The loop's callback: one MLflow batch per epoch and one progress line on the console."""
    logger = get_run_logger()

    def report(stats: EpochStats) -> None:
        child.log_metrics(stats.metrics(), step=stats.epoch)
        shown = " ".join(f"{name} {value:.4f}" for name, value in stats.metrics().items() if name != "lr")
        logger.info(
            "%s epoch %d/%d %s lr %.2e %.1fs", phase, stats.epoch, stats.epochs, shown, stats.lr, stats.seconds
        )

    return report


class TrainingDivergedError(ConfigError):
    """The loss became NaN or infinite: the message names the phase, the epoch and what to change."""


def run_fit(phase: str, fit_call: Callable[[], FitResult]) -> FitResult:
    """Call `fit`, turning a non-finite loss into an error that says which settings to change."""
    try:
        return fit_call()
    except NonFiniteLossError as error:
        raise TrainingDivergedError(
            f"{phase}: the training loss became non-finite in epoch {error.epoch}; "
            f"lower {phase}.optimizer.lr or set {phase}.grad_clip_norm (e.g. 1.0)"
        ) from error


def classification_validator(inputs: torch.Tensor, targets: torch.Tensor) -> Validate:
    """`validate` for the supervised phases: val/loss and val/acc of the model on (inputs, targets)."""

    def validate(model: torch.nn.Module) -> dict[str, float]:
        loss, accuracy, _ = classification_metrics(model, inputs, targets, batch_size=1024)
        return {"val/loss": loss, "val/acc": accuracy}

    return validate


def log_parameter_counts(child: PhaseRun, model: torch.nn.Module) -> None:
    trainable, frozen = count_parameters(model)
    child.log_params({"params_trainable": trainable, "params_frozen": frozen})


def finish_phase(
    phase: str,
    model: TwoStageModel,
    result: FitResult,
    child: PhaseRun,
    context: RunContext,
    key_parts: tuple,
    model_config: ModelConfig,
    input_shape: tuple[int, int, int],
) -> Checkpoint:
    """Save the weights, log the checkpoint and the loss curve, and describe them as a `Checkpoint`."""
    path = Path(context.output_dir) / "checkpoints" / f"{phase}-{fingerprint(*key_parts)[:16]}.pt"
    sha256 = save_state(model, path)
    child.log_artifact(path, "checkpoint")
    child.log_figure(plots.loss_curves(result.history, phase), f"{phase}_loss.png")
    last = result.history[-1]
    metrics = {**last.metrics(), "best_epoch": float(result.best_epoch)}
    return Checkpoint(
        phase=phase,
        path=path,
        sha256=sha256,
        model=model_config,
        input_shape=input_shape,
        num_classes=model.head[-1].out_features,
        metrics=metrics,
        run_id=child.run_id,
    )


def save_state(model: torch.nn.Module, path: Path) -> str:
    """Write the state dict atomically (temp file, fsync, rename); return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "wb") as file:
        torch.save(model.state_dict(), file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return file_sha256(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(checkpoint: Checkpoint, device: str) -> TwoStageModel:
    """Rebuild the network and load the checkpoint's weights, after checking the file's sha256."""
    actual = file_sha256(checkpoint.path)
    if actual != checkpoint.sha256:
        raise ValueError(f"{checkpoint.path}: sha256 {actual[:12]} differs from the recorded {checkpoint.sha256[:12]}")
    model = build_model(checkpoint.model, checkpoint.input_shape, checkpoint.num_classes)
    model.load_state_dict(torch.load(checkpoint.path, map_location=device, weights_only=True))
    return model.to(device)
