"""`--retry-delays` parsed, its retry queues named, and a retry copy's properties."""
from __future__ import annotations

from datetime import timedelta

import pika
import pytest

from messaging.amqp.retry_queues import delay_name, is_retry_queue, retry_queue, ttl_ms
from messaging.consumer.retries import (
    MAX_DELAYS,
    RETRY_OF,
    check_names,
    copy_properties,
    parse_delays,
)


@pytest.mark.parametrize("text, delays", [
    ("1s,10s,1m,2h", (timedelta(seconds=1), timedelta(seconds=10), timedelta(minutes=1), timedelta(hours=2))),
    (" 250ms , 1d ", (timedelta(milliseconds=250), timedelta(days=1))),
    ("1500ms", (timedelta(milliseconds=1500),)),
])
def test_delays_are_parsed(text, delays):
    assert parse_delays(text) == delays


@pytest.mark.parametrize("text, error", [
    ("", "give delays separated by commas"),
    ("1s,,2s", "give delays separated by commas"),
    ("0s", "more than zero"),
    ("-1s", "is not a delay"),
    ("10", "is not a delay"),
    ("1.5s", "is not a delay"),
    ("5x", "is not a delay"),
    ("30d", "at most 24 days"),
    (",".join(["1s"] * (MAX_DELAYS + 1)), f"at most {MAX_DELAYS}"),
])
def test_bad_delays_say_what_is_wrong(text, error):
    with pytest.raises(ValueError, match=error):
        parse_delays(text)


def test_retry_queues_are_named_by_their_shortest_delay():
    assert [delay_name(d) for d in parse_delays("1000ms,90s,60m,1500ms,24h")] == ["1s", "90s", "1h", "1500ms", "1d"]
    assert retry_queue("work", timedelta(seconds=10)) == "work.retry.10s"
    assert ttl_ms(timedelta(minutes=1)) == 60000
    assert is_retry_queue("work.retry.10s", of="work") and not is_retry_queue("work", of="work")
    with pytest.raises(ValueError, match="longer than 255 bytes"):
        check_names(["q" * 250], parse_delays("1s"))


def test_a_copy_keeps_the_properties_but_the_brokers_counts_and_user():
    original = pika.BasicProperties(
        message_id=None, correlation_id="c", content_type="text/plain", delivery_mode=2, priority=3,
        user_id="someone", headers={"x-delivery-count": 2, "x-death": [{"queue": "q.retry.1s"}], "k": b"v"},
    )
    copy = copy_properties(original, retry_of=42, message_id="recorded-id")
    assert copy.message_id == "recorded-id" and copy.correlation_id == "c" and copy.priority == 3
    assert copy.delivery_mode == 2 and copy.content_type == "text/plain" and copy.user_id is None
    assert copy.headers == {"x-death": [{"queue": "q.retry.1s"}], "k": b"v", RETRY_OF: 42}
    assert original.headers["x-delivery-count"] == 2  # the received properties are left alone
