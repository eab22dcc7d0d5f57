"""Prefect settings every twostage process wants, applied before Prefect is imported (it reads them then)."""

from __future__ import annotations

import os


def set_prefect_defaults() -> None:
    """Environment defaults; a value the user set wins."""
    # Offline-friendly: Prefect's server would otherwise log a failed telemetry call on every run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A first run migrates a new Prefect database before the ephemeral server answers: 6-15 s here, and
    # over Prefect's default 20 s limit on a loaded 2-core machine (CI failed so), which ended the run.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
