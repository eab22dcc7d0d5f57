"""Shared fixtures: one Prefect test server per session, a private MLflow store and working directory per test."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from flows.prefect_defaults import set_prefect_defaults

set_prefect_defaults()  # before Prefect is imported: offline, patient with a new server
# Every epoch's line in the log (not one every 10 s), in this process and the CLIs and workers the tests start:
# tests follow a run by its epoch lines. tests/test_progress.py specifies the periodic lines.
os.environ["TWOSTAGE_PROGRESS_EVERY_S"] = "0"
os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # a sample of MLflow's system metrics in the tiny runs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's test harness (a temporary server and database), started once: it costs ~10 s."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
    from prefect.testing.utilities import prefect_test_harness

    # The harness's own 30 s is tight on a loaded 2-core CI: wait as long as `twostage run` does.
    with prefect_test_harness(server_startup_timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()):
        yield


def pytest_collection_modifyitems(items):
    """Every test that runs flows on the Prefect test server is an `engine` test: `make test-fast` leaves them out."""
    for item in items:
        if "prefect_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)


@contextmanager
def isolated_workdir(path: Path) -> Iterator[Path]:
    """Work in `path` with its own MLflow sqlite store (artifacts in ./mlruns) and Prefect result storage,
    so no test reuses another test's phase results."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with pytest.MonkeyPatch.context() as patch, temporary_settings({PREFECT_LOCAL_STORAGE_PATH: path / "results"}):
        path.mkdir(parents=True, exist_ok=True)
        patch.chdir(path)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path / 'mlflow.db'}")
        yield path


@pytest.fixture
def workdir(tmp_path) -> Iterator[Path]:
    with isolated_workdir(tmp_path):
        yield tmp_path


def tiny_config(**sections) -> dict:
    """A pipeline config on the bundled digits that trains each phase for 2 quick epochs."""
    config = {
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "amp": False,  # float32 on every CI machine, bf16 units or not: the same results everywhere
        "data": {"dataset": "digits"},
        "model": {"encoder_widths": [32, 16], "head_widths": [16]},
        "pretrain": {"epochs": 2, "batch_size": 128},
        "head": {"epochs": 2, "batch_size": 128},
        "finetune": {"epochs": 2, "batch_size": 128},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    return config


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, compress: bool = True) -> None:
    """Write MNIST-format IDX files (`<prefix>-images-idx3-ubyte[.gz]` and labels) as the originals are laid out."""
    folder.mkdir(parents=True, exist_ok=True)
    count, rows, columns = images.shape
    payloads = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, count, rows, columns) + images.astype(np.uint8).tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, count) + labels.astype(np.uint8).tobytes(),
    }
    for name, payload in payloads.items():
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)


def tiny_mnist(folder: Path, train: int = 200, test: int = 50, compress: bool = True, seed: int = 0) -> None:
    """A tiny MNIST-shaped data set of 28x28 images in 10 classes, each class a different bright band."""
    rng = np.random.default_rng(seed)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 40, size=(count, 28, 28))
        for index, label in enumerate(labels):
            images[index, 2 * label + 4 : 2 * label + 7, :] = 250
        write_idx(folder, prefix, images, labels, compress)
