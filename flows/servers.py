"""Which shared server a run lost, read from the error the run ended with.

A run on a team's servers depends on the MLflow tracking server and the Prefect server answering. When one stops
mid-run, MLflow's client retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, with backoff) and Prefect's retries the phase;
when those are spent, the run ends with the client library's error, a long line about connection pools. The
command says instead which server stopped answering and that the same command resumes: every finished phase and
the last saved epoch state are in the run's storage.
"""

from __future__ import annotations

import httpx
import requests
from mlflow.exceptions import MlflowException


def lost_server(error: BaseException, tracking_uri: str, prefect_api_url: str | None) -> str | None:
    """'the MLflow tracking server URL' or 'the Prefect server URL' when `error` (or what caused it) is a request
    to it that could not be made; None for any other error."""
    for link in _chain(error):
        if isinstance(link, MlflowException) and f"API request to {tracking_uri.rstrip('/')}" in str(link):
            return f"the MLflow tracking server {tracking_uri}"
        if isinstance(link, requests.ConnectionError) and tracking_uri.startswith("http"):
            return f"the MLflow tracking server {tracking_uri}"
        if isinstance(link, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)) and prefect_api_url:
            return f"the Prefect server {prefect_api_url}"
    return None


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
