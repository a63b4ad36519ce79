"""The worker against a stand-in for its broker connection (`amqp.subscription.Subscription`).

No broker: the stand-in hands the worker scripted deliveries and notes every ack with the rows
committed at that moment, so the record -> commit -> ack order is checked from outside the worker.
SQLite in-process holds the rows. The same paths run against the real broker in tests/test_worker.py.
"""
from __future__ import annotations

import time
from datetime import timedelta

import pika
import pytest

from messaging.amqp.connection import QueueState
from messaging.amqp.subscription import Received
from messaging.consumer import worker as worker_module
from messaging.consumer.retries import RETRY_OF
from messaging.consumer.worker import ConsumeOptions, Consumer
from messaging.errors import ConnectionLost
from messaging.models import Delivery, Message

pytestmark = pytest.mark.django_db(transaction=True)


class FakeSubscription:
    """Delivers `script` (a list per connection: deliveries, or an exception to raise) and notes acks."""

    connections: list[FakeSubscription] = []
    script: list = []
    refuse_copies = 0  # so many retry copies fail to publish

    def __init__(self, *, heartbeat: int, client_name: str, logged_in_before: bool, nodes=None) -> None:
        self.logged_in_before = logged_in_before
        self.plan = FakeSubscription.script.pop(0)
        self.acks: list[tuple[int, bool, int]] = []  # (tag, multiple, deliveries committed then)
        self.nacks: list[tuple[int, bool]] = []
        self.copies: list[tuple[str, object, list, int]] = []  # (queue, properties, retry delays committed, acks then)
        self.on_delivery = None
        FakeSubscription.connections.append(self)

    def declare(self, topology):
        return [QueueState(name=name, message_count=0, consumer_count=0) for name in topology.queues]

    def consume(self, queues, *, prefetch, on_delivery, streams=None):
        self.on_delivery = on_delivery
        self.streams = dict(streams or {})  # where each stream is read from (see `consumer.streams`)

    @property
    def consuming(self) -> bool:
        return self.on_delivery is not None

    def process(self, seconds: float) -> None:
        if isinstance(self.plan, Exception):
            raise self.plan
        if self.plan:
            for received in self.plan:
                self.on_delivery(received)
            self.plan = []
        else:
            time.sleep(min(seconds, 0.01))

    def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        self.acks.append((delivery_tag, multiple, Delivery.objects.count()))

    def nack(self, delivery_tag: int, *, requeue: bool) -> None:
        self.nacks.append((delivery_tag, requeue))

    def publish_copy(self, queue: str, *, body: bytes, properties) -> None:
        if FakeSubscription.refuse_copies:
            FakeSubscription.refuse_copies -= 1
            raise ConnectionLost("the retry queue is missing (unroutable)")
        delays = list(Delivery.objects.exclude(retry_delay=None).values_list("retry_delay", flat=True))
        self.copies.append((queue, properties, delays, len(self.acks)))

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def fake_broker(monkeypatch):
    FakeSubscription.connections, FakeSubscription.script, FakeSubscription.refuse_copies = [], [], 0
    monkeypatch.setattr(worker_module, "Subscription", FakeSubscription)
    return FakeSubscription


def delivery(tag: int, message_id: str, *, redelivered: bool = False) -> Received:
    return Received(queue="q", consumer_tag="ctag", delivery_tag=tag, redelivered=redelivered, exchange="",
                    routing_key="q", properties=pika.BasicProperties(message_id=message_id), body=b"body")


def test_every_delivery_is_committed_before_its_ack(fake_broker):
    fake_broker.script = [[delivery(tag, f"m-{tag}") for tag in range(1, 26)]]
    worker = Consumer(ConsumeOptions(queues=("q",), batch_size=10, max_messages=25))
    assert worker.run() == 0
    [connection] = fake_broker.connections
    acked = set()
    for tag, multiple, committed in connection.acks:
        acked |= set(range(1, tag + 1)) if multiple else {tag}
        assert committed >= tag  # the rows of every delivery this ack covers were committed first
    assert acked == set(range(1, 26)) and not connection.nacks
    assert Message.objects.count() == 25 == Delivery.objects.filter(status=Delivery.Status.ACKED).count()
    assert worker.counts.acked == 25


