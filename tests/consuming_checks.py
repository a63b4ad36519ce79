"""What the consume tests assert again and again: every letter recorded once, acked, nothing left behind."""
from __future__ import annotations

import subprocess
import uuid
from collections import defaultdict

import pika
from django.conf import settings

from messaging.models import Delivery, Message
from tests.conftest import rabbitmqctl_command


def connect() -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(settings.RABBITMQ_URL.split(",")[0]))


def publish(queue: str, count: int, *, prefix: str = "", body: bytes | None = None, exchange: str = "",
            routing_key: str | None = None, declare: bool = False) -> list[str]:
    """Publish `count` persistent letters with message_ids (confirmed); return the ids.

    `declare`: declare `queue` durable first (as `consume --durable` would) so that nothing is dropped.
    """
    prefix = prefix or uuid.uuid4().hex[:8]
    ids = [f"{prefix}-{i}" for i in range(count)]
    conn = connect()
    try:
        channel = conn.channel()
        if declare:
            channel.queue_declare(queue=queue, durable=True)
        channel.confirm_delivery()
        for i, message_id in enumerate(ids):
            channel.basic_publish(
                exchange=exchange, routing_key=queue if routing_key is None else routing_key,
                body=body if body is not None else f"letter {i}".encode(),
                properties=pika.BasicProperties(message_id=message_id, delivery_mode=2),
            )
    finally:
        conn.close()
    return ids


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    out = subprocess.run(rabbitmqctl_command(*args), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"rabbitmqctl {' '.join(args)}: {out.stderr}"
    return out.stdout


def queue_counts(name: str) -> tuple[int, int] | None:
    """(ready, unacked) of a queue as the broker sees them now; None when it does not exist."""
    out = rabbitmqctl("list_queues", "-q", "--no-table-headers", "name", "messages_ready", "messages_unacknowledged")
    for line in out.splitlines():
        parts = line.split("\t")
        if parts[0] == name:
            return int(parts[1]), int(parts[2])
    return None


def consumers(queue: str) -> int:
    """Consumers of `queue` now (0 when it does not exist), by a passive declare."""
    conn = connect()
    try:
        return conn.channel().queue_declare(queue=queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if conn.is_open:
            conn.close()


def acked_count(queue: str) -> int:
    """Letters whose delivery on `queue` is acked (committed rows)."""
    return Delivery.objects.filter(queue=queue, status=Delivery.Status.ACKED).order_by().values("message").distinct().count()


def assert_exactly_once(queue: str, message_ids: list[str], *, settled_unknown_ok: int = 0) -> dict:
    """Every letter has one `Message` and one delivery that was acked; the queue is empty.

    Earlier deliveries of a letter must be recorded as requeued; later ones as acked duplicates. The
    acked one is a duplicate itself only when the handler ran on an earlier delivery that was lost.
    `settled_unknown_ok`: how many deliveries may stay 'received' — after a kill -9, an ack may have
    reached the broker while the process died before writing it down.
    Returns a few figures for the caller's own assertions.
    """
    messages = dict(Message.objects.filter(message_id__in=message_ids).values_list("pk", "message_id"))
    assert len(messages) == len(message_ids), f"{len(message_ids) - len(messages)} letters not recorded"
    by_message = defaultdict(list)
    for d in Delivery.objects.filter(queue=queue).order_by("pk"):
        by_message[d.message_id].append(d)
    assert set(by_message) == set(messages), "deliveries of letters not published by this test"
    unknown, redelivered = 0, 0
    for pk, deliveries in by_message.items():
        trail = f"{messages[pk]}: {[(d.attempt, d.status, d.duplicate) for d in deliveries]}"
        final = [d for d in deliveries if d.status in (Delivery.Status.ACKED, Delivery.Status.RECEIVED)][:1]
        assert final, trail
        # A duplicate only if its handler already ran on an earlier delivery that was never acked.
        assert not final[0].duplicate or any(d.handled_at for d in deliveries if d.pk < final[0].pk), trail
        unknown += final[0].status == Delivery.Status.RECEIVED
        assert [d.attempt for d in deliveries] == list(range(1, len(deliveries) + 1)), messages[pk]
        for d in deliveries:
            if d.attempt > 1:
                redelivered += 1
                assert d.redelivered, f"{messages[pk]} attempt {d.attempt} not flagged redelivered"
            if d.pk < final[0].pk:
                assert d.status == Delivery.Status.REQUEUED, (messages[pk], d.attempt, d.status)
            elif d.pk > final[0].pk:
                assert d.duplicate and d.status == Delivery.Status.ACKED, (messages[pk], d.attempt, d.status)
    assert unknown <= settled_unknown_ok, f"{unknown} deliveries left 'received'"
    counts = queue_counts(queue)
    assert counts in (None, (0, 0)), f"queue {queue} not empty: ready, unacked = {counts}"
    return {"redelivered": redelivered, "unknown": unknown}
