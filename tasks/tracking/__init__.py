"""MLflow, and only here. Three concerns, a module each: `runs` (the parent and child runs' lifecycle and writes,
the reaper of dead processes' runs), `registry` (the champion policy), `history` (reading runs back for compare
and predict); `store` says which store.

Phases talk to their child run through `PhaseTracker`: a test fake, or another backend, is one class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tasks.tracking.history import (
    ModelNotFoundError,
    PipelineRunRecord,
    champion_pipeline_run,
    load_classifier,
    logged_encoder_state,
    metric_history,
    phase_run_id,
    pinned_model_uri,
    pipeline_runs,
)
from tasks.tracking.runs import (
    EpochMetrics,
    PhaseRun,
    log_pipeline_curves,
    phase_run,
    pipeline_run,
    record_reuse,
    run_name,
    unlinked_run,
)
from tasks.tracking.store import TrackingStoreError, open_store, run_url, tracking_uri


class PhaseTracker(Protocol):
    """What a training phase calls on its child run (PhaseRun is MLflow's)."""

    run_id: str
    started: float  # time.perf_counter() when the phase's run opened

    def log_params(self, params: dict, on_parent_only: bool = False) -> None: ...
    def log_metrics(self, metrics: dict[str, float], on_parent: bool = False) -> None: ...
    def log_epochs(self, epochs: list[EpochMetrics]) -> None: ...
    def log_artifact(self, path: Path, folder: str | None = None) -> None: ...
    def log_figure(self, figure, file_name: str) -> None: ...
    def last_step(self, metric: str) -> int: ...


__all__ = [
    "EpochMetrics", "ModelNotFoundError", "PhaseRun", "PhaseTracker", "PipelineRunRecord", "champion_pipeline_run",
    "load_classifier", "logged_encoder_state", "pinned_model_uri", "log_pipeline_curves", "metric_history", "phase_run", "phase_run_id", "pipeline_run",
    "pipeline_runs", "record_reuse", "run_name", "run_url", "tracking_uri", "TrackingStoreError", "open_store", "unlinked_run",
]
