"""A training phase's last epoch states in its storage: written atomically, the previous one kept, read
defensively."""

from __future__ import annotations

from tasks.files import exists, move, read_bytes, remove, torch_bytes, torch_load, write_temporary


class EpochStates:
    """`<stem>.state.pt`, the last epoch's training state, and `<stem>.state.prev.pt`, the one before.

    `stem` is a location in the run's storage (a local path or an object-store URL). A crash at any point of a
    save leaves a readable state: the new one is written completely under a temporary name before the current one
    becomes the previous one and the new one takes its place."""

    def __init__(self, stem: str):
        self.stem = str(stem)
        self.current = self.stem + ".state.pt"
        self.previous = self.stem + ".state.prev.pt"

    def save(self, state: dict) -> None:
        temporary = write_temporary(self.current, torch_bytes(state))
        if exists(self.current):
            move(self.current, self.previous)
        move(temporary, self.current)

    def load(self, logger) -> dict | None:
        """The newest readable state; an unreadable file is reported by name and skipped."""
        for location in (self.current, self.previous):
            try:
                return torch_load(read_bytes(location))
            except FileNotFoundError:
                continue
            except Exception as error:  # noqa: BLE001 - truncated or corrupted: any load failure
                logger.warning("%s: unreadable epoch checkpoint (%s: %s); skipping it", location, type(error).__name__,
                               error)
        return None

    def clear(self) -> None:
        for location in (self.current, self.previous):
            remove(location)
