"""The database side of consuming: record a batch of deliveries, run handlers, record how they settled.

`consuming.Worker` calls these from its database thread; nothing here touches the broker. The order
is the contract: `record_batch` commits the rows, *then* the worker acks, *then* `record_settled`.
"""
from __future__ import annotations

import hashlib
import logging
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import Count, OuterRef, Subquery
from django.utils import timezone

from messaging import broker
from messaging.models import Delivery, Message

logger = logging.getLogger(__name__)

Handler = Callable[[Message], Any]


@dataclass(slots=True, kw_only=True)
class Received:
    """One delivery as it came off the channel, before it is recorded."""

    queue: str
    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    properties: Any  # pika.BasicProperties, read by broker.read_properties
    body: bytes
    received_at: datetime = field(default_factory=timezone.now)


@dataclass(slots=True, kw_only=True)
class Settlement:
    """What to tell the broker about one recorded delivery."""

    delivery_tag: int
    delivery_id: int
    message_id: int
    action: str  # one of Delivery.Status.ACKED / REQUEUED / REJECTED
    duplicate: bool = False
    error: str = ""


def record_batch(
    batch: list[Received], *, worker_id: int | None, handlers: dict[str, Handler] | None = None,
    max_retries: int = 5,
) -> list[Settlement]:
    """Record each delivery (and its letter, once) and run its queue's handler; return how to settle them.

    The rows are committed in one transaction first; each handler then runs in a transaction of its
    own, so a handler that fails rolls back only its own writes.
    """
    with transaction.atomic():
        deliveries = _insert(batch, worker_id=worker_id)
    handlers = handlers or {}
    settlements = []
    for r, d in zip(batch, deliveries):
        handler = handlers.get(r.queue)
        if handler is None or d.duplicate:
            settlements.append(Settlement(
                delivery_tag=r.delivery_tag, delivery_id=d.pk, message_id=d.message_id, action=Delivery.Status.ACKED,
                duplicate=d.duplicate,
            ))
        else:
            settlements.append(_handle(r, d, handler=handler, max_retries=max_retries))
    return settlements


def record_settled(settlements: list[Settlement]) -> None:
    """Record acks, requeues and rejects after the broker was told (one UPDATE per outcome)."""
    now = timezone.now()
    by_action: dict[str, list[Settlement]] = {}
    with transaction.atomic():
        for s in settlements:
            if s.error:
                Delivery.objects.filter(pk=s.delivery_id).update(status=s.action, settled_at=now, error=s.error)
            by_action.setdefault(s.action, []).append(s)
        for action, group in by_action.items():
            Delivery.objects.filter(pk__in=[s.delivery_id for s in group if not s.error]).update(
                status=action, settled_at=now,
            )
            count = Delivery.objects.filter(message_id=OuterRef("pk")).order_by().values("message_id").annotate(
                n=Count("pk")).values("n")
            Message.objects.filter(pk__in={s.message_id for s in group}).update(
                delivery_count=Subquery(count), last_delivery_status=action, last_delivered_at=now,
            )


def record_lost(delivery_ids: list[int], *, reason: str) -> None:
    """Deliveries recorded but never settled because the channel closed: the broker requeues them."""
    if delivery_ids:
        Delivery.objects.filter(pk__in=delivery_ids, status=Delivery.Status.RECEIVED).update(
            status=Delivery.Status.REQUEUED, settled_at=timezone.now(), error=reason,
        )


# --- inside the transaction -----------------------------------------------------------------------
def _insert(batch: list[Received], *, worker_id: int | None) -> list[Delivery]:
    ids = [_message_id(r) for r in batch]
    known = dict(Message.objects.filter(message_id__in=set(ids)).values_list("message_id", "pk"))
    new: dict[str, Message] = {}
    for r, message_id in zip(batch, ids):
        if message_id not in known and message_id not in new:
            new[message_id] = _external_message(r, message_id)
    if new:
        # ignore_conflicts: a competing worker may record the same letter at the same moment.
        Message.objects.bulk_create(new.values(), ignore_conflicts=True)
        known.update(Message.objects.filter(message_id__in=list(new)).values_list("message_id", "pk"))

    history = _history(batch, ids, known, fresh=set(new))
    deliveries = []
    for r, message_id in zip(batch, ids):
        message_pk = known[message_id]
        previous = history.setdefault((message_pk, r.queue), [])
        deliveries.append(Delivery(
            message_id=message_pk, queue=r.queue, consumer_tag=r.consumer_tag, delivery_tag=r.delivery_tag,
            redelivered=r.redelivered, attempt=_attempt(r, previous), duplicate=_handled(previous),
            exchange=r.exchange, routing_key=r.routing_key, worker_id=worker_id, received_at=r.received_at,
        ))
        previous.append((Delivery.Status.ACKED, True))  # a later copy in this batch is a duplicate
    return Delivery.objects.bulk_create(deliveries)


