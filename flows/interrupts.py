"""How `twostage run` and `twostage serve` stop on Ctrl-C and SIGTERM.

`twostage run`: either signal stops the run within a batch, as a KeyboardInterrupt that Prefect records as a
crash; the MLflow runs end KILLED, nothing is registered, the epoch state on disk stays for the same command to
resume, and the exit code is 128 + the signal (130, 143). A terminal's Ctrl-C goes to the whole foreground
process group, Prefect's ephemeral server included, which died at once and took the crash report with it: so the
server is started with SIGINT blocked (children inherit the signal mask), and ends when the run does.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Stopped:
    """Which signal stopped the run, once one has."""

    signum: int | None = None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum in (None, signal.SIGINT) else signal.Signals(self.signum).name


@contextmanager
def stop_on_signals() -> Iterator[Stopped]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, and say which one it was.

    Prefect's flow engine swaps in its own SIGTERM handler while a flow runs; on a SIGTERM it reports the crash,
    then calls the handler it replaced, this one.
    """
    stopped = Stopped()

    def interrupt(signum, frame):
        stopped.signum = stopped.signum or signum
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopped
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def start_ephemeral_server_shielded() -> None:
    """Start Prefect's ephemeral server now, with SIGINT blocked so that the server never sees a terminal's Ctrl-C.

    Nothing to do when PREFECT_API_URL names a server. A Ctrl-C during the start is delivered once it is done.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with get_client(sync_client=True) as client:
            client.hello()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def stop_serving_on_ctrl_c(grace_s: float) -> None:
    """Make one Ctrl-C stop `twostage serve` within `grace_s` seconds.

    asyncio turns a first Ctrl-C into a cancellation of Prefect's runner, which Prefect's runner swallows and
    goes on serving: 3.8 did on a loaded machine, 3.9.1 every time (6 of 6 serves still running 60 s after
    Ctrl-C, idle or loaded). Instead the first Ctrl-C raises KeyboardInterrupt at once, Prefect pauses the
    schedule and shuts down (1.6-1.8 s here), and a timer ends the process if that shutdown stalls.
    Flow runs started by the runner are processes of their own: they get the same Ctrl-C from the terminal.
    """

    def force_exit() -> None:
        print(f"twostage serve: Prefect's shutdown took over {grace_s:.0f} s; stopping now", file=sys.stderr, flush=True)
        os._exit(0)

    def interrupt(signum, frame):
        timer = threading.Timer(grace_s, force_exit)
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
