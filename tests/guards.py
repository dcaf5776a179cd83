"""A test guard: fail, instead of hanging the suite, when a body blocks (a FIFO read, say)."""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def deadline(seconds: int = 5):
    """Raise TimeoutError in the body when it runs longer than ``seconds`` (SIGALRM, main thread)."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s: a read or open is not bounded")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
