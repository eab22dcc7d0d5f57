"""Choosing the torch device; probed only when asked, never at import time."""

from __future__ import annotations

import torch

from configs.errors import ConfigError


def resolve_device(name: str) -> str:
    """'auto' picks CUDA, then Apple's MPS, then the CPU; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA device; set device: auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: mps was asked for but this torch build has no MPS device; set device: auto or cpu")
    return name
