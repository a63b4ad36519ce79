"""Replay's plan for one dead-lettered copy: where it goes, its replay's message_id, the headers it keeps."""
from __future__ import annotations

import datetime as dt

import pika

from messaging.amqp.subscription import Received
from messaging.outbox.replay import Step, replay_headers, replay_id, target_of

WHEN = dt.datetime(2026, 12, 7, 13, 0, tzinfo=dt.UTC)
REJECTED = {"count": 1, "reason": "rejected", "queue": "work", "time": WHEN, "exchange": "", "routing-keys": ["work"]}


def copy(*, message_id: str | None = "order-1", body: bytes = b"hello", deaths=(REJECTED,), **headers) -> Received:
    headers = {"x-death": list(deaths), "x-first-death-queue": "work", "x-first-death-reason": "rejected",
               "x-last-death-queue": "work", **headers}
    return Received(queue="work.dlq", consumer_tag="", delivery_tag=1, redelivered=False, exchange="work.dlx",
                    routing_key="work", properties=pika.BasicProperties(message_id=message_id, headers=headers),
                    body=body)


def test_the_target_is_the_latest_death_but_the_dead_letter_queue_itself():
    own = {"count": 1, "reason": "expired", "queue": "work.dlq", "time": WHEN, "exchange": "work.dlx",
           "routing-keys": ["work"]}
    assert target_of(copy(), queue="work.dlq")[0] == "work"
    assert target_of(copy(deaths=(own, REJECTED)), queue="work.dlq")[0] == "work"
    assert target_of(copy(), queue="work.dlq", to_queue="elsewhere")[0] == "elsewhere"
    assert target_of(copy(deaths=()), queue="work.dlq") == ("", None)
    assert target_of(copy(deaths=({"queue": ["not", "a", "name"], "reason": "rejected"},)), queue="work.dlq")[0] == ""


def test_the_replay_id_is_the_same_for_the_same_copy_and_differs_for_another():
    first = replay_id(copy(), target_of(copy(), queue="work.dlq")[1])
    assert first.startswith("order-1~replay:") and len(first) == len("order-1~replay:") + 16
    assert replay_id(copy(), target_of(copy(), queue="work.dlq")[1]) == first  # a rerun finds it
    later = dict(REJECTED, time=WHEN + dt.timedelta(seconds=1))
    assert replay_id(copy(deaths=(later,)), target_of(copy(deaths=(later,)), queue="work.dlq")[1]) != first
    assert replay_id(copy(body=b"other"), target_of(copy(), queue="work.dlq")[1]) != first


def test_a_replay_replayed_again_gets_one_suffix_and_fits_the_column():
    once = replay_id(copy(), None)
    twice = replay_id(copy(message_id=once), None)
    assert twice.count("~replay:") == 1 and twice != once
    long_id = replay_id(copy(message_id="x" * 255), None)
    assert len(long_id) == 255 and long_id.endswith(long_id[-16:]) and "~replay:" in long_id


def test_a_copy_without_message_id_gets_a_fresh_one_each_time():
    assert replay_id(copy(message_id=None), None) != replay_id(copy(message_id=None), None)


def test_the_dead_lettering_history_is_dropped_and_the_rest_kept():
    kept = replay_headers(copy(**{"x-delivery-count": 3, "tenant": "acme", "x-custom": b"\x00"}).properties.headers)
    assert kept == {"tenant": "acme", "x-custom": b"\x00"}
    assert replay_headers(None) == {}


def test_a_step_quotes_untrusted_names():
    line = Step(message_id="<b>\n", target="q", outcome="replayed", replay_id="r").line()
    assert line == "'<b>\\n' -> 'q': replayed as 'r'"
