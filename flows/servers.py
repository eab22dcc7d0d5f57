"""Which shared server a run lost, read from the error the run ended with.

A run on a team's servers depends on the MLflow tracking server and the Prefect server answering. When one stops
mid-run, MLflow's client retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, with backoff) and Prefect's retries the phase;
when those are spent, the run ends with the client library's error, a long line about connection pools. The
command says instead which server stopped answering and that the same command resumes: every finished phase and
the last saved epoch state are in the run's storage.
"""

from __future__ import annotations

import base64
import ssl

import httpx
import requests
from mlflow.exceptions import MlflowException

from configs.errors import UserError


class PrefectServerError(UserError):
    """The Prefect server at PREFECT_API_URL does not answer or refuses us: the message names it and the fix."""


def check_prefect_server(api_url: str | None) -> None:
    """Before a run, a sweep or a schedule: the Prefect server at `api_url` answers and takes our credentials
    (PREFECT_API_AUTH_STRING for a server with PREFECT_SERVER_API_AUTH_STRING, PREFECT_API_KEY for Prefect Cloud).
    Nothing to check for Prefect's ephemeral server (`api_url` None).

    Raises:
        PrefectServerError: one line naming the server and the variable to set.
    """
    if not api_url:
        return
    from prefect.settings import get_current_settings

    settings = get_current_settings().api
    auth_string = settings.auth_string.get_secret_value() if settings.auth_string else None
    key = settings.key.get_secret_value() if settings.key else None
    headers = ({"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()} if auth_string
               else {"Authorization": f"Bearer {key}"} if key else {})
    verify = (False if settings.tls_insecure_skip_verify  # as Prefect's client reaches it
              else ssl.create_default_context(cafile=settings.ssl_cert_file) if settings.ssl_cert_file else True)
    try:
        answer = httpx.get(f"{api_url.rstrip('/')}/admin/version", headers=headers, timeout=10, verify=verify)
    except httpx.HTTPError as error:
        raise PrefectServerError(f"Prefect server {api_url} does not answer ({type(error).__name__}); start it, or "
                                 "unset PREFECT_API_URL to run on Prefect's ephemeral server") from None
    if answer.status_code == 401:
        stack = "(the team stack's: `source .stack/env`)"
        if auth_string:
            raise PrefectServerError(f"Prefect server {api_url} refused PREFECT_API_AUTH_STRING (401 Unauthorized); "
                                     f"set it to the server's PREFECT_SERVER_API_AUTH_STRING {stack}")
        raise PrefectServerError(f"Prefect server {api_url} requires authentication (401 Unauthorized); set "
                                 f"PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING {stack}"
                                 + (", or a valid PREFECT_API_KEY" if key else ""))


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
