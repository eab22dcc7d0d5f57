"""Which MLflow store, and the client for it; where a run's page is."""

from __future__ import annotations

import functools
import os

from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@functools.cache
def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def run_url(experiment_id: str, run_id: str) -> str:
    """The run's page: on the tracking server, or on `mlflow ui` for a local store."""
    uri = tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
