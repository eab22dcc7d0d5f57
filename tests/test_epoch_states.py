"""Epoch states in a local folder or an object store (fsspec's in-memory file system stands in for one): each
written once and whole, the one before the newest kept, a corrupted one reported by name and skipped."""

from __future__ import annotations

import logging

import fsspec
import pytest
import torch

from tasks.epoch_states import EpochStates
from tasks.files import exists, name_of, read_bytes, torch_bytes, write_atomically


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


def test_save_keeps_the_state_before_the_newest_and_load_returns_the_newest(location):
    states = EpochStates(f"{location}/pretrain-abc")
    for epoch in (1, 2, 3):
        states.save({"epoch": epoch, "weights": torch.ones(3) * epoch})
    assert [name_of(saved) for saved in states.saved()] == ["pretrain-abc.state.e000002.pt", "pretrain-abc.state.e000003.pt"]
    assert states.load(logging.getLogger("test"))["epoch"] == 3
    fs, root = fsspec.core.url_to_fs(location)
    assert not fs.glob(f"{root}/*.tmp")


def test_a_save_writes_the_state_once(location, monkeypatch):
    """On an object store a rename is a copy and a delete: a save must not move states around."""
    import tasks.epoch_states as module

    writes = []
    monkeypatch.setattr(module, "write_atomically", lambda where, data: (writes.append(where), write_atomically(where, data)))
    states = EpochStates(f"{location}/head-abc")
    for epoch in (1, 2, 3):
        states.save({"epoch": epoch})
    assert [name_of(where) for where in writes] == [f"head-abc.state.e00000{epoch}.pt" for epoch in (1, 2, 3)]


def test_a_truncated_state_falls_back_to_the_one_before_with_a_warning_naming_the_file(location, caplog):
    states = EpochStates(f"{location}/head-abc")
    states.save({"epoch": 1, "weights": torch.ones(1000)})
    states.save({"epoch": 2, "weights": torch.ones(1000)})
    data = read_bytes(states.location(2))
    overwrite(states.location(2), data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        assert states.load(logging.getLogger("test"))["epoch"] == 1
    assert name_of(states.location(2)) in caplog.text and "unreadable epoch checkpoint" in caplog.text


def test_a_crash_before_a_save_deleted_the_oldest_state_resumes_from_the_newest_and_the_next_save_tidies_up(location):
    states = EpochStates(f"{location}/finetune-abc")
    states.save({"epoch": 1})
    states.save({"epoch": 2})
    write_atomically(states.location(3), torch_bytes({"epoch": 3}))  # written; the process died before deleting
    assert states.load(logging.getLogger("test"))["epoch"] == 3
    states.save({"epoch": 4})
    assert [name_of(saved)[-10:] for saved in states.saved()] == ["e000003.pt", "e000004.pt"]


def test_states_of_another_phase_key_or_a_partial_upload_elsewhere_are_not_this_phases(location):
    states = EpochStates(f"{location}/finetune-abc")
    EpochStates(f"{location}/finetune-abcd").save({"epoch": 9})
    overwrite(f"{location}/finetune-abc.state.e000005.pt.1234.tmp", b"partial")
    assert states.saved() == [] and states.load(logging.getLogger("test")) is None


def test_with_every_state_corrupted_training_starts_over(location):
    states = EpochStates(f"{location}/finetune-abc")
    states.save({"epoch": 1})
    states.save({"epoch": 2})
    overwrite(states.location(2), b"garbage")
    overwrite(states.location(1), b"")
    assert states.load(logging.getLogger("test")) is None


def test_clear_removes_the_states(location):
    states = EpochStates(f"{location}/x")
    states.save({"epoch": 1})
    states.save({"epoch": 2})
    states.clear()
    assert states.saved() == [] and not exists(states.location(2))
