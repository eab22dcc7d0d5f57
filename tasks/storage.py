"""Where a project's phase state lives, and how it is read back safely.

Under one location (`output_dir`, default `outputs/` in the working folder): checkpoints and epoch states
(`checkpoints/`), Prefect's persisted phase results (`results/`, JSON records) and the locks that keep two
processes from training the same phase key at once (`locks/`). A phase result is reused only from this location,
so a fresh clone never inherits another checkout's phases.

Stored state never executes code. Prefect loads a result record with whatever serializer the record itself
declares, so a record that says "pickle" would be unpickled even with `result_serializer="json"`, and a "json" one
may name its own jsonlib or object hook (`subprocess.call` runs a command). Before a phase runs,
`check_stored_result` reads its record as plain JSON and accepts only a record written with Prefect's default JSON
serializer holding a `Checkpoint`; any other file is moved aside with one warning naming it, and the phase runs
again.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
from filelock import FileLock, Timeout
from prefect.locking.protocol import LockManager
from prefect.serializers import JSONSerializer
from pydantic import ValidationError

from tasks.results import Checkpoint

CHECKPOINT_CLASS = f"{Checkpoint.__module__}.{Checkpoint.__qualname__}"
JSON_RECORDS = JSONSerializer().model_dump(mode="json")  # the serializer our records are written with, exactly


def result_storage(output_dir: Path) -> Path:
    """Prefect's result storage for the phases' persisted results (a path: Prefect makes it a LocalFileSystem)."""
    return Path(output_dir) / "results"


def phase_locks(output_dir: Path) -> ProcessLockManager:
    return ProcessLockManager(Path(output_dir) / "locks")


@contextmanager
def holding(locks: LockManager, key: str) -> Iterator[None]:
    """Hold `key`'s lock for the block (waiting for it first)."""
    holder = f"{os.getpid()}-{threading.get_ident()}"
    locks.acquire_lock(key, holder)
    try:
        yield
    finally:
        locks.release_lock(key, holder)


def check_stored_result(output_dir: Path, key: str) -> str | None:
    """None when the phase's stored result is absent or a JSON record of a Checkpoint; else why not, after moving
    the file aside to `<key>.rejected` (kept for inspection)."""
    path = result_storage(output_dir) / key
    if not path.exists():
        return None
    problem = _record_problem(path.read_bytes())
    if problem is None:
        return None
    os.replace(path, path.with_name(f"{key}.rejected"))
    return f"{path} {problem}, so it was not loaded (moved to {path.name}.rejected)"


def _record_problem(content: bytes) -> str | None:
    try:
        record = json.loads(content)  # plain JSON: no object hooks, nothing imported or constructed
        serializer = record["metadata"]["serializer"]
        if serializer != JSON_RECORDS:  # also a "json" one naming another jsonlib or object hook: those run code too
            return f"declares the serializer {json.dumps(serializer)[:120]}, which can run code when loaded"
        result = json.loads(record["result"])
        if set(result) != {"__class__", "data"} or result["__class__"] != CHECKPOINT_CLASS:
            return f"holds no {CHECKPOINT_CLASS}"
        Checkpoint.model_validate_json(json.dumps(result["data"]), strict=True)
    except (ValueError, TypeError, KeyError, ValidationError) as error:  # JSONDecodeError is a ValueError
        return f"is not a readable result record ({type(error).__name__})"
    return None


class ProcessLockManager(LockManager):
    """Prefect's LockManager over the OS's advisory file locks (the filelock library).

    A lock is released when the process holding it ends, even by kill -9, so a crashed phase never blocks the next
    run. (Prefect's FileSystemLockManager keeps a dead holder's lock until its hold timeout, and Prefect's
    transactions set none: the next run would wait forever.)
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._held: dict[str, tuple[FileLock, str]] = {}

    def _lock(self, key: str) -> FileLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        return FileLock(self.directory / f"{key}.lock", thread_local=False)

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        if key in self._held:
            return self._held[key][1] == holder
        lock = self._lock(key)
        try:
            lock.acquire(timeout=-1 if acquire_timeout is None else acquire_timeout)
        except Timeout:
            return False
        self._held[key] = (lock, holder)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"{holder} holds no lock on {key}")
        lock, _ = self._held.pop(key)
        lock.release()

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        return not self.wait_for_lock(key, timeout=0)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return key in self._held and self._held[key][1] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Until nobody holds the lock (True), or `timeout` seconds (False)."""
        probe = self._lock(key)
        try:
            probe.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            return False
        probe.release()
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)
