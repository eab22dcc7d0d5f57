"""The key a training phase's result is cached under (Prefect) and its epoch states are filed under (ours)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect.cache_policies import CacheKeyFnPolicy

from configs.schema import ModelConfig, fingerprint
from tasks.results import Checkpoint, DataBundle, LabeledSubset, RunContext
from tasks.weights import weights_identity

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def code_fingerprint(root: Path = SOURCE_ROOT) -> str:
    """sha256 of every module of `models/` and `tasks/` under `root`: the code that trains, loads data and
    checkpoints."""
    digest = hashlib.sha256()
    for path in sorted([*(root / "models").glob("*.py"), *(root / "tasks").rglob("*.py")]):
        digest.update(f"{path.relative_to(root)}".encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


CODE_FINGERPRINT = code_fingerprint()


def input_key(task_name: str, parameters: dict[str, Any]) -> str:
    """What a phase's result depends on: its configs, upstream fingerprints, the seed, `amp` as resolved and the code.

    The code is CODE_FINGERPRINT, not only the task function's source (Prefect's TASK_SOURCE): a change to the
    training loop, the networks or the objectives must not reuse results the old code made. Not the run ids,
    paths or the flow run: the same inputs give the same key in any later flow run. Only head and finetune take
    a `LabeledSubset`, so pretraining, which sees no labels, is keyed without them.
    """

    def identity(value: Any) -> Any:
        if isinstance(value, RunContext):  # not the device or compile: they change results only within noise
            return [value.seed, value.amp]
        if isinstance(value, DataBundle | LabeledSubset):
            return value.fingerprint
        if isinstance(value, Checkpoint):
            return value.sha256
        if isinstance(value, ModelConfig) and (weights := weights_identity(value)):  # a backbone's starting weights
            return [value.model_dump(mode="json", exclude={"weights"}), weights]  # by content, not path
        return value

    return fingerprint(task_name, CODE_FINGERPRINT, *(identity(value) for _, value in sorted(parameters.items())))


# Prefect reuses a phase's persisted result when its inputs and our code are unchanged.
PHASE_CACHE = CacheKeyFnPolicy(cache_key_fn=lambda context, parameters: input_key(context.task.name, parameters))
