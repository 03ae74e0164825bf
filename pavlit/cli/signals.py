"""How SIGTERM and SIGINT end a ``pavlit`` command: :class:`Interrupted`, raised in the main thread by the
handler :func:`_signals_end_the_command` installs, and the clean-up :func:`pavlit.cli.main` does before it reports
the signal (progress bars closed; only the first process of a multi-process job prints)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Interrupted(BaseException):
    """A SIGTERM or SIGINT arrived while a command ran (raised in the main thread by :func:`pavlit.cli.main`'s handler).

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it: the
    command unwinds as after any error (open files closed, locks released, Lightning's ``on_exception`` hooks),
    and :func:`pavlit.cli.main` reports it in one line with exit status ``128 + signum``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def _signals_end_the_command() -> Iterator[list[int]]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` while the block runs (main thread only); yields the list
    of signals received. A signal the process was started ignoring (``nohup``) stays ignored."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
        raise Interrupted(signum)

    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum, before in previous.items():
        if before is not signal.SIG_IGN:
            signal.signal(signum, handler)
    try:
        yield received
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before if before is not None else signal.SIG_DFL)


def _first_process() -> bool:
    return all(int(os.environ.get(name) or 0) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _close_progress_bars() -> None:
    # Open tqdm bars would redraw themselves after the message when the interpreter collects them.
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # a bar whose stream is gone; the message matters more
            pass
