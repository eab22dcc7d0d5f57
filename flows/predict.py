"""`twostage predict`: classify image files with a registered or logged model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tasks.sources import DataNotFoundError, read_image
from tasks.tracking import load_classifier


def predict(model_uri: str, images: list[str]) -> int:
    """Print `IMAGE: class (probability p)` per image; an unreadable image gets a one-line error.

    Returns 0, or 2 when any image failed. Preprocessing (channels, size, normalisation) comes from the
    metadata logged with the model, so it is exactly the training data's.
    """
    model, meta = load_classifier(model_uri)
    channels, height, width = meta["input_shape"]
    mean = np.asarray(meta["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(meta["std"], dtype=np.float32).reshape(-1, 1, 1)
    failed = 0
    for image in images:
        try:
            pixels = read_image(Path(image), channels, height, width)
        except DataNotFoundError as error:
            print(f"twostage: error: {error}", file=sys.stderr)
            failed += 1
            continue
        batch = ((pixels.astype(np.float32) / 255 - mean) / std)[None]  # (1, C, H, W)
        logits = np.asarray(model.predict(batch))[0]
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        best = int(probabilities.argmax())
        print(f"{image}: {meta['class_names'][best]} (probability {probabilities[best]:.3f})")
    return 2 if failed else 0
