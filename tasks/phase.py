"""What the three training phases share: the cache key, seeding, epoch states, progress, checkpoints.

A training phase writes its whole training state after an epoch (atomically, keeping the previous one) once
`checkpoint_every_s` has passed since the last, and after its last epoch; then it sends the metrics of the
epochs since the last state to MLflow in one batch. Started again with the same inputs (a Prefect retry, or
the same command after the process was killed), it resumes after the saved epoch in the same MLflow child
run, and logs no epoch twice.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from time import monotonic
from typing import Any

import torch
from prefect import get_run_logger
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext

from configs.errors import ConfigError
from configs.schema import ModelConfig, TrainConfig, fingerprint
from models.networks import TwoStageModel, build_model
from models.training import (
    EpochStats,
    FitResult,
    LossFn,
    NonFiniteLossError,
    Validate,
    classification_metrics,
    fit,
)
from tasks import tracking
from tasks.files import file_sha256, save_atomically, write_temporary
from tasks.results import Checkpoint, DataBundle, RunContext

PHASE_SEEDS = {"pretrain": 1, "head": 2, "finetune": 3}


SOURCE_ROOT = Path(__file__).resolve().parents[1]


def code_fingerprint(root: Path = SOURCE_ROOT) -> str:
    """sha256 of every module of `models/` and `tasks/` under `root`: the code that trains, loads data and
    checkpoints."""
    digest = hashlib.sha256()
    for path in sorted([*(root / "models").glob("*.py"), *(root / "tasks").glob("*.py")]):
        digest.update(f"{path.parent.name}/{path.name}".encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


CODE_FINGERPRINT = code_fingerprint()


def input_key(task_name: str, parameters: dict[str, Any]) -> str:
    """What a phase's result depends on: its configs, upstream fingerprints, the seed, `amp` as resolved and the code.

    The code is CODE_FINGERPRINT, not only the task function's source (Prefect's TASK_SOURCE): a change to the
    training loop, the networks or the objectives must not reuse results the old code made.

    Not the run ids, paths or the flow run: the same inputs give the same key in any later flow run.
    Pretraining never sees a label, so which labels the later phases use (`data.label_fraction`) is
    not part of its key: a low-label study pretrains once.
    """

    def identity(value: Any) -> Any:
        if isinstance(value, RunContext):  # not the device or compile: they change results only within noise
            return [value.seed, value.amp]
        if isinstance(value, DataBundle):
            return value.images_fingerprint if task_name == "pretrain" else value.fingerprint
        if isinstance(value, Checkpoint):
            return value.sha256
        return value

    return fingerprint(task_name, CODE_FINGERPRINT, *(identity(value) for _, value in sorted(parameters.items())))


# Prefect reuses a phase's persisted result when its inputs and our code are unchanged.
PHASE_CACHE = CacheKeyFnPolicy(cache_key_fn=lambda context, parameters: input_key(context.task.name, parameters))


class TrainingDivergedError(ConfigError):
    """The loss became NaN or infinite: the message names the phase, the epoch and what to change."""


class TrainingPhase:
    """One training phase in progress: its MLflow child run, batch-order generator and epoch states."""

    def __init__(
        self, name: str, context: RunContext, child: tracking.PhaseRun, states: EpochStates, resume: dict | None
    ):
        self.name = name
        self.context = context
        self.child = child
        self.states = states
        self.resume = resume
        self.parameter_counts: dict[str, float] = {}
        self.logger = get_run_logger()
        self.saved_epoch = resume["epoch"] if resume else 0
        self.saved_at = monotonic()
        self.logged_through = 0  # epochs up to this one are in the child run already (from an earlier attempt)
        self.unsent: list[tracking.EpochMetrics] = []
        seed = context.seed * 100 + PHASE_SEEDS[name]
        torch.manual_seed(seed)  # weights, noise, augmentation; a resumed fit restores the saved RNG states
        self.generator = torch.Generator().manual_seed(seed)

    def log_parameter_counts(self, model: torch.nn.Module, param_groups: list[dict]) -> None:
        """Trainable = what the optimizer gets; frozen = the rest of the model."""
        trainable = sum(p.numel() for group in param_groups for p in group["params"])
        frozen = sum(p.numel() for p in model.parameters()) - trainable
        self.child.log_params({"params_trainable": trainable, "params_frozen": frozen})
        self.parameter_counts = {f"params/{self.name}_trainable": trainable, f"params/{self.name}_frozen": frozen}

    def fit(
        self,
        model: torch.nn.Module,
        param_groups: list[dict],
        loss_fn: LossFn,
        data: tuple[torch.Tensor, torch.Tensor],
        validate: Validate,
        config: TrainConfig,
    ) -> FitResult:
        """The shared loop. After an epoch, once `checkpoint_every_s` has passed since the last epoch state (and
        after the last epoch), the phase saves the epoch state, then sends the metrics of the epochs since the
        last one; when training stops with an error, it sends what it has."""
        if config.epochs == 0:
            self.logger.info("%s: epochs 0, so no training: the weights stay as they came in", self.name)
        if self.resume is not None:
            self.logged_through = self.child.last_step("train/loss")
            for saved in self.resume["history"]:  # a crash after saving an epoch state, before sending its epochs
                self._queue(EpochStats(**saved))
            self.logger.info("%s: resuming after epoch %d/%d", self.name, self.resume["epoch"], config.epochs)

        def save_state(state: dict) -> None:
            now = monotonic()
            last = state["epoch"] == config.epochs or state["stopped_early"]
            if last or now - self.saved_at >= self.context.checkpoint_every_s:
                self.states.save({**state, "run_id": self.child.run_id})
                self.saved_epoch, self.saved_at = state["epoch"], now

        try:
            return fit(
                model, param_groups, loss_fn, data, validate, config, self._report, self.generator,
                save_state=save_state, resume=self.resume, amp=self.context.amp, compile=self.context.compile,
            )
        except NonFiniteLossError as error:
            raise TrainingDivergedError(
                f"{self.name}: the training loss became non-finite in epoch {error.epoch}; "
                f"lower {self.name}.optimizer.lr or set {self.name}.grad_clip_norm (e.g. 1.0)"
            ) from error
        finally:
            self._send()

    def _report(self, stats: EpochStats) -> None:
        self._queue(stats)
        shown = " ".join(f"{name} {value:.4f}" for name, value in stats.metrics().items() if name != "lr")
        self.logger.info(
            "%s epoch %d/%d %s lr %.2e %.1fs", self.name, stats.epoch, stats.epochs, shown, stats.lr, stats.seconds
        )

    def _queue(self, stats: EpochStats) -> None:
        """Queue the epoch's metrics, unless an earlier attempt logged them; once the epoch's state is saved,
        send the queue."""
        if stats.epoch > self.logged_through:
            values = {**stats.metrics(), "time/epoch_s": stats.seconds}
            self.unsent.append(tracking.EpochMetrics(stats.epoch, values, int(time.time() * 1000)))
        if stats.epoch == self.saved_epoch:
            self._send()

    def _send(self) -> None:
        if self.unsent:
            self.child.log_epochs(self.unsent)
            self.logged_through = self.unsent[-1].step
            self.unsent = []

    def finish(
        self,
        model: TwoStageModel,
        result: FitResult,
        model_config: ModelConfig,
        input_shape: tuple[int, int, int],
        headline: dict[str, float],
    ) -> Checkpoint:
        """Save and log the final weights; drop the epoch states, which are no longer needed.

        headline: the phase's key result for the parent run, e.g. {"head/best_val_acc": 0.97}; the parent
        also gets the phase's seconds and parameter counts.
        """
        path = self.states.stem.with_suffix(".pt")
        save_atomically(model.state_dict(), path)
        sha256 = file_sha256(path)
        self.child.log_artifact(path, "checkpoint")  # the curves: MLflow charts the per-epoch metrics
        seconds = time.perf_counter() - self.child.started
        metrics = {**headline, **self.parameter_counts, f"time/{self.name}_s": seconds}
        self.child.log_metrics(metrics, on_parent=True)
        self.states.clear()
        return Checkpoint(
            phase=self.name,
            path=path,
            sha256=sha256,
            model=model_config,
            input_shape=input_shape,
            num_classes=model.head[-1].out_features,
            metrics=metrics,
            run_id=self.child.run_id,
            seconds=seconds,
        )


@contextmanager
def training_phase(name: str, context: RunContext) -> Iterator[TrainingPhase]:
    """Open (or, when resuming, reopen) the phase's child run and load its last good epoch state.

    Called inside the phase's task: its files are named by its input key, which holds the code fingerprint as
    its cached result's does, so a state left by older code is not resumed by newer code. Not the task
    function's source: Prefect 3.9 runs served and worker-submitted flows from cloudpickle bundles whose
    functions have no source file.
    """
    task_run = TaskRunContext.get()
    key = input_key(task_run.task.name, task_run.parameters)
    states = EpochStates(Path(context.output_dir) / "checkpoints" / f"{name}-{key[:16]}")
    resume = states.load(get_run_logger())
    reopen = (resume["run_id"], resume["epoch"]) if resume else None
    with tracking.phase_run(context, name, reopen=reopen) as child:
        yield TrainingPhase(name, context, child, states, resume)


class EpochStates:
    """`<stem>.state.pt`, the last epoch's training state, and `<stem>.state.prev.pt`, the one before."""

    def __init__(self, stem: Path):
        self.stem = stem
        self.current = stem.with_name(stem.name + ".state.pt")
        self.previous = stem.with_name(stem.name + ".state.prev.pt")

    def save(self, state: dict) -> None:
        temporary = write_temporary(state, self.current.parent)
        if self.current.exists():
            os.replace(self.current, self.previous)
        os.replace(temporary, self.current)

    def load(self, logger) -> dict | None:
        """The newest readable state; an unreadable file is reported by name and skipped."""
        for path in (self.current, self.previous):
            if not path.exists():
                continue
            try:
                return torch.load(path, weights_only=True)
            except Exception as error:  # noqa: BLE001 - truncated or corrupted: any load failure
                logger.warning("%s: unreadable epoch checkpoint (%s: %s); skipping it", path, type(error).__name__, error)
        return None

    def clear(self) -> None:
        for path in (self.current, self.previous):
            path.unlink(missing_ok=True)


