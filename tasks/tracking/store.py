"""Which MLflow store, the client for it, whether it can be used, and where a run's page is."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlparse

from mlflow.tracking import MlflowClient

from configs.errors import UserError
from tasks.locks import ProcessLockManager, holding

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store
UI_URL_VARIABLE = "TWOSTAGE_MLFLOW_UI_URL"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@functools.cache
def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


class TrackingStoreError(UserError):
    """The MLflow store can't be used: the message names it, what is wrong, and MLFLOW_TRACKING_URI."""


def open_store(uri: str) -> MlflowClient:
    """The client for `uri`, once the store answers; a new sqlite store is created by one process at a time.

    Concurrent first uses of a new sqlite store run MLflow's schema migrations at once and leave it broken
    (half-migrated tables), so its creation holds an OS lock on `<file>.lock` beside it.

    Raises:
        TrackingStoreError: an unknown scheme, a server that doesn't answer, a file that is no MLflow store.
    """
    scheme = urlparse(uri).scheme
    fix = "fix MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db, or http://HOST:5000 for an MLflow server)"
    if scheme in ("http", "https"):
        _check_server(uri, fix)
        return client(uri)
    try:
        if scheme == "sqlite":
            database = Path(uri.removeprefix("sqlite:///")).resolve()
            database.parent.mkdir(parents=True, exist_ok=True)
            with holding(ProcessLockManager(database.parent), database.name):
                client(uri).search_experiments(max_results=1)
        else:
            client(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure to open the store ends in the one line below
        client.cache_clear()
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrackingStoreError(f"MLflow tracking store {uri} can't be used ({reason[:200]}); {fix}") from None
    return client(uri)


def _check_server(uri: str, fix: str) -> None:
    import requests
    from mlflow.environment_variables import (
        MLFLOW_TRACKING_CLIENT_CERT_PATH,
        MLFLOW_TRACKING_INSECURE_TLS,
        MLFLOW_TRACKING_SERVER_CERT_PATH,
    )

    tls = {  # as MLflow's own client reaches the server (a TLS proxy with a private CA, a client certificate)
        "verify": False if MLFLOW_TRACKING_INSECURE_TLS.get() else MLFLOW_TRACKING_SERVER_CERT_PATH.get() or True,
        "cert": MLFLOW_TRACKING_CLIENT_CERT_PATH.get(),
    }
    try:
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=5, **tls)
    except requests.RequestException as error:
        reason = type(error).__name__ + (": connection refused" if "refused" in str(error).lower() else "")
        raise TrackingStoreError(f"MLflow tracking server {uri} does not answer ({reason}); start it, or {fix}") from None
    if answer.status_code != 200:
        raise TrackingStoreError(f"MLflow tracking server {uri} answered /health with {answer.status_code}; {fix}")
    # /health answers anyone; a server with authentication (its basic-auth app) refuses the rest without an account
    user, token = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_TOKEN")
    try:
        answer = requests.get(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=10,
            auth=(user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None,
            headers={"Authorization": f"Bearer {token}"} if token and not user else None, **tls,
        )
    except requests.RequestException:
        return  # answered /health a moment ago: the run's own calls will retry and say so
    if answer.status_code in (401, 403):
        raise TrackingStoreError(_refused(uri, answer.status_code, user, token))


def _refused(uri: str, status: int, user: str | None, token: str | None) -> str:
    stack = "(the team stack's: `source .stack/env`)"
    if status == 403:
        who = f"account {user}" if user else "this MLFLOW_TRACKING_TOKEN"
        return (f"MLflow tracking server {uri} lets {who} read no experiment (403 Forbidden); ask its admin for READ, "
                "or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to another account")
    if user:
        return (f"MLflow tracking server {uri} refused MLFLOW_TRACKING_USERNAME {user} with this "
                f"MLFLOW_TRACKING_PASSWORD (401 Unauthorized); set the account's password {stack}")
    if token:
        return f"MLflow tracking server {uri} refused MLFLOW_TRACKING_TOKEN (401 Unauthorized); set a valid token"
    return (f"MLflow tracking server {uri} requires an account (401 Unauthorized); set MLFLOW_TRACKING_USERNAME "
            f"and MLFLOW_TRACKING_PASSWORD {stack}")


def ui_url() -> str:
    """Where users open the MLflow UI: TWOSTAGE_MLFLOW_UI_URL when set (a proxy, another host name or port), else the
    tracking server, else `mlflow ui`'s default address for a local store."""
    uri = tracking_uri()
    default = uri if uri.startswith(("http://", "https://")) else MLFLOW_UI
    return (os.environ.get(UI_URL_VARIABLE) or default).rstrip("/")


def run_url(experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (ui_url), in its model-training view (MLflow 3.17's UI opens in its GenAI
    view, where a training run shows as an "evaluation")."""
    return f"{ui_url()}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"

