"""Who may train a phase key, or decide a registry champion, right now: one holder at a time, released even when
the holder dies.

Prefect's transactions take a `LockManager` (SERIALIZABLE isolation: the first run trains a key, the others wait
and then reuse its result). Which one is as wide as the storage the phases share:

- a local folder: the OS's advisory file locks beside it (`ProcessLockManager`, the filelock library);
- an object store, shared by workers on several hosts: the Prefect server's global concurrency limits, one slot per
  key, held under a lease (`ConcurrencyLimitLocks`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
from filelock import FileLock, Timeout
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.locking.protocol import LockManager

from tasks.files import is_local


def locks_for(storage: str) -> LockManager:
    """The lock manager as wide as `storage` (see the module's docstring)."""
    return ProcessLockManager(Path(storage) / "locks") if is_local(storage) else ConcurrencyLimitLocks()


@contextmanager
def holding(locks: LockManager, key: str) -> Iterator[None]:
    """Hold `key`'s lock for the block (waiting for it first)."""
    holder = f"{os.getpid()}-{threading.get_ident()}"
    locks.acquire_lock(key, holder)
    try:
        yield
    finally:
        locks.release_lock(key, holder)


class _HeldLocks(LockManager):
    """What both lock managers keep alike: the locks this process holds, by key, with their holder. A subclass
    takes a key's lock (`_take`: the held object, None on timeout), frees it, and answers is_locked and
    wait_for_lock."""

    def __init__(self):
        self._held: dict[str, tuple[Any, str]] = {}

    def _take(self, key: str, timeout: float | None) -> Any | None:
        raise NotImplementedError

    def _free(self, lock: Any) -> None:
        raise NotImplementedError

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        if key in self._held:
            return self._held[key][1] == holder
        lock = self._take(key, acquire_timeout)
        if lock is None:
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
        self._free(lock)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return key in self._held and self._held[key][1] == holder

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)


class ProcessLockManager(_HeldLocks):
    """Prefect's LockManager over the OS's advisory file locks (the filelock library).

    A lock is released when the process holding it ends, even by kill -9, so a crashed phase never blocks the next
    run. (Prefect's FileSystemLockManager keeps a dead holder's lock until its hold timeout, and Prefect's
    transactions set none: the next run would wait forever.)
    """

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = Path(directory)

    def _lock(self, key: str) -> FileLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        return FileLock(self.directory / f"{key}.lock", thread_local=False)

    def _take(self, key: str, timeout: float | None) -> FileLock | None:
        lock = self._lock(key)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            return None
        return lock

    def _free(self, lock: FileLock) -> None:
        lock.release()

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        return not self.wait_for_lock(key, timeout=0)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Until nobody holds the lock (True), or `timeout` seconds (False)."""
        probe = self._take(key, timeout)
        if probe is None:
            return False
        probe.release()
        return True


class ConcurrencyLimitLocks(_HeldLocks):
    """Prefect's LockManager over the Prefect server's global concurrency limits: `twostage-lock-<key>`, one slot.

    The holder keeps its slot under a lease that Prefect renews while the holder lives; when the holder dies (kill
    -9, a lost host) the lease runs out and the server frees the slot, so a crashed phase blocks the next attempt
    for at most LEASE_S seconds. Needs a Prefect server that every worker reaches (PREFECT_API_URL).
    """

    LEASE_S = 60.0
    POLL_S = 1.0

    @staticmethod
    def limit_name(key: str) -> str:
        return f"twostage-lock-{key}"

    def _take(self, key: str, timeout: float | None) -> ExitStack | None:
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(self.limit_name(key), limit=1)
        slot = ExitStack()
        try:
            slot.enter_context(concurrency(self.limit_name(key), occupy=1, timeout_seconds=timeout,
                                           lease_duration=self.LEASE_S, strict=True))
        except TimeoutError:
            return None
        return slot

    def _free(self, slot: ExitStack) -> None:
        slot.close()

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        with get_client(sync_client=True) as client:
            try:
                return client.read_global_concurrency_limit_by_name(self.limit_name(key)).active_slots > 0
            except ObjectNotFound:
                return False

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Until nobody holds the lock (True), or `timeout` seconds (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.POLL_S)
        return True