def test_a_redelivered_copy_is_a_second_delivery_of_one_message(fake_broker):
    fake_broker.script = [[delivery(1, "same"), delivery(2, "same", redelivered=True)]]
    worker = Consumer(ConsumeOptions(queues=("q",), batch_size=10, max_messages=2))
    assert worker.run() == 0
    assert Message.objects.filter(message_id="same").count() == 1
    rows = list(Delivery.objects.order_by("pk").values_list("attempt", "duplicate", "redelivered"))
    assert rows == [(1, False, False), (2, True, True)]  # acked before: the copy is a duplicate


def test_a_handler_that_fails_is_requeued_then_rejected(fake_broker):
    fake_broker.script = [[delivery(1, "poison"), delivery(2, "poison", redelivered=True)]]
    worker = Consumer(ConsumeOptions(queues=("q",), batch_size=1, max_messages=2, max_retries=1,
                                     handler="tests.handlers.fail"))
    assert worker.run() == 0
    [connection] = fake_broker.connections
    assert connection.nacks == [(1, True), (2, False)]  # requeued within max_retries, then rejected
    statuses = list(Delivery.objects.order_by("pk").values_list("status", flat=True))
    assert statuses == [Delivery.Status.REQUEUED, Delivery.Status.REJECTED]
    assert "RuntimeError" in Delivery.objects.last().error


def test_a_lost_connection_is_reconnected_with_the_login_remembered(fake_broker, monkeypatch):
    monkeypatch.setattr(worker_module, "backoff_delays", lambda **kwargs: iter([0.01] * 10))
    fake_broker.script = [ConnectionLost("the broker closed the connection"), [delivery(1, "after")]]
    worker = Consumer(ConsumeOptions(queues=("q",), max_messages=1))
    assert worker.run() == 0
    first, second = fake_broker.connections
    assert (first.logged_in_before, second.logged_in_before) == (False, True)
    assert worker.counts.reconnects == 1 and second.acks and Message.objects.filter(message_id="after").exists()


def test_a_retry_copy_is_confirmed_after_its_delay_is_committed_and_before_the_ack(fake_broker):
    fake_broker.script = [[delivery(1, "poison")]]
    worker = Consumer(ConsumeOptions(queues=("q",), batch_size=1, max_messages=1, handler="tests.handlers.fail",
                                     retry_delays=(timedelta(seconds=5),)))
    assert worker.run() == 0
    [connection] = fake_broker.connections
    [(queue, properties, delays, acks_before)] = connection.copies
    assert queue == "q.retry.5s" and delays == [timedelta(seconds=5)] and acks_before == 0
    row = Delivery.objects.get()
    assert properties.message_id == "poison" and properties.headers[RETRY_OF] == row.pk
    assert [tag for tag, _, _ in connection.acks] == [1] and not connection.nacks  # acked, not requeued
    assert (row.status, row.retry_delay) == (Delivery.Status.REQUEUED, timedelta(seconds=5))
    assert worker.counts.requeued == 1


def test_a_copy_that_cannot_be_published_leaves_the_original_unacked(fake_broker, monkeypatch):
    monkeypatch.setattr(worker_module, "backoff_delays", lambda **kwargs: iter([0.01] * 10))
    fake_broker.refuse_copies = 1
    fake_broker.script = [[delivery(1, "poison")], [delivery(1, "poison", redelivered=True)]]
    worker = Consumer(ConsumeOptions(queues=("q",), batch_size=1, max_messages=1, handler="tests.handlers.fail",
                                     retry_delays=(timedelta(seconds=1), timedelta(seconds=2))))
    assert worker.run() == 0
    first, second = fake_broker.connections
    assert not first.acks and not first.nacks and not first.copies
    assert [queue for queue, *_ in second.copies] == ["q.retry.2s"] and [tag for tag, *_ in second.acks] == [1]
    rows = list(Delivery.objects.order_by("pk").values_list("attempt", "status", "retry_delay"))
    assert rows == [(1, "requeued", timedelta(seconds=1)), (2, "requeued", timedelta(seconds=2))]
    assert "not acked" in Delivery.objects.order_by("pk").first().error