def checkpoint_problem(checkpoint: Checkpoint) -> str | None:
    """Why a recorded checkpoint can't be used (missing, or different bytes), or None when it is intact."""
    if not Path(checkpoint.path).exists():
        return f"{checkpoint.path} is missing"
    actual = file_sha256(checkpoint.path)
    if actual != checkpoint.sha256:
        return f"{checkpoint.path} has sha256 {actual[:12]}, not the recorded {checkpoint.sha256[:12]}"
    return None


def load_model(checkpoint: Checkpoint, device: str) -> TwoStageModel:
    """Rebuild the network and load the checkpoint's weights, after checking the file's sha256."""
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ValueError(f"{checkpoint.phase} checkpoint unusable: {problem}")
    model = build_model(checkpoint.model, checkpoint.input_shape, checkpoint.num_classes)
    model.load_state_dict(torch.load(checkpoint.path, map_location=device, weights_only=True))
    return model.to(device)


def classification_validator(inputs: torch.Tensor, targets: torch.Tensor) -> Validate:
    """`validate` for the supervised phases: val/loss and val/acc of the model on (inputs, targets)."""

    def validate(model: torch.nn.Module) -> dict[str, float]:
        loss, accuracy, _ = classification_metrics(model, inputs, targets, batch_size=1024)
        return {"val/loss": loss, "val/acc": accuracy}

    return validate


def best_val_acc(result: FitResult, validate: Validate, model: torch.nn.Module) -> float:
    """The best epoch's val/acc; with no epochs (`epochs: 0`), the model's as it is."""
    if not result.history:
        return validate(model)["val/acc"]
    return max(stats.val["val/acc"] for stats in result.history)
