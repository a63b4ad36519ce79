"""Delayed retries, broker-native: a failed letter waits in a retry queue, then comes back to its queue.

`consume QUEUE --retry-delays 1s,10s,1m` declares one retry queue per delay, `QUEUE.retry.1s` …
(`retry_queue`), whose `x-message-ttl` is the delay and whose dead-letter route is the default
exchange with QUEUE as routing key: a message that expires there goes back to QUEUE, never before
its delay. No plugin is needed, and it works on classic and quorum queues alike (RabbitMQ 3.10+).

How a failed letter moves, and why nothing is lost (`kill -9` at any point):

1. The handler fails on attempt n (`Delivery.attempt`: the letter's deliveries on QUEUE, counted by
   the database, so the count survives worker restarts). While n <= len(delays), the delay
   `delays[n - 1]` is committed on its row (`Delivery.retry_delay`); after the last delay the
   letter is rejected to QUEUE's dead-letter exchange (`--dead-letter-queue`) as before.
2. A copy (same body, properties and headers; see `copy_properties`) is published to the retry
   queue with a publisher confirm and `mandatory`.
3. Only then is the original acked, and its row written 'requeued' (`record_settled`).

A crash before 3 leaves the original unacked: the broker redelivers it at once (its row is marked
requeued as not acked, the next attempt counts on). A crash between 2 and 3 leaves a copy too;
it carries `x-mailroom-retry-of` (the failed delivery's pk), and a copy that comes back after a
later delivery of its letter on that queue was recorded is that crash's duplicate: it is recorded
as a duplicate and acked without running the handler (`stale_copies`).

Status of the rows: a failed attempt sent to a retry queue is 'requeued' with `retry_delay` set;
a plain requeue (`--max-retries`) is 'requeued' without it; the last attempt is 'rejected'.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta

import pika
from django.db import DatabaseError
from django.db.models import Max
from django.utils import timezone

from messaging.amqp.deaths import last_death
from messaging.amqp.retry_queues import is_retry_queue, retry_queue
from messaging.models import Delivery

logger = logging.getLogger(__name__)

MAX_DELAYS = 20  # one queue per delay: more would mostly be a typo
MAX_DELAY = timedelta(days=24)  # x-message-ttl is at most 2^32-1 ms (about 49 days); beyond weeks, use a scheduler
RETRY_OF = "x-mailroom-retry-of"  # header on a retry copy: the pk of the delivery whose failure made it
UNITS = {"ms": timedelta(milliseconds=1), "s": timedelta(seconds=1), "m": timedelta(minutes=1),
         "h": timedelta(hours=1), "d": timedelta(days=1)}
DELAY = re.compile(r"(\d+)(ms|s|m|h|d)")
QUEUE_NAME_BYTES = 255  # the broker's limit on a queue name


@dataclass(frozen=True, slots=True)
class Retry:
    """A failed delivery on its way to a retry queue: how long it waits and the letter's message_id."""

    delay: timedelta
    message_id: str  # as recorded: the copy carries it when the original had none


def schedule(*, delivery_pk: int, attempt: int, delays, message_id: str) -> Retry | None:
    """Commit the delay chosen after failed attempt `attempt` on its row; None if the database refuses
    (then the letter is requeued at once, as without retry queues: never moved before its row says so)."""
    retry = Retry(delay=delays[attempt - 1], message_id=message_id)
    try:
        Delivery.objects.filter(pk=delivery_pk).update(retry_delay=retry.delay)
    except DatabaseError as exc:
        logger.error("delivery=%s could not record its retry delay (%s); requeued at once", delivery_pk, exc)
        return None
    return retry


