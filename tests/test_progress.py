"""A training phase's progress: a live line on a terminal, periodic plain lines elsewhere, a Prefect progress
artifact as epochs finish (tests/test_flow.py reads the artifacts of a real flow run)."""

from __future__ import annotations

import io
import logging
import re

import pytest
from rich.console import Console

from configs.errors import UserError
from tasks.progress import CONSOLE_ONLY, PhaseProgress, QuietConsole, log_every_s


def train(progress: PhaseProgress, epochs: int, batches: int, clock: list[float] | None = None) -> None:
    for epoch in range(progress.epoch_now, epochs + 1):
        for batch in range(1, batches + 1):
            if clock is not None:
                clock[0] += 1.0  # one second per batch
            progress.batch(batch, batches)
        progress.epoch(epoch, f"pretrain epoch {epoch}/{epochs} loss/train 0.5000", "loss/train 0.5000")
    progress.close(finished=True)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """A fake monotonic clock for tasks.progress: the tests advance it."""
    now = [1000.0]
    monkeypatch.setattr("tasks.progress.time.monotonic", lambda: now[0])
    return now


def test_off_a_terminal_a_phase_logs_its_first_and_last_epoch_and_a_line_every_interval_with_an_eta(
        monkeypatch, caplog, clock):
    monkeypatch.setenv("TWOSTAGE_PROGRESS_EVERY_S", "10")
    caplog.set_level(logging.INFO)
    train(PhaseProgress("pretrain", 4, 1, logging.getLogger("phase")), epochs=4, batches=6, clock=clock)
    lines = [record.getMessage() for record in caplog.records]
    # 24 batches of 1 s: a line at the end of epoch 1 (6 s), then one each time 10 s have passed, and the last epoch
    assert lines[0] == "pretrain epoch 1/4 loss/train 0.5000, 1.0 it/s, ETA 0:00:18"
    assert lines[1] == "pretrain epoch 3/4: batch 4/6, 1.0 it/s, ETA 0:00:08"
    assert lines[-1] == "pretrain epoch 4/4 loss/train 0.5000"
    assert len(lines) == 3, lines


def test_zero_seconds_logs_every_epoch_and_a_resumed_phase_counts_from_its_saved_epoch(monkeypatch, caplog, clock):
    monkeypatch.setenv("TWOSTAGE_PROGRESS_EVERY_S", "0")
    caplog.set_level(logging.INFO)
    train(PhaseProgress("pretrain", 5, 3, logging.getLogger("phase")), epochs=5, batches=2, clock=clock)
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" loss")[0] for line in lines] == [f"pretrain epoch {e}/5" for e in (3, 4, 5)]
    assert lines[0].endswith("ETA 0:00:04")  # 2 epochs of 2 batches left at 1 batch/s


def test_a_phase_that_stops_early_still_logs_its_last_epoch(monkeypatch, caplog, clock):
    monkeypatch.setenv("TWOSTAGE_PROGRESS_EVERY_S", "60")
    caplog.set_level(logging.INFO)
    progress = PhaseProgress("head", 10, 1, logging.getLogger("phase"))
    for epoch in (1, 2, 3):
        clock[0] += 1
        progress.epoch(epoch, f"head epoch {epoch}/10", "")
    progress.close(finished=True)
    assert [record.getMessage().split(",")[0] for record in caplog.records] == ["head epoch 1/10", "head epoch 3/10"]


def test_on_a_terminal_the_live_line_shows_epoch_batch_speed_eta_and_metrics_and_the_log_lines_are_console_only(
        monkeypatch, caplog):
    monkeypatch.setenv("TWOSTAGE_PROGRESS_EVERY_S", "0")
    caplog.set_level(logging.INFO)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=150, color_system=None)
    progress = PhaseProgress("pretrain", 3, 1, logging.getLogger("phase"), console=console)
    train(progress, epochs=3, batches=5)
    last = screen.getvalue().replace("\r", "\n").splitlines()[-2]
    assert re.search(r"pretrain +━+ 100% epoch 3/3 batch done [\d.]+ it/s \d:\d\d:\d\d ETA \d:\d\d:\d\d "
                     r"loss/train 0\.5000", last), last
    assert [getattr(record, CONSOLE_ONLY, False) for record in caplog.records] == [True] * 3  # still in the logs


def test_the_console_filter_drops_progress_lines_and_completed_task_states_on_a_terminal_only():
    def record(name: str, message: str, **extra) -> logging.LogRecord:
        made = logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)
        made.__dict__.update(extra)
        return made

    epoch = record("prefect.task_runs", "pretrain epoch 3/30 ...", **{CONSOLE_ONLY: True})
    completed = record("prefect.task_runs", "Finished in state Completed()")
    failed = record("prefect.task_runs", "Finished in state Failed('Task run encountered an exception')")
    server = record("prefect", "Starting temporary server on http://127.0.0.1:8187\nSee https://...")
    terminal, plain = QuietConsole(terminal=True), QuietConsole(terminal=False)
    assert [terminal.filter(r) for r in (epoch, completed, failed, server)] == [False, False, True, False]
    assert [plain.filter(r) for r in (epoch, completed, failed, server)] == [True, True, True, False]


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("TWOSTAGE_PROGRESS_EVERY_S", value)
    with pytest.raises(UserError, match=r"^TWOSTAGE_PROGRESS_EVERY_S=.* is not a number of seconds; set it to e\.g\. 10"):
        log_every_s()


def test_a_failing_progress_artifact_costs_one_warning_not_the_phase(monkeypatch, caplog, clock):
    monkeypatch.setenv("TWOSTAGE_PROGRESS_EVERY_S", "0")
    updates = []

    def create(progress, description):
        return "artifact-id"

    def update(artifact_id, progress, description):
        updates.append(progress)
        raise ConnectionError("the Prefect server is gone")

    progress = PhaseProgress("head", 3, 1, logging.getLogger("phase"), artifact=(create, update))
    train(progress, epochs=3, batches=2, clock=clock)
    assert updates == [100 / 3]  # the first update failed; no more were tried
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["head: the Prefect progress artifact is not updated any more (ConnectionError: the Prefect "
                        "server is gone)"]
