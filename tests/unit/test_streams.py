"""Stream taps without a broker: `--offset`'s values, where a tap starts, and its offset committed
with its batch (the worker against the stand-in of tests/unit/test_consumer_seam.py)."""
from __future__ import annotations

from datetime import UTC, datetime

import pika
import pytest

from messaging.amqp.subscription import Received, stream_offset
from messaging.consumer import worker as worker_module
from messaging.consumer.streams import Tap, parse_offset
from messaging.consumer.worker import ConsumeOptions, Consumer
from messaging.errors import ConnectionLost
from messaging.models import Delivery, Message, StreamOffset
from tests.unit.test_consumer_seam import FakeSubscription, fake_broker  # noqa: F401 — the fixture

TAG = "tap:default:s"


@pytest.mark.parametrize(("text", "offset"), [
    ("first", "first"), ("LAST", "last"), (" next ", "next"), ("0", 0), ("1500", 1500),
    ("2026-12-07T10:00:00Z", datetime(2026, 12, 7, 10, tzinfo=UTC)),
    ("2026-12-07 10:00", datetime(2026, 12, 7, 10, tzinfo=UTC)),  # naive: UTC
])
def test_offsets_a_tap_takes(text, offset):
    assert parse_offset(text) == offset


@pytest.mark.parametrize("text", ["", "-1", "1.5", "yesterday", "first,last"])
def test_offsets_refused_with_a_sentence(text):
    with pytest.raises(ValueError, match="not first, last, next"):
        parse_offset(text)


def test_the_offset_header_is_read_only_when_it_is_one():
    def props(value):
        return pika.BasicProperties(headers={"x-stream-offset": value})

    assert stream_offset(props(7)) == 7
    assert [stream_offset(props(v)) for v in ("7", -1, True, None)] == [None] * 4
    assert stream_offset(pika.BasicProperties()) is None


def test_where_a_tap_starts_without_the_database():
    tap = Tap(streams=("a", "b"), name="audit", offset="first")
    assert {s: start.offset for s, start in tap.starts().items()} == {"a": "first", "b": "first"}
    tap.committed({"a": 41})  # after a reconnect: where this process got to, whatever --offset said
    starts = tap.starts()
    assert (starts["a"].offset, starts["b"].offset) == (42, "first")
    assert starts["a"].consumer_tag == "tap:audit:a"
    assert len(Tap(streams=("é" * 200,), name="n" * 200).consumer_tag("é" * 200).encode()) <= 255


def stream_delivery(tag: int, offset: int) -> Received:
    return Received(queue="s", consumer_tag=TAG, delivery_tag=tag, redelivered=False, exchange="", routing_key="s",
                    properties=pika.BasicProperties(message_id=f"m-{offset}", headers={"x-stream-offset": offset}),
                    body=b"body", stream_offset=offset)


@pytest.mark.timeout(60)
@pytest.mark.django_db(transaction=True)
def test_a_tap_resumes_after_what_it_committed_also_after_a_reconnect(fake_broker, monkeypatch):  # noqa: F811
    monkeypatch.setattr(worker_module, "backoff_delays", lambda **kwargs: iter([0.01] * 10))
    StreamOffset.objects.create(stream="s", tap="default", offset=9)  # an earlier run's
    fake_broker.script = [[stream_delivery(t, 9 + t) for t in range(1, 6)], [stream_delivery(1, 15)]]
    real_process = FakeSubscription.process

    def process(self, seconds):  # the first connection drops once its five deliveries are acked
        if self is fake_broker.connections[0] and self.acks and self.acks[-1][0] == 5:
            raise ConnectionLost("dropped")
        return real_process(self, seconds)

    monkeypatch.setattr(FakeSubscription, "process", process)
    worker = Consumer(ConsumeOptions(queues=("s",), queue_type="stream", batch_size=2, max_messages=6))
    assert worker.run() == 0
    first, second = fake_broker.connections
    assert first.streams["s"].offset == 10  # after the stored offset
    assert second.streams["s"].offset == 15  # after what this process committed
    assert StreamOffset.objects.get(stream="s", tap="default").offset == 15
    assert Message.objects.count() == 6
    # Committed before the connection dropped: not 'requeued' (the stream does not give them back).
    assert set(Delivery.objects.values_list("status", flat=True)) == {Delivery.Status.ACKED}


@pytest.mark.django_db
def test_a_committed_stream_delivery_is_never_marked_lost():
    """`record_lost` (a connection dropped before the ack): a classic queue gives the message back, a
    stream does not (its tap's offset, committed with the row, moved past it)."""
    from messaging.consumer.recording import record_lost

    message = Message.objects.create(message_id="m", body=b"")
    StreamOffset.objects.create(stream="s", tap="default", offset=0)
    on_stream, on_queue = (Delivery.objects.create(message=message, queue=queue, delivery_tag=1,
                                                   status=Delivery.Status.ACKED) for queue in ("s", "q"))
    record_lost([on_stream.pk, on_queue.pk], reason="the connection dropped")
    on_stream.refresh_from_db()
    on_queue.refresh_from_db()
    assert (on_stream.status, on_queue.status) == (Delivery.Status.ACKED, Delivery.Status.REQUEUED)


@pytest.mark.django_db
def test_a_tap_reading_a_letter_does_not_make_it_delivered():
    """The dashboard's and `reconcile`'s undelivered letters: a tap observes, it is no consumer."""
    from django.utils import timezone

    from messaging.audit.reconciling import undelivered

    letter = Message.objects.create(message_id="l", body=b"", status=Message.Status.PUBLISHED,
                                    published_at=timezone.now(), exchange="orders", routing_key="k")
    StreamOffset.objects.create(stream="orders-audit", tap="default", offset=0)
    Delivery.objects.create(message=letter, queue="orders-audit", delivery_tag=1, exchange="orders", routing_key="k",
                            status=Delivery.Status.ACKED, consumer_tag="tap:default:orders-audit")
    assert list(undelivered(minutes=0)) == [letter]
    Delivery.objects.create(message=letter, queue="orders", delivery_tag=1, exchange="orders", routing_key="k",
                            status=Delivery.Status.ACKED)
    assert list(undelivered(minutes=0)) == []
