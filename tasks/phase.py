"""A training phase in progress: its MLflow child run, seeding, epoch states, progress, final checkpoint.

A training phase writes its whole training state after an epoch (atomically, keeping the previous one) once
`checkpoint_every_s` has passed since the last, and after its last epoch; then it sends the metrics of the
epochs since the last state to MLflow in one batch. Started again with the same inputs (a Prefect retry, or
the same command after the process was killed), it resumes after the saved epoch in the same MLflow child
run, and logs no epoch twice. Progress shows as tasks/progress.py says: a live line on a terminal, periodic lines
elsewhere, and a Prefect progress artifact inside a Prefect task.

A phase gets its key, logger, tracker and progress artifact passed in (`training_phase`), so its training function
runs without the Prefect engine; inside a task, `open_phase` supplies Prefect's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from time import monotonic
from typing import Any

import torch
from prefect import get_run_logger

from configs.errors import UserError
from configs.schema import ModelConfig, TrainConfig
from models.networks import TwoStageModel
from models.training import EpochStats, FitResult, LossFn, NonFiniteLossError, Validate, fit
from tasks import tracking
from tasks.checkpoints import sha256
from tasks.epoch_states import EpochStates
from tasks.files import join, local_copy, torch_bytes, write_atomically
from tasks.keys import input_key
from tasks.progress import PhaseProgress, terminal_console
from tasks.results import Checkpoint, RunContext

PHASE_SEEDS = {"pretrain": 1, "head": 2, "finetune": 3}

OpenChild = Callable[..., AbstractContextManager[tracking.PhaseTracker]]  # tracking.phase_run, or a test's fake


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite: the message names the phase, the epoch and what to change."""


class TrainingPhase:
    """One training phase in progress: its MLflow child run, batch-order generator and epoch states."""

    def __init__(self, name: str, context: RunContext, child: tracking.PhaseTracker, states: EpochStates,
                 resume: dict | None, logger: logging.Logger | logging.LoggerAdapter,
                 progress_artifact: tuple[Callable, Callable] | None = None):
        self.name = name
        self.context = context
        self.device = context.device
        self.child = child
        self.states = states
        self.resume = resume
        self.logger = logger
        self.progress_artifact = progress_artifact
        self.progress: PhaseProgress | None = None
        self.parameter_counts: dict[str, int] = {}
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
        self.parameter_counts = {f"parameters/{self.name}_trainable": trainable,
                                 f"parameters/{self.name}_frozen": frozen}

    def fit(
        self,
        model: torch.nn.Module,
        param_groups: list[dict],
        loss_fn: LossFn,
        data: tuple[torch.Tensor, torch.Tensor],
        validate: Validate,
        config: TrainConfig,
        on_epoch_start: Callable[[int], None] | None = None,
    ) -> FitResult:
        """The shared loop. After an epoch, once `checkpoint_every_s` has passed since the last epoch state (and
        after the last epoch), the phase saves the epoch state, then sends the metrics of the epochs since the
        last one; when training stops with an error, it sends what it has."""
        if config.epochs == 0:
            self.logger.info("%s: epochs 0, so no training: the weights stay as they came in", self.name)
        if self.resume is not None:
            self.logged_through = self.child.last_step("loss/train")
            for saved in self.resume["history"]:  # a crash after saving an epoch state, before sending its epochs
                self._queue(EpochStats(**saved))
            self.logger.info("%s: resuming after epoch %d/%d", self.name, self.resume["epoch"], config.epochs)

        def save_state(state: dict) -> None:
            now = monotonic()
            last = state["epoch"] == config.epochs or state["stopped_early"]
            if last or now - self.saved_at >= self.context.checkpoint_every_s:
                self.states.save({**state, "run_id": self.child.run_id})
                self.saved_epoch, self.saved_at = state["epoch"], now

        self.progress = PhaseProgress(self.name, config.epochs, self.saved_epoch + 1, self.logger,
                                      self.progress_artifact, terminal_console())
        finished = False
        try:
            result = fit(
                model, param_groups, loss_fn, data, validate, config, self._report, self.generator,
                save_state=save_state, resume=self.resume, amp=self.context.amp, compile=self.context.compile,
                on_batch=self.progress.batch, on_epoch_start=on_epoch_start,
            )
            finished = True
            return result
        except NonFiniteLossError as error:
            raise TrainingDivergedError(
                f"{self.name}: the training loss became non-finite in epoch {error.epoch}; "
                f"lower {self.name}.optimizer.lr or set {self.name}.grad_clip_norm (e.g. 1.0)"
            ) from error
        finally:
            try:
                self.progress.close(finished)
            finally:
                self._send()

    def _report(self, stats: EpochStats) -> None:
        self._queue(stats)
        shown = " ".join(f"{name} {value:.4f}" for name, value in stats.metrics().items() if name != "lr")
        line = f"{self.name} epoch {stats.epoch}/{stats.epochs} {shown} lr {stats.lr:.2e} {stats.seconds:.1f}s"
        self.progress.epoch(stats.epoch, line, shown)

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
        self, model: TwoStageModel, model_config: ModelConfig, input_shape: tuple[int, int, int],
        headline: dict[str, float],
    ) -> Checkpoint:
        """Save and log the final weights; drop the epoch states, which are no longer needed.

        headline: the phase's key result for the parent run, e.g. {"head/best_val_acc": 0.97}; the parent
        also gets the phase's seconds, and its parameter counts as params.
        """
        path = self.states.stem + ".pt"
        weights = torch_bytes(model.state_dict())
        write_atomically(path, weights)
        with local_copy(path, weights) as file:
            self.child.log_artifact(file, "checkpoint")  # the curves: MLflow charts the per-epoch metrics
        seconds = time.perf_counter() - self.child.started
        metrics = {**headline, f"time/{self.name}_s": seconds}
        self.child.log_metrics(metrics, on_parent=True)
        self.child.log_params(self.parameter_counts, on_parent_only=True)
        self.states.clear()
        return Checkpoint(
            phase=self.name, path=path, sha256=sha256(weights), model=model_config, input_shape=input_shape,
            num_classes=model.head[-1].out_features, metrics=metrics, run_id=self.child.run_id, seconds=seconds,
            parameter_counts=self.parameter_counts,
        )


@contextmanager
def training_phase(
    name: str, run: RunContext, key: str, logger: logging.Logger | logging.LoggerAdapter,
    open_child: OpenChild = tracking.phase_run, progress_artifact: tuple[Callable, Callable] | None = None,
) -> Iterator[TrainingPhase]:
    """Open (or, when resuming, reopen) the phase's child run and load its last good epoch state.

    Its files are named by `key`, which holds the code fingerprint as its cached result's key does, so a state
    left by older code is not resumed by newer code.
    """
    states = EpochStates(join(run.storage, "checkpoints", f"{name}-{key[:16]}"))
    resume = states.load(logger)
    reopen = (resume["run_id"], resume["epoch"]) if resume else None
    with open_child(run, name, reopen=reopen) as child:
        yield TrainingPhase(name, run, child, states, resume, logger, progress_artifact)


def open_phase(name: str, parameters: dict[str, Any]) -> AbstractContextManager[TrainingPhase]:
    """`training_phase` inside the phase's Prefect task, given the task's parameters: keyed as Prefect caches the
    task's result, logging through Prefect's run logger, its progress a Prefect progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    return training_phase(name, parameters["run"], input_key(name, parameters), get_run_logger(),
                          progress_artifact=(create_progress_artifact, update_progress_artifact))
