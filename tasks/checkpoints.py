"""A phase's final weights: a state-dict file in the run's storage with its sha256, checked on every read."""

from __future__ import annotations

import hashlib

from models.networks import TwoStageModel, build_model
from tasks.files import read_bytes, torch_load
from tasks.results import Checkpoint


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_problem(checkpoint: Checkpoint) -> str | None:
    """Why a recorded checkpoint can't be used (missing, or different bytes), or None when it is intact."""
    try:
        _verified_bytes(checkpoint)
    except ValueError as error:
        return str(error)
    return None


def load_model(checkpoint: Checkpoint, device: str) -> TwoStageModel:
    """Rebuild the network and load the checkpoint's weights, read once and checked against its sha256."""
    try:
        data = _verified_bytes(checkpoint)
    except ValueError as error:
        raise ValueError(f"{checkpoint.phase} checkpoint unusable: {error}") from None
    model = build_model(checkpoint.model, checkpoint.input_shape, checkpoint.num_classes)
    model.load_state_dict(torch_load(data, map_location=device))
    return model.to(device)


def _verified_bytes(checkpoint: Checkpoint) -> bytes:
    try:
        data = read_bytes(checkpoint.path)
    except FileNotFoundError:
        raise ValueError(f"{checkpoint.path} is missing") from None
    actual = sha256(data)
    if actual != checkpoint.sha256:
        raise ValueError(f"{checkpoint.path} has sha256 {actual[:12]}, not the recorded {checkpoint.sha256[:12]}")
    return data
