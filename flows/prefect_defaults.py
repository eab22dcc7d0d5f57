"""Prefect settings every twostage process wants, applied before Prefect is imported (it reads them then)."""

from __future__ import annotations

import os


def set_prefect_defaults() -> None:
    """Environment defaults; a value the user set wins."""
    # Offline-friendly: Prefect's server would otherwise log a failed telemetry call on every run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # With the server's analytics off, the client's events go nowhere; without this, the client still prints its
    # four-line first-run telemetry notice in a terminal (it names both settings as the way to opt out).
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # A first run migrates a new Prefect database before the ephemeral server answers: 6-15 s here, and
    # over Prefect's default 20 s limit on a loaded 2-core machine (CI failed so), which ended the run.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
