"""Flow runs timed back to back on Prefect's ephemeral server, without its sqlite lock in the figures.

Just after a flow run ends, the ephemeral server writes that run's events and task runs to its sqlite
database. A flow run created meanwhile can find the database busy: the server answers HTTP 503, and Prefect's
client sleeps about 2 s before it retries (PrefectHQ/prefect#18934 reports the same lock). A benchmark that
starts flow runs back to back would count these sleeps as the pipeline's. So the benchmarks wait SETTLE_S
before each timed flow run, and count the retry sleeps that still happen (`retry_sleeps`), to show them as
Prefect's: `time_flow_run` does both.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

SETTLE_S = 2.0  # after the previous flow run: the server has stored its events by then
_RETRY = re.compile(r"Another attempt will be made in ([0-9.]+)s")


class _RetrySleeps(logging.Handler):
    """Records the sleep of each retry Prefect's client logs (at DEBUG); passes everything it would have shown
    before on to the `prefect` logger's handlers."""

    def __init__(self, shown_from: int):
        super().__init__(logging.DEBUG)
        self.shown_from = shown_from
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = _RETRY.search(record.getMessage())
        if match:
            self.seconds.append(float(match.group(1)))
        if record.levelno >= self.shown_from:
            logging.getLogger("prefect").handle(record)


@contextmanager
def retry_sleeps() -> Iterator[list[float]]:
    """A list that receives the seconds of every retry sleep Prefect's client takes inside the block."""
    logger = logging.getLogger("prefect.client")
    level, propagate = logger.level, logger.propagate
    handler = _RetrySleeps(shown_from=logger.getEffectiveLevel())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # its DEBUG records reach the console only through the handler, when shown before
    try:
        yield handler.seconds
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def time_flow_run(run: Callable[[], T], settle: bool = True) -> tuple[T, float, float]:
    """Wait SETTLE_S (unless `settle` is false), then call `run`, which starts a flow run.

    Returns its result, its wall seconds and the retry sleeps of Prefect's client within them.
    """
    if settle:
        time.sleep(SETTLE_S)
    with retry_sleeps() as sleeps:
        started = time.perf_counter()
        result = run()
        return result, time.perf_counter() - started, float(sum(sleeps))
