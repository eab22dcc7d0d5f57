"""What made a run: this package's version and the commit of the checkout it runs from."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def package_version() -> str:
    try:
        return importlib.metadata.version("twostage")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def git_commit() -> str | None:
    """The commit of the checkout this code runs from, wherever the run starts; None outside a checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=CHECKOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def describe() -> str:
    """'twostage 0.1.0 (commit 5be2440)', for --version."""
    commit = git_commit()
    return f"twostage {package_version()}" + (f" (commit {commit[:7]})" if commit else "")
