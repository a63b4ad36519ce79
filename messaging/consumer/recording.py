"""Recording deliveries: the rows of a batch, committed before the worker acks; then how they settled.

The worker calls these from its database threads; nothing here touches the broker. The order is the
contract: `record_batch` commits the rows, *then* the worker acks. A delivery on a queue without a
handler is written 'acked' in that commit, since nothing can change the outcome any more
(`record_lost` undoes it if the ack cannot be sent); one whose handler runs is written 'received',
and its outcome is written by `record_settled` after the broker was told. How the rows reach the
database is the writer's business (`messaging.consumer.writers`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from django.db import connection, transaction
from django.utils import timezone

from messaging.amqp.codec import json_safe_str
from messaging.amqp.deaths import last_death
from messaging.amqp.stored import to_json
from messaging.amqp.subscription import Received
from messaging.consumer.filing import external_message_row, filed_message_id, stored_name
from messaging.consumer.handlers import Handler, run_handler
from messaging.consumer.linking import link_replies
from messaging.consumer.retries import Retry, retry_of, schedule, stale_copies
from messaging.consumer.trail import BODY_MARKS, EXTERNAL, Filed, anomaly
from messaging.consumer.writers import MESSAGE_COLUMNS, Writer, writer_for
from messaging.models import Delivery, Message, StreamOffset
from messaging.search import SearchIndex

if TYPE_CHECKING:
    from messaging.consumer.streams import Tap


@dataclass(slots=True, kw_only=True)
class Settlement:
    """What to tell the broker about one recorded delivery."""

    delivery_tag: int
    delivery_id: int
    message_id: int
    action: str  # one of Delivery.Status.ACKED / REQUEUED / REJECTED
    duplicate: bool = False
    error: str = ""
    recorded: bool = False  # written with the delivery (no handler): nothing to write after the ack
    retry: Retry | None = None  # requeued through a retry queue: a copy goes there, then the original is acked


def record_batch(
    batch: list[Received], *, worker_id: int | None, handlers: dict[str, Handler] | None = None,
    max_retries: int = 5, settled: list[Settlement] = (), writer: Writer | None = None, retry_delays=(),
    tap: Tap | None = None,
) -> list[Settlement]:
    """Record each delivery (and its message, once) and run its queue's handler; return how to settle them.

    The rows, and `settled` (the outcomes of earlier batches already told to the broker), are committed
    in one transaction first, with the offsets a stream `tap` reached; each handler then runs on its
    own (see `run_handler`), so a handler that fails undoes only its own writes. `writer`: the
    worker's (by default, one for this database).
    `retry_delays` (`--retry-delays`, replacing `max_retries`): a failed attempt n <= len(delays) is
    retried after `retry_delays[n - 1]`, committed on its row before the worker moves it (`retries`).
    """
    writer = writer or writer_for(connection.vendor)
    # The Python work, before taking the write lock.
    prepared = _prepare(batch, handlers, writer.search) if batch else None
    with writer.one_at_a_time(), transaction.atomic():
        if settled:
            record_settled(settled, writer=writer)
        deliveries = _insert(batch, prepared, writer=writer, worker_id=worker_id) if batch else []
        reached = tap.save(batch) if tap is not None else {}
    if reached:
        tap.committed(reached)
    settlements = []
    for r, message_id, d, (status, _) in zip(batch, prepared.ids if prepared else (), deliveries,
                                             prepared.settlement if prepared else ()):
        handler = (handlers or {}).get(r.queue)
        if handler is None or d.duplicate:
            settlements.append(Settlement(
                delivery_tag=r.delivery_tag, delivery_id=d.pk, message_id=d.message_pk, action=ACKED,
                duplicate=d.duplicate, recorded=status == ACKED,
            ))
        else:
            action, error = run_handler(handler=handler, message_pk=d.message_pk, delivery_pk=d.pk, attempt=d.attempt,
                                        max_retries=len(retry_delays) if retry_delays else max_retries,
                                        transaction=writer.handler_transaction(), message_id=message_id, queue=r.queue)
            retry = (schedule(delivery_pk=d.pk, attempt=d.attempt, delays=retry_delays, message_id=message_id)
                     if retry_delays and action == REQUEUED else None)
            settlements.append(Settlement(delivery_tag=r.delivery_tag, delivery_id=d.pk, message_id=d.message_pk,
                                          action=action, error=error, retry=retry))
    return settlements


def record_settled(settlements: list[Settlement], *, writer: Writer | None = None) -> None:
    """Record acks, requeues and rejects after the broker was told (one UPDATE per outcome)."""
    writer = writer or writer_for(connection.vendor)
    now = _adapted(timezone.now())
    with transaction.atomic(savepoint=False):
        for s in settlements:
            if s.error:
                Delivery.objects.filter(pk=s.delivery_id).update(status=s.action, error=s.error)
        by_action: dict[str, list[int]] = {}
        for s in settlements:
            by_action.setdefault(s.action, []).append(s.delivery_id)
        for action, ids in by_action.items():
            writer.settle(action, now, ids)


def record_refused(r: Received, *, worker_id: int | None, reason: str, tap: Tap | None = None) -> Settlement:
    """A message the database refuses as it came (a `DataError`, alone in its batch): record what can be
    kept — its body, message_id and names, not its headers and properties — with a rejected
    delivery that says why. The worker then rejects it (to the queue's dead-letter exchange, if any):
    one such message never holds up the queue, and its body stays in the audit trail. From a stream,
    which takes no reject, it is acked (credit) and the `tap`'s offset moves past it.
    """
    body = bytes(r.body)
    sha256 = hashlib.sha256(body).hexdigest()
    now = timezone.now()
    reason = json_safe_str(reason)
    exchange, routing_key = stored_name(r.exchange), stored_name(r.routing_key)
    message_id, raw_id = filed_message_id(r, has_handler=False)
    with transaction.atomic():
        message, _ = Message.objects.get_or_create(
            message_id=message_id,
            defaults={
                "origin": Message.Origin.EXTERNAL, "status": Message.Status.EXTERNAL, "body": body,
                "body_size": len(body), "body_sha256": sha256, "raw_message_id": raw_id,
                "exchange": exchange, "routing_key": routing_key, "last_error": reason,
            },
        )
        mark = anomaly(filed=(message.pk, message.body_sha256, message.exchange, message.routing_key, message.origin),
                       sha256=sha256, exchange=exchange, routing_key=routing_key, headers=r.properties.headers)
        earlier = Delivery.objects.filter(message=message, queue=r.queue)
        if r.stream_offset is not None:
            earlier = earlier.filter(consumer_tag=r.consumer_tag)  # see `_reader`
        attempt = earlier.count() + 1
        delivery = Delivery.objects.create(
            message=message, queue=r.queue, consumer_tag=r.consumer_tag, delivery_tag=r.delivery_tag,
            redelivered=r.redelivered, attempt=attempt, exchange=exchange, routing_key=routing_key,
            status=Delivery.Status.REJECTED, worker_id=worker_id, settled_at=now, error=reason,
            body_size=len(body), body_sha256=sha256, body=body if mark in BODY_MARKS else None, anomaly=mark,
        )
        reached = tap.save([r]) if tap is not None else {}
    if reached:
        tap.committed(reached)
    action = Delivery.Status.REJECTED if r.stream_offset is None else Delivery.Status.ACKED
    return Settlement(delivery_tag=r.delivery_tag, delivery_id=delivery.pk, message_id=message.pk,
                      action=action, error=reason, recorded=True)


def record_lost(delivery_ids: list[int], *, reason: str) -> None:
    """Deliveries recorded but never acked because the channel closed: the broker requeues them.

    Those written 'acked' with their row (no handler) are undone too; a requeue or reject already
    recorded is kept. A stream's are not lost: their tap's offset, committed with them, moved past them.
    """
    if delivery_ids:
        Delivery.objects.filter(pk__in=delivery_ids, status__in=UNACKED_OR_ACKED_AT_INSERT).exclude(
            queue__in=StreamOffset.objects.values("stream"),
        ).update(
            status=Delivery.Status.REQUEUED, settled_at=timezone.now(), error=reason,
        )


# --- inside the transaction -----------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class Recorded:
    """A delivery row just written."""

    pk: int
    message_pk: int
    attempt: int
    duplicate: bool


@dataclass(slots=True)
class Prepared:
    """A batch turned into database values, before the transaction: message_ids, receipt times, each
    body's sha256, a `Message` row (MESSAGE_COLUMNS) per distinct message in case it is new, and each
    delivery's status and settled_at as written ('acked' when its queue has no handler), and the text
    each new message adds to the search index (by message_id; none on PostgreSQL)."""

    ids: list[str]
    received: list
    digests: list[str]
    messages: dict[str, tuple]
    settlement: list[tuple]  # (status, settled_at) per delivery
    words: dict[str, str]


def _prepare(batch: list[Received], handlers: dict[str, Handler] | None, search: SearchIndex) -> Prepared:
    for r in batch:
        r.exchange, r.routing_key = stored_name(r.exchange), stored_name(r.routing_key)
    received = [_adapted(datetime.fromtimestamp(r.received_at, UTC)) for r in batch]
    ids, raw_ids = [], {}
    for r in batch:
        message_id, raw_id = filed_message_id(r, has_handler=bool(handlers) and r.queue in handlers)
        ids.append(message_id)
        if raw_id is not None:
            raw_ids[message_id] = raw_id
    digests = [hashlib.sha256(r.body).hexdigest() for r in batch]  # each delivery's, and its new message's
    messages: dict[str, tuple] = {}
    firsts = []  # the delivery each row of `messages` is made from
    for r, message_id, received_at, sha256 in zip(batch, ids, received, digests):
        if message_id not in messages:
            messages[message_id] = external_message_row(r, message_id, received_at, sha256=sha256,
                                                         raw_id=raw_ids.get(message_id))
            firsts.append(r)
    acked_now = (ACKED, _adapted(timezone.now()))
    settlement = [(RECEIVED, None) if handlers and r.queue in handlers else acked_now for r in batch]
    # Their words, in case they are new (SQLite's index; PostgreSQL's keeps itself and reads none of this).
    words = search.documents((message_id, row[BODY], to_json(r.properties.headers) if r.properties.headers else {})
                             for (message_id, row), r in zip(messages.items(), firsts))
    return Prepared(ids=ids, received=received, digests=digests, messages=messages, settlement=settlement,
                    words=words)


def _adapted(moment: datetime):
    """A datetime as the database takes it in a raw statement (Django's own adapter)."""
    return connection.ops.adapt_datetimefield_value(moment)


def _insert(batch: list[Received], prepared: Prepared, *, writer: Writer, worker_id: int | None) -> list[Recorded]:
    """Write the batch's new messages and every delivery, with attempt numbers, duplicate and anomaly marks."""
    known: dict[str, Filed] = writer.message_pks(list(prepared.messages))
    new = [row for message_id, row in prepared.messages.items() if message_id not in known]
    inserted = writer.insert_messages(new) if new else {}
    if inserted:
        link_replies(new, inserted, writer=writer)
        if prepared.words:
            writer.search.add({pk: prepared.words[message_id] for message_id, pk in inserted.items()})
    for row in new:
        if row[0] in inserted:
            known[row[0]] = (inserted[row[0]], row[BODY_SHA256], row[EXCHANGE], row[ROUTING_KEY], EXTERNAL)
    missing = [m for m in prepared.messages if m not in known]
    if missing:  # written by a competing worker at the same moment
        known.update(writer.message_pks(missing))

    history = _history(batch, prepared.ids, known, fresh=set(inserted))
    copies = [(i, of, known[message_id][0], r.queue) for i, (r, message_id) in enumerate(zip(batch, prepared.ids))
              if (of := retry_of(r)) is not None]
    stale = stale_copies(copies) if copies else ()
    retried = {copy[0] for copy in copies}
    rows, recorded = [], []
    for r, message_id, received_at, sha256, (status, settled_at) in zip(
            batch, prepared.ids, prepared.received, prepared.digests, prepared.settlement):
        filed = known[message_id]
        message_pk = filed[0]
        previous = history.setdefault((message_pk, _reader(r)), [])
        attempt, duplicate = _attempt(r, previous), bool(previous) and _handled(previous) or len(recorded) in stale
        previous.append((ACKED, True))  # a later copy in this batch is a duplicate
        mark = anomaly(filed=filed, sha256=sha256, exchange=r.exchange, routing_key=r.routing_key,
                       headers=r.properties.headers, retried=len(recorded) in retried)
        rows.append((
            message_pk, r.queue, r.consumer_tag, r.delivery_tag, r.redelivered, attempt, duplicate, r.exchange,
            r.routing_key, status, worker_id, received_at, settled_at, "", len(r.body), sha256,
            bytes(r.body) if mark in BODY_MARKS else None, mark,
        ))
        recorded.append(Recorded(pk=0, message_pk=message_pk, attempt=attempt, duplicate=duplicate))
    for item, pk in zip(recorded, writer.insert_deliveries(rows), strict=True):
        item.pk = pk
    _record_deaths(batch, recorded)
    return recorded


def _record_deaths(batch: list[Received], recorded: list[Recorded]) -> None:
    """Copies dead-lettered or back from a retry queue: their latest `x-death` entry into the death
    columns, one UPDATE per distinct entry (a batch off a dead-letter queue shares most of them)."""
    by_death: dict = {}
    for r, item in zip(batch, recorded):
        headers = r.properties.headers
        death = last_death(headers) if headers and "x-death" in headers else None
        if death is not None:
            by_death.setdefault(death, []).append(item.pk)
    for death, pks in by_death.items():
        Delivery.objects.filter(pk__in=pks).update(**death.as_fields())


# Positions in a `Message` row (MESSAGE_COLUMNS) of what a delivery is compared with.
EXCHANGE, ROUTING_KEY, BODY_SHA256, BODY = (
    MESSAGE_COLUMNS.index(name) for name in ("exchange", "routing_key", "body_sha256", "body"))


RECEIVED, ACKED, REQUEUED = Delivery.Status.RECEIVED.value, Delivery.Status.ACKED.value, Delivery.Status.REQUEUED.value
UNACKED_OR_ACKED_AT_INSERT = (RECEIVED, ACKED)


def _reader(r: Received) -> str | tuple[str, str]:
    """Who a delivery's attempts and duplicates are counted for: its queue, or on a stream the tap that
    read it (its consumer tag names the tap): each tap reads every message, a first time."""
    return r.queue if r.stream_offset is None else (r.queue, r.consumer_tag)


def _history(batch, ids, known, *, fresh: set[str]) -> dict[tuple, list]:
    """Earlier deliveries ([status, handled]) per (message, reader), oldest first, for attempts and duplicates."""
    old = {known[i][0] for i in ids if i not in fresh}
    history: dict[tuple, list[tuple[str, bool]]] = {}
    if not old:
        return history
    queues = {r.queue for r in batch}
    taps = {_reader(r) for r in batch if r.stream_offset is not None}
    rows = Delivery.objects.filter(message_id__in=old, queue__in=queues).order_by("pk").values_list(
        "message_id", "queue", "consumer_tag", "status", "handled_at", "pk",
    )
    latest: dict[tuple, tuple[str, int]] = {}
    unsettled: dict[tuple, list[int]] = {}
    for message_pk, queue, tag, status, handled_at, pk in rows:
        key = (message_pk, (queue, tag) if (queue, tag) in taps else queue)
        history.setdefault(key, []).append([status, handled_at is not None])
        latest[key] = (status, pk)
        if status == Delivery.Status.RECEIVED:
            unsettled.setdefault(key, []).append(pk)
    # A redelivered message was not acked last time, so its latest delivery, if recorded 'acked', lost
    # its ack: written acked with its row and cut off before the ack left (kill -9), or acked as the
    # connection died (a basic.ack is not confirmed). And a delivery of it still 'received' was never
    # acked: the broker requeued it. (A copy that is not redelivered proves neither: the same
    # message_id published twice may be in another worker's handler right now.)
    stale = []
    for key in {(known[i][0], _reader(r)) for r, i in zip(batch, ids) if r.redelivered}:
        stale += unsettled.get(key, ())
        status, pk = latest.get(key, ("", 0))
        if status == Delivery.Status.ACKED:
            stale.append(pk)
            history[key][-1][0] = Delivery.Status.REQUEUED
    record_lost(stale, reason="not acked before the consumer's channel closed; the broker redelivered it")
    return history


def _attempt(r: Received, previous) -> int:
    headers = r.properties.headers
    count = headers.get("x-delivery-count") if headers else None
    # Quorum queues count deliveries themselves (also those lost before their row was written); the
    # database's history counts them on classic queues. Another producer's header of that name may
    # hold anything: out of range it is ignored (a negative count broke the column's CHECK and the
    # batch was retried for ever), and within range it never counts below the history (a constant
    # `x-delivery-count: 0` on a classic queue would requeue a poison message for ever).
    attempt = len(previous) + 1
    if isinstance(count, int) and not isinstance(count, bool) and 0 <= count < MAX_ATTEMPT:  # pika's `long` too
        return max(count + 1, attempt)
    return attempt


MAX_ATTEMPT = 2**31 - 1  # `Delivery.attempt`'s range (a PositiveIntegerField) on every database


def _handled(previous: list[tuple[str, bool]]) -> bool:
    return any(status == Delivery.Status.ACKED or handled for status, handled in previous)
