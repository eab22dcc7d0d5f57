"""Epoch states on disk: atomic, the previous one kept, a corrupted one reported by name and skipped."""

from __future__ import annotations

import logging

import torch

from tasks.epoch_states import EpochStates


def test_save_keeps_the_previous_state_and_load_returns_the_newest(tmp_path):
    states = EpochStates(tmp_path / "pretrain-abc")
    states.save({"epoch": 1, "weights": torch.ones(3)})
    states.save({"epoch": 2, "weights": torch.ones(3) * 2})
    assert states.current.exists() and states.previous.exists()
    assert states.load(logging.getLogger("test"))["epoch"] == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_a_truncated_state_falls_back_to_the_previous_one_with_a_warning_naming_the_file(tmp_path, caplog):
    states = EpochStates(tmp_path / "head-abc")
    states.save({"epoch": 1, "weights": torch.ones(1000)})
    states.save({"epoch": 2, "weights": torch.ones(1000)})
    data = states.current.read_bytes()
    states.current.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        assert states.load(logging.getLogger("test"))["epoch"] == 1
    assert str(states.current) in caplog.text and "unreadable epoch checkpoint" in caplog.text


def test_with_every_state_corrupted_training_starts_over(tmp_path):
    states = EpochStates(tmp_path / "finetune-abc")
    states.save({"epoch": 1})
    states.save({"epoch": 2})
    states.current.write_bytes(b"garbage")
    states.previous.write_bytes(b"")
    assert states.load(logging.getLogger("test")) is None


def test_clear_removes_both_states(tmp_path):
    states = EpochStates(tmp_path / "x")
    states.save({"epoch": 1})
    states.save({"epoch": 2})
    states.clear()
    assert not states.current.exists() and not states.previous.exists()
