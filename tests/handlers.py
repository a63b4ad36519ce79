"""Handler callables for the tests, run by `consume --handler tests.handlers.NAME` subprocesses.

Each receives the `Message`; what a handler did is written to the file named by HANDLER_LOG (one
message_id a line) so a test can count how often it ran.
"""
from __future__ import annotations

import os
import time

from messaging.models import Message


def _log(message: Message) -> None:
    path = os.environ.get("HANDLER_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{message.message_id}\n")


def note(message: Message) -> None:
    """Succeed, and note that it ran."""
    _log(message)


def fail(message: Message) -> None:
    """Fail every time."""
    raise RuntimeError(f"handler refuses {message.message_id}")


def fail_on_poison(message: Message) -> None:
    """Fail for letters whose body starts with b'poison'; note the others."""
    if bytes(message.body).startswith(b"poison"):
        raise ValueError("poison letter")
    _log(message)


def sleep_on_slow(message: Message) -> None:
    """Sleep HANDLER_SLEEP seconds (default 6) for letters whose body is b'slow'."""
    if bytes(message.body) == b"slow":
        time.sleep(float(os.environ.get("HANDLER_SLEEP", "6")))
    _log(message)


def sleep_briefly(message: Message) -> None:
    """A slow worker of the work-queue tutorial: 0.3 s a task."""
    time.sleep(0.3)
    _log(message)


def pause(message: Message) -> None:
    """A little work per letter (10 ms), so a stream lasts long enough to inject a fault into it."""
    time.sleep(0.01)
    _log(message)
