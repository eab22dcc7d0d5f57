"""A training phase's last epoch states on disk: written atomically, the previous one kept, read defensively."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tasks.files import write_temporary


class EpochStates:
    """`<stem>.state.pt`, the last epoch's training state, and `<stem>.state.prev.pt`, the one before."""

    def __init__(self, stem: Path):
        self.stem = stem
        self.current = stem.with_name(stem.name + ".state.pt")
        self.previous = stem.with_name(stem.name + ".state.prev.pt")

    def save(self, state: dict) -> None:
        temporary = write_temporary(state, self.current.parent)
        if self.current.exists():
            os.replace(self.current, self.previous)
        os.replace(temporary, self.current)

    def load(self, logger) -> dict | None:
        """The newest readable state; an unreadable file is reported by name and skipped."""
        for path in (self.current, self.previous):
            if not path.exists():
                continue
            try:
                return torch.load(path, weights_only=True)
            except Exception as error:  # noqa: BLE001 - truncated or corrupted: any load failure
                logger.warning("%s: unreadable epoch checkpoint (%s: %s); skipping it", path, type(error).__name__, error)
        return None

    def clear(self) -> None:
        for path in (self.current, self.previous):
            path.unlink(missing_ok=True)