def _message_id(r: Received) -> str:
    message_id = r.properties.message_id
    if message_id:
        return broker.json_safe_str(str(message_id))[:255]
    if r.redelivered:
        # A letter without message_id recorded before the consumer died: find it by its content.
        found = _unsettled_match(r)
        if found:
            return found
    return str(uuid.uuid4())


def _unsettled_match(r: Received) -> str | None:
    sha = hashlib.sha256(r.body).hexdigest()
    return (
        Delivery.objects.filter(
            queue=r.queue, status__in=[Delivery.Status.RECEIVED, Delivery.Status.REQUEUED],
            message__body_sha256=sha, message__origin=Message.Origin.EXTERNAL, message__routing_key=r.routing_key,
        )
        .order_by("-pk").values_list("message__message_id", flat=True).first()
    )


def _external_message(r: Received, message_id: str) -> Message:
    message = Message(
        message_id=message_id, origin=Message.Origin.EXTERNAL, status=Message.Status.EXTERNAL,
        exchange=r.exchange, routing_key=r.routing_key, created_at=r.received_at,
        **broker.read_properties(r.properties),
    )
    message.set_body(r.body)
    return message


def _history(batch, ids, known, *, fresh: set[str]) -> dict[tuple[int, str], list[tuple[str, bool]]]:
    """Earlier deliveries (status, handled) per (message, queue), for attempts and duplicates."""
    old = {known[i] for i in ids if i not in fresh}
    history: dict[tuple[int, str], list[tuple[str, bool]]] = {}
    if not old:
        return history
    queues = {r.queue for r in batch}
    rows = Delivery.objects.filter(message_id__in=old, queue__in=queues).values_list(
        "message_id", "queue", "status", "handled_at", "pk",
    )
    stale = []
    for message_pk, queue, status, handled_at, pk in rows:
        history.setdefault((message_pk, queue), []).append((status, handled_at is not None))
        if status == Delivery.Status.RECEIVED:
            stale.append(pk)
    # A delivery still 'received' when its letter comes again was never acked: the broker requeued it.
    record_lost(stale, reason="not acked before the consumer's channel closed; the broker redelivered it")
    return history


def _attempt(r: Received, previous: list[tuple[str, bool]]) -> int:
    count = (r.properties.headers or {}).get("x-delivery-count") if r.properties.headers else None
    if isinstance(count, int):  # quorum queues count deliveries themselves
        return count + 1
    return len(previous) + 1


def _handled(previous: list[tuple[str, bool]]) -> bool:
    return any(status == Delivery.Status.ACKED or handled for status, handled in previous)


# --- handlers -------------------------------------------------------------------------------------
def _handle(r: Received, delivery: Delivery, *, handler: Handler, max_retries: int) -> Settlement:
    settle = Settlement(
        delivery_tag=r.delivery_tag, delivery_id=delivery.pk, message_id=delivery.message_id,
        action=Delivery.Status.ACKED,
    )
    try:
        with transaction.atomic():
            handler(Message.objects.get(pk=delivery.message_id))
            Delivery.objects.filter(pk=delivery.pk).update(handled_at=timezone.now())
    except Exception:  # noqa: BLE001 — any handler error is recorded, never lost
        error = traceback.format_exc()
        settle.error = error[-10000:]
        retries_left = delivery.attempt <= max_retries
        settle.action = Delivery.Status.REQUEUED if retries_left else Delivery.Status.REJECTED
        logger.warning(
            "delivery=%s message=%s handler failed attempt=%s action=%s",
            delivery.pk, delivery.message_id, delivery.attempt, settle.action,
        )
    return settle
