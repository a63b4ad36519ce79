"""Request/reply without a broker: the wait's bounds, the requester's matching of replies, the sentences said."""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pika
import pytest

from messaging.amqp.replies import DIRECT_REPLY_TO, Requester
from messaging.errors import InvalidMessage
from messaging.models import Message
from messaging.outbox.requests import MAX_WAIT_SECONDS, RequestOutcome, wait_seconds


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), (5, 5.0), (0.25, 0.25),
                                             (MAX_WAIT_SECONDS, MAX_WAIT_SECONDS)])
def test_a_wait_is_none_or_seconds_within_the_cap(value, expected):
    assert wait_seconds(value) == expected


@pytest.mark.parametrize("value", [0, -1, MAX_WAIT_SECONDS + 0.001, math.nan, math.inf, True, "5", [5]])
def test_a_bad_wait_is_a_clear_error(value):
    with pytest.raises(InvalidMessage, match="wait_reply must be"):
        wait_seconds(value)


def test_the_command_may_wait_longer():
    assert wait_seconds(600, maximum=3600) == 600.0


class FakeConnection:
    """Delivers the replies given, one per `process_data_events`, to the requester's callback."""

    def __init__(self, requester: Requester, replies: list[tuple[str, bytes]]) -> None:
        self.requester, self.replies, self.calls = requester, list(replies), 0
        self.is_open = True

    def process_data_events(self, time_limit: float) -> None:
        self.calls += 1
        if self.replies:
            correlation_id, body = self.replies.pop(0)
            method = SimpleNamespace(consumer_tag="amq.ctag-1", delivery_tag=self.calls, redelivered=False,
                                     exchange="", routing_key=f"{DIRECT_REPLY_TO}.abc")
            self.requester._on_reply(None, method, pika.BasicProperties(correlation_id=correlation_id), body)
        else:
            time.sleep(min(time_limit, 0.01))

    def close(self) -> None:
        self.is_open = False


def test_the_requester_takes_the_reply_with_its_correlation_id_and_ignores_others():
    requester = Requester(timeout=1)
    requester._connection = FakeConnection(requester, [("someone-else", b"no"), ("mine", b"42")])
    received = requester.wait(correlation_id="mine", seconds=5)
    assert received.body == b"42" and received.queue == DIRECT_REPLY_TO
    assert received.routing_key == f"{DIRECT_REPLY_TO}.abc" and received.delivery_tag == 2


def test_the_requester_gives_up_at_the_deadline():
    requester = Requester(timeout=1)
    requester._connection = FakeConnection(requester, [])
    started = time.monotonic()
    assert requester.wait(correlation_id="mine", seconds=0.2) is None
    assert time.monotonic() - started < 2


def test_the_sentences_say_what_happened():
    request = Message(message_id="r", status=Message.Status.PUBLISHED, properties={"reply_to": DIRECT_REPLY_TO})
    assert RequestOutcome(request=request, reply=None, wait=5, waited=5).note.startswith("No reply within 5 s")
    assert "dropped by the broker" in RequestOutcome(request=request, reply=None, wait=5, waited=5).note
    named = Message(message_id="r", status=Message.Status.PUBLISHED, properties={"reply_to": "answers"})
    assert "'answers' links one" in RequestOutcome(request=named, reply=None, wait=5, waited=5).note
    reply = Message(message_id="a")
    assert RequestOutcome(request=request, reply=reply, wait=5, waited=0.5).note == "Reply a after 0.50 s."
    failed = Message(message_id="r", status=Message.Status.FAILED, properties={"reply_to": DIRECT_REPLY_TO})
    assert "no reply to wait for" in RequestOutcome(request=failed, reply=None, wait=5, waited=0).note
