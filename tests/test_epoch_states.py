"""Epoch states in a local folder or an object store (fsspec's in-memory file system stands in for one): atomic,
the previous one kept, a corrupted one reported by name and skipped."""

from __future__ import annotations

import logging

import fsspec
import pytest
import torch

from tasks.epoch_states import EpochStates
from tasks.files import exists, read_bytes


@pytest.fixture(params=["local folder", "object store"])
def location(request, tmp_path):
    if request.param == "local folder":
        yield str(tmp_path)
        return
    yield f"memory://{tmp_path.name}"
    fsspec.filesystem("memory").rm(f"memory://{tmp_path.name}", recursive=True)


def overwrite(location: str, data: bytes) -> None:
    with fsspec.open(location, "wb") as file:
        file.write(data)


def test_save_keeps_the_previous_state_and_load_returns_the_newest(location):
    states = EpochStates(f"{location}/pretrain-abc")
    states.save({"epoch": 1, "weights": torch.ones(3)})
    states.save({"epoch": 2, "weights": torch.ones(3) * 2})
    assert exists(states.current) and exists(states.previous)
    assert states.load(logging.getLogger("test"))["epoch"] == 2
    fs, root = fsspec.core.url_to_fs(location)
    assert not fs.glob(f"{root}/*.tmp")


def test_a_truncated_state_falls_back_to_the_previous_one_with_a_warning_naming_the_file(location, caplog):
    states = EpochStates(f"{location}/head-abc")
    states.save({"epoch": 1, "weights": torch.ones(1000)})
    states.save({"epoch": 2, "weights": torch.ones(1000)})
    data = read_bytes(states.current)
    overwrite(states.current, data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        assert states.load(logging.getLogger("test"))["epoch"] == 1
    assert str(states.current) in caplog.text and "unreadable epoch checkpoint" in caplog.text


def test_a_crash_between_the_two_renames_of_a_save_leaves_the_previous_state_to_resume_from(location):
    states = EpochStates(f"{location}/finetune-abc")
    states.save({"epoch": 1})
    states.save({"epoch": 2})
    fsspec.core.url_to_fs(location)[0].rm_file(fsspec.core.url_to_fs(states.current)[1])  # moved, not yet replaced
    assert states.load(logging.getLogger("test"))["epoch"] == 1


def test_with_every_state_corrupted_training_starts_over(location):
    states = EpochStates(f"{location}/finetune-abc")
    states.save({"epoch": 1})
    states.save({"epoch": 2})
    overwrite(states.current, b"garbage")
    overwrite(states.previous, b"")
    assert states.load(logging.getLogger("test")) is None


def test_clear_removes_both_states(location):
    states = EpochStates(f"{location}/x")
    states.save({"epoch": 1})
    states.save({"epoch": 2})
    states.clear()
    assert not exists(states.current) and not exists(states.previous)
