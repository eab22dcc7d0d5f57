"""A phase's final weights: a state-dict file with its sha256, checked before every use."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from models.networks import TwoStageModel, build_model
from tasks.files import save_atomically
from tasks.results import Checkpoint


def save_weights(model: torch.nn.Module, path: Path) -> str:
    """Write the model's state dict to `path` atomically; returns the file's sha256."""
    save_atomically(model.state_dict(), path)
    return _sha256(path)


def checkpoint_problem(checkpoint: Checkpoint) -> str | None:
    """Why a recorded checkpoint can't be used (missing, or different bytes), or None when it is intact."""
    if not Path(checkpoint.path).exists():
        return f"{checkpoint.path} is missing"
    actual = _sha256(checkpoint.path)
    if actual != checkpoint.sha256:
        return f"{checkpoint.path} has sha256 {actual[:12]}, not the recorded {checkpoint.sha256[:12]}"
    return None


def load_model(checkpoint: Checkpoint, device: str) -> TwoStageModel:
    """Rebuild the network and load the checkpoint's weights, after checking the file's sha256."""
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ValueError(f"{checkpoint.phase} checkpoint unusable: {problem}")
    model = build_model(checkpoint.model, checkpoint.input_shape, checkpoint.num_classes)
    model.load_state_dict(torch.load(checkpoint.path, map_location=device, weights_only=True))
    return model.to(device)


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
