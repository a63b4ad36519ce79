"""Capped exponential backoff with jitter: reconnects and database retries of the worker and the
relay, and the relay's next attempt at a pending letter."""
from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delay(attempt: int, *, base: float, cap: float) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first): between half and all of
    min(cap, base · 2^attempt). The jitter spreads the processes one outage stopped all at once; the
    exponent is bounded, so a letter pending for days (~1,000 attempts) cannot overflow a float."""
    ceiling = min(cap, base * 2 ** min(max(0, attempt), 32))
    return random.uniform(ceiling / 2, ceiling)


def backoff_delays(*, start: float = 1.0, cap: float = 30.0) -> Iterator[float]:
    """Successive delays: 1–2 s, 2–4 s, 4–8 s … then between cap/2 and `cap`; never sooner than
    `start` (at most one attempt a second)."""
    attempt = 0
    while True:
        yield max(start, backoff_delay(attempt, base=2 * start, cap=cap))
        attempt += 1
