"""Where a project's phase state lives, and how its result records are read back safely.

Under one location, the run's `storage` (default `outputs/` in the working folder; an object-store URL such as
`s3://bucket/prefix` shared by every worker): checkpoints and epoch states (`checkpoints/`), Prefect's persisted
phase results (`results/`, JSON records, through Prefect's own result storage: a path for a local folder, a
`RemoteFileSystem` block for a URL) and, for a local folder, the locks that keep two processes from training the
same phase key at once (`locks/`; `tasks.locks` says which locks serve an object store). A phase result is reused
only from this location, so a fresh clone never inherits another checkout's phases.

Stored state never executes code. Prefect loads a result record with whatever serializer the record itself
declares, so a record that says "pickle" would be unpickled even with `result_serializer="json"`, and a "json" one
may name its own jsonlib or object hook (`subprocess.call` runs a command). Before a phase runs,
`check_stored_result` reads its record as plain JSON and accepts only a record written with Prefect's default JSON
serializer holding a `Checkpoint`; any other file is moved aside with one warning naming it, and the phase runs
again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect.filesystems import RemoteFileSystem, WritableFileSystem
from prefect.serializers import JSONSerializer
from pydantic import ValidationError

from tasks.files import is_local, join, move, read_bytes
from tasks.results import Checkpoint

CHECKPOINT_CLASS = f"{Checkpoint.__module__}.{Checkpoint.__qualname__}"
JSON_RECORDS = JSONSerializer().model_dump(mode="json")  # the serializer our records are written with, exactly


def result_storage(storage: str) -> Path | WritableFileSystem:
    """Prefect's result storage for the phases' persisted results: a path (Prefect makes it a LocalFileSystem), or
    a RemoteFileSystem block over the object store, saved on the Prefect server (Prefect takes only saved blocks)
    as `remote-file-system/twostage-results-<digest of the URL>`. It holds the URL alone: fsspec finds the
    credentials and endpoint in the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""
    results = join(storage, "results")
    if is_local(storage):
        return Path(results)
    block = RemoteFileSystem(basepath=results)
    block.save(f"twostage-results-{hashlib.sha256(results.encode()).hexdigest()[:16]}", overwrite=True)
    return block


def check_stored_result(storage: str, key: str) -> str | None:
    """None when the phase's stored result is absent or a JSON record of a Checkpoint; else why not, after moving
    the file aside to `<key>.rejected` (kept for inspection)."""
    location = join(storage, "results", key)
    try:
        problem = _record_problem(read_bytes(location))
    except FileNotFoundError:
        return None
    if problem is None:
        return None
    move(location, f"{location}.rejected")
    return f"{location} {problem}, so it was not loaded (moved to {key}.rejected)"


def stored_checkpoint(storage: str, key: str) -> tuple[Checkpoint | None, str | None]:
    """(the Checkpoint stored for the key, None) or (None, why there is none), reading only: for a plan."""
    location = join(storage, "results", key)
    try:
        content = read_bytes(location)
    except FileNotFoundError:
        return None, f"no result is stored under its key {key[:12]} in {join(storage, 'results')}"
    problem = _record_problem(content)
    if problem:
        return None, f"the stored result {location} {problem}"
    return Checkpoint.model_validate(json.loads(json.loads(content)["result"])["data"]), None


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
