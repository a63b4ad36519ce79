"""messaging.backoff: capped exponential backoff with jitter."""
from __future__ import annotations

import random
from itertools import islice

import pytest

from messaging.backoff import backoff_delay, backoff_delays


@pytest.fixture(autouse=True)
def seeded():
    """Many draws, the same ones at each run."""
    state = random.getstate()
    random.seed(20)
    yield
    random.setstate(state)


@pytest.mark.parametrize("attempt, low, high", [(0, 0.5, 1.0), (1, 1.0, 2.0), (3, 4.0, 8.0), (6, 15.0, 30.0)])
def test_each_delay_is_between_half_and_all_of_the_capped_doubling(attempt, low, high):
    delays = [backoff_delay(attempt, base=1.0, cap=30.0) for _ in range(500)]
    assert all(low <= d <= high for d in delays)
    assert max(delays) - min(delays) > (high - low) / 2  # jittered, not one fixed value


def test_a_negative_attempt_counts_as_the_first():
    assert all(0.5 <= backoff_delay(-5, base=1.0, cap=30.0) <= 1.0 for _ in range(100))


def test_a_letter_pending_for_days_does_not_overflow():
    for attempt in (100, 1_000, 10**9):
        assert 150.0 <= backoff_delay(attempt, base=1.0, cap=300.0) <= 300.0


def test_successive_delays_grow_to_the_cap_and_never_go_below_start():
    delays = list(islice(backoff_delays(start=1.0, cap=30.0), 12))
    assert 1.0 <= delays[0] <= 2.0 and 2.0 <= delays[1] <= 4.0 and 4.0 <= delays[2] <= 8.0
    assert all(15.0 <= d <= 30.0 for d in delays[5:])
    short = list(islice(backoff_delays(start=2.0, cap=3.0), 50))
    assert all(2.0 <= d <= 3.0 for d in short)  # the cap's lower half is under start: start wins
