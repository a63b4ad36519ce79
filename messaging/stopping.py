"""Stopping long-running processes (the worker, the relay) gracefully: a flag, and the signals that set it."""
from __future__ import annotations

import os
import signal
import time


class StopFlag:
    """"Stop when you can", set by a signal handler or another thread; `wait` sleeps until it is set.

    Not a `threading.Event`: its `set` takes a lock that the main thread, interrupted by the signal
    inside that Event's own `wait`, may be holding — the handler would then wait for itself forever.
    A plain attribute cannot deadlock; `wait` looks at it every `STEP` seconds.
    """

    STEP = 0.1

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._set:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, self.STEP))
        return self._set


def stop_on_signals(process) -> None:
    """First SIGINT/SIGTERM: `process.request_stop()`, which finishes what is in hand. A second one
    exits 1 at once: unacked deliveries go back to the queue, unconfirmed letters to the relay."""

    def on_signal(signum, frame):
        if process.stop_requested.is_set():
            os._exit(1)
        process.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
