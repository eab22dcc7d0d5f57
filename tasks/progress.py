"""How a training phase shows its progress: a live line on a terminal (rich, through Prefect's console), plain
periodic log lines elsewhere (CI, workers, files), and a Prefect progress artifact the UI shows as epochs finish.

The live line holds the phase, a bar over all its batches, the epoch, the batch within it, batches per second,
elapsed time, the estimated time left and the latest epoch's metrics. Log lines come at most every
`TWOSTAGE_PROGRESS_EVERY_S` seconds (default 10; 0: every epoch), and always for the first and last epoch; each
epoch's metrics are in the phase's MLflow run whatever the setting. On a terminal the epoch lines still go to
Prefect's API (the UI's logs) but not to the console, which shows the live line instead.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable

from rich.console import Console
from rich.default_styles import DEFAULT_STYLES
from rich.errors import MissingStyle
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text
from rich.theme import Theme

from configs.errors import UserError

EVERY_S_VARIABLE = "TWOSTAGE_PROGRESS_EVERY_S"
LIVE_EVERY_S = 0.05  # the live line's numbers: updated at most this often (rich redraws it 4 times a second)
ARTIFACT_EVERY_S = 2.0  # the Prefect progress artifact: one API call per epoch at most this often
CONSOLE_ONLY = "twostage_progress"  # a log record carrying this attribute is a progress line (see quiet_console)

PROGRESS_THEME = Theme({name: style for name, style in DEFAULT_STYLES.items() if name.startswith(("progress.", "bar."))},
                       inherit=False)


def log_every_s() -> float:
    """Seconds between plain progress lines, from TWOSTAGE_PROGRESS_EVERY_S."""
    text = os.environ.get(EVERY_S_VARIABLE, "10")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserError(f"{EVERY_S_VARIABLE}={text!r} is not a number of seconds; set it to e.g. 10, or 0 for a line "
                        "every epoch")
    return value


def terminal_console() -> Console | None:
    """The rich console Prefect logs to, when `quiet_console` set this process up for a live line and the console is
    a terminal (so the live line and log lines share it); else None. Not in a worker's or a served flow's process,
    even one started in a terminal: several flow runs may share it.

    Prefect's console has a theme of its own, without rich's progress styles: they are pushed onto it."""
    if not _live_lines:
        return None
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            console = getattr(handler, "console", None)
            if isinstance(console, Console) and console.is_terminal and not console.is_dumb_terminal:
                try:
                    console.get_style("bar.back")
                except MissingStyle:
                    console.push_theme(PROGRESS_THEME)
                return console
    return None


class BatchesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} it/s" if task.speed else "- it/s", style="progress.data.speed")


class PhaseProgress:
    """The progress of one training phase. `batch` is called after every optimizer step, `epoch` after every epoch.

    artifact: a Prefect progress artifact's (create, update) functions, or None outside a Prefect run.
    console: a terminal's console for the live line, or None for plain log lines.
    """

    def __init__(self, phase: str, epochs: int, first_epoch: int, logger: logging.Logger | logging.LoggerAdapter,
                 artifact: tuple[Callable, Callable] | None = None, console: Console | None = None):
        self.phase, self.epochs, self.logger = phase, epochs, logger
        self.every_s = log_every_s()
        self.started = self.logged_at = time.monotonic()
        self.epoch_now, self.first_epoch = first_epoch, first_epoch
        self.per_epoch = 0  # batches per epoch, known at the first batch
        self.trained = 0  # batches trained by this process
        self.unlogged: str | None = None  # the last epoch's line, when it was not logged
        self.drawn_at = -float("inf")
        self.update_artifact = artifact[1] if artifact else None
        self.artifact_id = None
        self.artifact_at = -float("inf")
        if artifact is not None and epochs > 0:
            self._artifact(lambda: setattr(self, "artifact_id", artifact[0](
                progress=100.0 * (first_epoch - 1) / epochs, description=self._describe(first_epoch - 1))))
        self.live: Progress | None = None
        if console is not None and epochs > 0:
            fixed = dict(table_column=Column(no_wrap=True))  # on a narrow terminal the metrics are cut, not these
            self.live = Progress(
                TextColumn("{task.description:<8}", **fixed), BarColumn(bar_width=16), TaskProgressColumn(),
                TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}", **fixed),
                TextColumn("batch {task.fields[batch]}", **fixed), BatchesPerSecond(**fixed), TimeElapsedColumn(),
                TextColumn("ETA", **fixed), TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                console=console, refresh_per_second=4, expand=True,
            )
            self.task = self.live.add_task(phase, total=None, epoch=first_epoch, epochs=epochs, batch="-",
                                           metrics="")
            self.live.start()

    def batch(self, done: int, per_epoch: int) -> None:
        """`done` of this epoch's `per_epoch` batches are trained."""
        self.trained += 1
        if self.live is not None:
            if self.per_epoch != per_epoch:  # the first batch: now the total is known
                self.per_epoch = per_epoch
                self.live.update(self.task, total=per_epoch * self.epochs)
            now = time.monotonic()
            if now - self.drawn_at >= LIVE_EVERY_S or done == per_epoch:  # the line redraws 4 times a second
                self.drawn_at = now
                self.live.update(self.task, completed=per_epoch * (self.epoch_now - 1) + done,
                                 batch=f"{done}/{per_epoch}")
            return
        self.per_epoch = per_epoch
        if self.every_s and time.monotonic() - self.logged_at >= self.every_s:
            self._log(f"{self.phase} epoch {self.epoch_now}/{self.epochs}: batch {done}/{per_epoch}{self._rate()}")

    def epoch(self, epoch: int, line: str, metrics: str) -> None:
        """Epoch `epoch` ended: `line` is its log line, `metrics` its metrics in short."""
        self.epoch_now = epoch + 1
        now = time.monotonic()
        self.unlogged = line
        if epoch in (self.first_epoch, self.epochs) or now - self.logged_at >= self.every_s:
            self._log(line + (self._rate() if epoch < self.epochs else ""))
        if self.live is not None:
            self.live.update(self.task, epoch=min(epoch + 1, self.epochs), metrics=metrics,
                             completed=self.per_epoch * epoch)  # a lone trailing sample is skipped, not a batch
        if epoch == self.epochs or now - self.artifact_at >= ARTIFACT_EVERY_S:
            self._update_artifact(epoch)
            self.artifact_at = now

    def close(self, finished: bool) -> None:
        """Log the last epoch's line if it was not (training stopped early, or failed), bring the artifact up to the
        last epoch, and stop the live line, leaving its last state on the terminal."""
        last = self.epoch_now - 1
        if self.unlogged is not None:
            self._log(self.unlogged)
        if last > self.first_epoch - 1:
            self._update_artifact(last)
        if self.live is not None:
            self.live.update(self.task, epoch=last, batch="done" if finished else "stopped")
            self.live.stop()

    def _update_artifact(self, epoch: int) -> None:
        if self.artifact_id is not None:
            self._artifact(lambda: self.update_artifact(self.artifact_id, progress=100.0 * epoch / self.epochs,
                                                        description=self._describe(epoch)))

    def _artifact(self, call: Callable[[], object]) -> None:
        """A call to Prefect's artifact API: a failure (the server busy or gone) costs the artifact, not the phase,
        which stops updating it after one warning."""
        try:
            call()
        except Exception as error:  # noqa: BLE001 - whatever the API raised, training goes on
            self.logger.warning("%s: the Prefect progress artifact is not updated any more (%s: %s)", self.phase,
                                type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
            self.artifact_id, self.update_artifact = None, None

    def _rate(self) -> str:
        """", 45.2 it/s, ETA 0:02:31": batches per second since the phase started here, and the time left."""
        elapsed = time.monotonic() - self.started
        if not self.trained or not self.per_epoch or elapsed <= 0:
            return ""
        rate = self.trained / elapsed
        left = self.per_epoch * self.epochs - (self.per_epoch * (self.first_epoch - 1) + self.trained)
        return f", {rate:.1f} it/s, ETA {datetime.timedelta(seconds=round(max(left, 0) / rate))}"

    def _log(self, line: str) -> None:
        self.logged_at, self.unlogged = time.monotonic(), None
        self.logger.info(line, extra={CONSOLE_ONLY: True} if self.live is not None else None)

    def _describe(self, epoch: int) -> str:
        return f"{self.phase}: {epoch} of {self.epochs} epochs trained"


class QuietConsole(logging.Filter):
    """What the console shows of Prefect's and our lines on a terminal: not the epoch lines the live line stands
    for, not a task's "Finished in state Completed()" (the phase's line, or its last line, says so), not the
    ephemeral server's start and stop notices (at DEBUG they are shown)."""

    CHATTER = ("Starting temporary server on", "Stopping temporary server on")

    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "prefect" and str(record.msg).startswith(self.CHATTER):
            return logging.getLogger("prefect").isEnabledFor(logging.DEBUG)
        if not self.terminal:
            return True
        if getattr(record, CONSOLE_ONLY, False):
            return False
        return not (record.name.startswith("prefect.task_runs")
                    and record.getMessage().startswith("Finished in state Completed("))


_live_lines: list[bool] = []  # [True] once quiet_console(live=True) ran in this process


def quiet_console(live: bool) -> None:
    """Install QuietConsole on the console handlers Prefect set up (the root logger's and any others'); with `live`
    (`twostage run` and a local sweep: one flow run at a time), training phases draw a live line on a terminal."""
    if live:
        _live_lines[:] = [True]
    terminal = terminal_console() is not None
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(getattr(handler, "console", None), Console) and not any(
                    isinstance(f, QuietConsole) for f in handler.filters):
                handler.addFilter(QuietConsole(terminal))
