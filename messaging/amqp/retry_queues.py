"""The names and TTLs of retry queues (`consume --retry-delays`; the policy is `consumer.retries`).

A queue's retry queue for a delay is `QUEUE.retry.<delay>` (`1500ms`, `10s`, `1m`, `2h`, `1d`): its
`x-message-ttl` is the delay and its dead-letter route the default exchange with QUEUE as routing
key, so that a copy waiting there goes back to QUEUE when its delay is over.
"""
from __future__ import annotations

from datetime import timedelta

RETRY_INFIX = ".retry."  # between a queue's name and the delay, in its retry queues' names


def delay_name(delay: timedelta) -> str:
    """The shortest exact spelling of a delay, as in retry queue names: 1500ms, 10s, 1m, 2h, 1d."""
    ms = round(delay.total_seconds() * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def retry_queue(queue: str, delay: timedelta) -> str:
    """The retry queue of `queue` for `delay`."""
    return f"{queue}{RETRY_INFIX}{delay_name(delay)}"


def ttl_ms(delay: timedelta) -> int:
    """A delay as `x-message-ttl` (milliseconds)."""
    return round(delay.total_seconds() * 1000)


def is_retry_queue(name: str, *, of: str) -> bool:
    """Whether `name` is one of queue `of`'s retry queues (by its name)."""
    return name.startswith(f"{of}{RETRY_INFIX}")
