"""Writing files so that a crash never leaves a half-written one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def write_temporary(obj: Any, folder: Path) -> Path:
    """torch.save `obj` to a new temporary file in `folder`, flushed to disk; rename it into place."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(handle, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())
    return Path(temporary)


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path`: readers see the old file or the whole new one, never a partial one."""
    os.replace(write_temporary(obj, path.parent), path)
