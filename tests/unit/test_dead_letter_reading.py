"""Reading a queue's head through the management API's JSON (a fake at `management.get_requeued`), finding the
dead-letter exchanges, and the queue names of the pages' paths."""
from __future__ import annotations

import base64
from urllib.parse import unquote

import pytest
from django.urls import resolve, reverse

from messaging.amqp import management, peeking
from messaging.web.deadletters import dead_letter_exchanges, last_line
from messaging.web.display import body_part
from messaging.web.links import queue_from_segment, queue_segment

X_DEATH = [{"count": 2, "reason": "rejected", "queue": "work", "time": 1796650871, "exchange": "",
            "routing-keys": ["work"]}]


@pytest.fixture
def answer(monkeypatch):
    """What the fake management API answers to a get; the arguments it was called with."""
    calls = []

    def set_answer(items):
        monkeypatch.setattr(management, "get_requeued",
                            lambda queue, *, count, truncate: calls.append((queue, count, truncate)) or items)
        return calls
    return set_answer


def test_a_peek_reads_bodies_headers_and_deaths(answer):
    calls = answer([
        {"payload": "<b>hi</b>", "payload_encoding": "string", "payload_bytes": 9, "redelivered": False,
         "exchange": "dlx", "routing_key": "work", "message_count": 4,
         "properties": {"message_id": "m-1", "headers": {"x-death": X_DEATH, "note": "<i>"}, "delivery_mode": 2}},
        {"payload": base64.b64encode(bytes(range(8))).decode(), "payload_encoding": "base64", "payload_bytes": 5000,
         "redelivered": True, "exchange": "", "routing_key": "q", "message_count": 3, "properties": {}},
        "not an object",
    ])
    first, second = peeking.peek("q", count=500)
    assert calls == [("q", peeking.MAX_PEEK, peeking.BODY_BYTES)]  # the count is capped
    assert (first.position, first.message_id, first.body, first.size) == (1, "m-1", b"<b>hi</b>", 9)
    assert not first.truncated
    assert first.headers["note"] == "<i>" and "headers" not in first.properties
    assert first.deaths[0].queue == "work" and first.deaths[0].count == 2 and first.remaining == 4
    assert second.body == bytes(range(8)) and second.truncated and second.redelivered and second.message_id == ""


def test_a_peek_of_a_missing_queue_is_none(answer):
    answer(None)
    assert peeking.peek("gone", count=1) is None


def test_malformed_items_do_not_break_a_peek(answer):
    answer([{"payload": "!!", "payload_encoding": "base64", "payload_bytes": "big", "properties": {"headers": 7}},
            {"properties": "nope", "message_count": "x"}])
    first, second = peeking.peek("q", count=2)
    assert first.body == b"!!" and first.size == 2 and first.headers == {}
    assert second.body == b"" and second.properties == {} and second.remaining is None


def test_dead_letter_exchanges_come_from_arguments_and_policies_never_the_default_exchange():
    found = dead_letter_exchanges([
        {"name": "a", "arguments": {"x-dead-letter-exchange": "dlx"}},
        {"name": "b", "arguments": {}, "effective_policy_definition": {"dead-letter-exchange": "dlx"}},
        {"name": "a.retry.5s", "arguments": {"x-dead-letter-exchange": ""}},  # Mailroom's retry queues
        {"name": "c", "arguments": {"x-dead-letter-exchange": 5}}, {"name": "d"},
    ])
    assert found == {"dlx": {"a", "b"}}


@pytest.mark.parametrize("name", [".", "..", "a/b", "a/replay", "%2E", "%", "100%25", "sp ace", "q?x#y", "ü"])
def test_queue_names_round_trip_through_a_page_path(name):
    url = reverse("dead-letter-queue", kwargs={"queue": name})
    decoded = unquote(url)  # what the server resolves
    assert resolve(decoded).kwargs == {"queue": name}
    assert queue_from_segment(queue_segment(name)) == name
    assert "/./" not in url and "/../" not in url


def test_body_part_and_last_line():
    assert body_part(b"caf\xc3", size=10)["text"] == "caf" and body_part(b"caf\xc3", size=10)["truncated"]
    assert body_part(b"\x00\x01", size=2)["binary"] and body_part(b"\x00\x01", size=2)["hex"] == "00 01"
    assert last_line("Traceback (most recent call last):\n  File x\nValueError: no\n\n") == "ValueError: no"
    assert last_line("") == ""