def parse_delays(text: str) -> tuple[timedelta, ...]:
    """`--retry-delays`: "1s,10s,1m,2h" (units ms, s, m, h, d) → delays; raise ValueError saying what is wrong."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise ValueError(f"{text!r}: give delays separated by commas, e.g. 1s,10s,1m")
    if len(parts) > MAX_DELAYS:
        raise ValueError(f"{len(parts)} delays: at most {MAX_DELAYS} (each has its own retry queue)")
    delays = []
    for part in parts:
        match = DELAY.fullmatch(part)
        if not match:
            raise ValueError(f"{part!r} is not a delay: a whole number and a unit (ms, s, m, h, d), e.g. 10s")
        delay = int(match[1]) * UNITS[match[2]]
        if delay <= timedelta(0):
            raise ValueError(f"{part!r}: a delay must be more than zero")
        if delay > MAX_DELAY:
            raise ValueError(f"{part!r}: at most {MAX_DELAY.days} days")
        delays.append(delay)
    return tuple(delays)


def check_names(queues, delays) -> None:
    """Raise ValueError when a retry queue's name would pass the broker's 255-byte limit."""
    for queue in queues:
        for delay in delays:
            name = retry_queue(queue, delay)
            if len(name.encode()) > QUEUE_NAME_BYTES:
                raise ValueError(f"the retry queue name {name[:60]!r}… is longer than {QUEUE_NAME_BYTES} bytes")


def copy_properties(properties, *, retry_of: int, message_id: str) -> pika.BasicProperties:
    """The properties of a retry copy: the original's, with its message_id (the recorded one if it had
    none, so that the copy is filed under the same letter and its attempts are counted) and
    `x-mailroom-retry-of`. `x-delivery-count` (a quorum queue's count for that message) is
    dropped, and so is `user_id`, which the broker refuses unless it is the publishing user's.
    """
    headers = dict(properties.headers or {})
    headers.pop("x-delivery-count", None)
    headers[RETRY_OF] = retry_of
    return pika.BasicProperties(
        content_type=properties.content_type, content_encoding=properties.content_encoding, headers=headers,
        delivery_mode=properties.delivery_mode, priority=properties.priority,
        correlation_id=properties.correlation_id, reply_to=properties.reply_to, expiration=properties.expiration,
        message_id=properties.message_id or message_id, timestamp=properties.timestamp, type=properties.type,
        app_id=properties.app_id, cluster_id=properties.cluster_id,
    )


def retry_of(received) -> int | None:
    """The pk of the failed delivery that this delivery is the retry copy of, if it came from a retry queue.

    Only a copy that expired from one of its queue's retry queues counts: a letter replayed from a
    dead-letter queue (last dead-lettered by the queue itself) keeps the header but is not a copy.
    """
    headers = received.properties.headers
    value = headers.get(RETRY_OF) if headers else None
    if type(value) is not int:
        return None
    death = last_death(headers)
    if death is None or death.reason != "expired" or not is_retry_queue(death.queue, of=received.queue):
        return None
    return value


def stale_copies(copies: list[tuple[int, int, int, str]]) -> set[int]:
    """Which `copies` ((index, pk it is a retry of, message pk, queue) each) are a crash's duplicates.

    A copy is stale when a delivery of its letter on that queue was recorded after the failed one:
    the broker redelivered the original (the worker died between the copy's confirm and the
    original's ack). A failed delivery still 'received' is marked requeued: its copy came back, so
    it was acked or, redelivered, is already marked so.
    """
    if not copies:
        return set()
    latest = {
        (message, queue): pk for message, queue, pk in
        Delivery.objects.filter(message_id__in={c[2] for c in copies}, queue__in={c[3] for c in copies})
        .values("message_id", "queue").annotate(latest=Max("pk")).values_list("message_id", "queue", "latest")
        .order_by()
    }
    Delivery.objects.filter(pk__in=[c[1] for c in copies], status=Delivery.Status.RECEIVED).update(
        status=Delivery.Status.REQUEUED, settled_at=timezone.now(),
    )
    return {index for index, of, message, queue in copies if latest.get((message, queue), 0) > of}
