"""The database side of consuming: record a batch of deliveries, run handlers, record how they settled.

`consuming.Worker` calls these from its database thread; nothing here touches the broker. The order
is the contract: `record_batch` commits the rows, *then* the worker acks. A delivery on a queue
without a handler is written 'acked' in that commit, since nothing can change the outcome any more
(`record_lost` undoes it if the ack cannot be sent); one whose handler runs is written 'received',
and its outcome is written by `record_settled` after the broker was told.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import operator
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from datetime import timezone as dt_timezone
from itertools import chain
from typing import Any

from django.conf import settings
from django.db import (
    DEFAULT_DB_ALIAS,
    IntegrityError,
    connection,
    connections,
    transaction,
)
from django.db.models.constants import OnConflict
from django.utils import timezone

from messaging.amqp.codec import json_safe_str, read_properties, text_value
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
    properties: Any  # pika.BasicProperties, read by read_properties
    body: bytes
    received_at: float = field(default_factory=time.time)  # epoch seconds: cheaper to take than a datetime


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


def record_batch(
    batch: list[Received], *, worker_id: int | None, handlers: dict[str, Handler] | None = None,
    max_retries: int = 5, settled: list[Settlement] = (),
) -> list[Settlement]:
    """Record each delivery (and its letter, once) and run its queue's handler; return how to settle them.

    The rows (and `settled`, the outcomes of earlier batches already told to the broker) are committed
    in one transaction first; each handler then runs in a transaction of its own, so a handler that
    fails rolls back only its own writes. A delivery on a queue without a handler is written
    'acked' (`Settlement.recorded`): one write per delivery, where a later UPDATE would double the
    database's work per letter.
    """
    prepared = _prepare(batch, handlers) if batch else None  # the Python work, before taking the write lock
    deliveries, settlements_written = _record_first_receipts(batch, prepared, worker_id=worker_id, settled=settled)
    if deliveries is None:
        with _one_writer(), transaction.atomic():
            if settled and not settlements_written:
                record_settled(settled)
            deliveries = _insert(batch, prepared, worker_id=worker_id) if batch else []
    if not handlers:
        acked = Delivery.Status.ACKED
        return [
            Settlement(delivery_tag=r.delivery_tag, delivery_id=d.pk, message_id=d.message_pk, action=acked,
                       duplicate=d.duplicate, recorded=True)
            for r, d in zip(batch, deliveries)
        ]
    settlements = []
    for r, d, (status, _) in zip(batch, deliveries, prepared.settlement if prepared else ()):
        handler = handlers.get(r.queue)
        if handler is None or d.duplicate:
            settlements.append(Settlement(
                delivery_tag=r.delivery_tag, delivery_id=d.pk, message_id=d.message_pk, action=Delivery.Status.ACKED,
                duplicate=d.duplicate, recorded=status == ACKED,
            ))
        else:
            settlements.append(_handle(r, d, handler=handler, max_retries=max_retries))
    return settlements


@functools.cache
def _vendor() -> str:
    """The database's vendor ('sqlite', 'postgresql'): one per process, where `connection.vendor`
    looks the thread's connection up through Django's proxy at each use (~0.5 µs, dozens a batch)."""
    return connection.vendor


_sqlite_writer = threading.Lock()


def _one_writer():
    """SQLite has one writer: the worker's recording threads take turns on a lock, which wakes the
    next at once, where SQLite's busy handler would poll in steps of milliseconds."""
    return _sqlite_writer if _vendor() == "sqlite" else nullcontext()


def record_settled(settlements: list[Settlement]) -> None:
    """Record acks, requeues and rejects after the broker was told (one UPDATE per outcome)."""
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    with transaction.atomic(savepoint=False):
        for s in settlements:
            if s.error:
                Delivery.objects.filter(pk=s.delivery_id).update(status=s.action, error=s.error)
        delivery = Delivery._meta.db_table
        p = _param()
        for action, ids in _ids_by_action(settlements).items():
            for part in in_lists(ids, pad=_vendor() == "sqlite"):
                where, params = _in("id", part)
                _execute(f"UPDATE {delivery} SET status = {p}, settled_at = {p} WHERE {where}", [action, now, *params])


def _ids_by_action(settlements: list[Settlement]) -> dict[str, list[int]]:
    """Delivery ids per settlement action (acked, requeued, rejected): one UPDATE each."""
    by_action: dict[str, list[int]] = {}
    for s in settlements:
        by_action.setdefault(s.action, []).append(s.delivery_id)
    return by_action


def _param() -> str:
    """The driver's own placeholder: statements here bypass Django's cursor wrapper (see `_execute`)."""
    return "?" if _vendor() == "sqlite" else "%s"


MAX_PARAMETERS = 30_000  # per statement: SQLite takes at most 32,766, PostgreSQL 65,535 (server-side binding)


def _parts(values: list, size: int | None = None) -> list[list]:
    """`values` in lists of at most `size` (default: short enough to bind one parameter each, as in
    SQLite's `IN (?, …)`)."""
    size = size or MAX_PARAMETERS
    return [values[i:i + size] for i in range(0, len(values), size)]


def in_lists(values: list, *, pad: bool) -> list[list]:
    """`values` in lists for `IN (…)`, each short enough to bind one parameter per value; with `pad`
    (SQLite), each filled with NULLs (which match nothing) to `statement_slots` values."""
    parts = _parts(values)
    if pad:
        return [part + [None] * (statement_slots(len(part)) - len(part)) for part in parts]
    return parts


def _in(column: str, values: list) -> tuple[str, list]:
    """`column IN (…)` as SQL and parameters; one array parameter on PostgreSQL (far cheaper to bind)."""
    if _vendor() == "postgresql":
        return f"{column} = ANY(%s)", [list(values)]
    return f"{column} IN ({', '.join([_param()] * len(values))})", list(values)


def statement_slots(count: int, most: int | None = None) -> int:
    """How many rows or values a statement is written for: `count` rounded up to a power of two, at
    most `most` (what the caller splits its values by; default MAX_PARAMETERS).

    Python's sqlite3 keeps each connection's last 128 statements compiled, by their text. Written
    for the exact count, every batch size was a statement of its own, compiled afresh (~2 ms for
    400 rows) and then kept: hundreds of kilobytes each, which grew a worker by 20–30 MB. Rounded,
    a connection needs a dozen shapes per statement; the spare slots are NULL and skipped.
    """
    return min(1 << (count - 1).bit_length(), most or MAX_PARAMETERS) if count > 1 else 1


def _execute(sql: str, params: list) -> list[tuple]:
    """Run one statement on the driver's cursor, with the driver's placeholders (`_param()`).

    Django's SQLite cursor rewrites every `%s` to `?` through a Python callback: with thousands of
    parameters per batch that cost more than SQLite's own work. Errors still arrive as Django's
    (`DatabaseError`, `IntegrityError`), which the worker handles.
    """
    return _run(sql, params)[0]


def _run(sql: str, params: list) -> tuple[list[tuple], int, int | None]:
    """`_execute`, also returning the statement's rowcount and lastrowid."""
    db = connections[DEFAULT_DB_ALIAS]  # once: each `connection.x` looks the thread's connection up again
    db.ensure_connection()
    with db.wrap_database_errors:
        cursor = _server_binding_cursor(db) if _vendor() == "postgresql" else db.connection.cursor()
        try:
            cursor.execute(sql, params)
            rows = cursor.fetchall() if cursor.description else []
            return rows, cursor.rowcount, getattr(cursor, "lastrowid", None)  # psycopg has no lastrowid
        finally:
            cursor.close()


def _server_binding_cursor(db):
    """PostgreSQL: a cursor that sends the parameters apart from the statement (psycopg's server-side
    binding), where Django's cursors render every value into the SQL text in Python first.

    psycopg then prepares the statement on the connection once it has run `prepare_threshold`
    times (the database's OPTIONS; see settings): each batch shape of the consumer's statements
    then skips the server's parsing and planning, most of a small batch's statement time.
    """
    import psycopg

    return psycopg.Cursor(db.connection)


def _message_pks(message_ids) -> dict[str, int]:
    found = {}
    for part in in_lists(list(message_ids), pad=_vendor() == "sqlite"):
        where, params = _in("message_id", part)
        found.update(_execute(f"SELECT message_id, id FROM {Message._meta.db_table} WHERE {where}", params))
    return found


def record_refused(r: Received, *, worker_id: int | None, reason: str) -> Settlement:
    """A letter the database refuses as it came (a `DataError`, alone in its batch): record what can be
    kept — its body, message_id and names, not its headers and properties — with a rejected
    delivery that says why. The worker then rejects it (to the queue's dead-letter exchange, if any):
    one such letter never holds up the queue, and its body stays in the audit trail.
    """
    body = bytes(r.body)
    now = timezone.now()
    reason = json_safe_str(reason)
    exchange, routing_key = _stored_name(r.exchange), _stored_name(r.routing_key)
    with transaction.atomic():
        message, _ = Message.objects.get_or_create(
            message_id=_message_id(r, has_handler=False),
            defaults={
                "origin": Message.Origin.EXTERNAL, "status": Message.Status.EXTERNAL, "body": body,
                "body_size": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
                "exchange": exchange, "routing_key": routing_key, "last_error": reason,
            },
        )
        attempt = Delivery.objects.filter(message=message, queue=r.queue).count() + 1
        delivery = Delivery.objects.create(
            message=message, queue=r.queue, consumer_tag=r.consumer_tag, delivery_tag=r.delivery_tag,
            redelivered=r.redelivered, attempt=attempt, exchange=exchange, routing_key=routing_key,
            status=Delivery.Status.REJECTED, worker_id=worker_id, settled_at=now, error=reason,
        )
    return Settlement(delivery_tag=r.delivery_tag, delivery_id=delivery.pk, message_id=message.pk,
                      action=Delivery.Status.REJECTED, error=reason, recorded=True)


def record_lost(delivery_ids: list[int], *, reason: str) -> None:
    """Deliveries recorded but never acked because the channel closed: the broker requeues them.

    Those written 'acked' with their row (no handler) are undone too; a requeue or reject already
    recorded is kept.
    """
    if delivery_ids:
        Delivery.objects.filter(pk__in=delivery_ids, status__in=UNACKED_OR_ACKED_AT_INSERT).update(
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


MESSAGE_COLUMNS = (
    "message_id", "origin", "status", "exchange", "exchange_type", "routing_key", "declare", "body", "body_size",
    "body_sha256", "content_type", "content_encoding", "correlation_id", "delivery_mode", "headers",
    "properties", "last_error", "attempts", "created_at",
)
DELIVERY_COLUMNS = (
    "message_id", "queue", "consumer_tag", "delivery_tag", "redelivered", "attempt", "duplicate", "exchange",
    "routing_key", "status", "worker_id", "received_at", "settled_at", "error",
)


COPY_MIN_ROWS = 50  # PostgreSQL: below this, one INSERT round trip beats COPY's extra ones


@dataclass(slots=True)
class Prepared:
    """A batch turned into database values, before the transaction: message_ids, adapted receipt
    times, a `Message` row (MESSAGE_COLUMNS) per distinct letter in case it is new, and each
    delivery's status and settled_at as written ('acked' when its queue has no handler)."""

    ids: list[str]
    received: list
    letters: dict[str, tuple]
    settlement: list[tuple]  # (status, settled_at) per delivery


def _prepare(batch: list[Received], handlers: dict[str, Handler] | None) -> Prepared:
    for r in batch:
        r.exchange, r.routing_key = _stored_name(r.exchange), _stored_name(r.routing_key)
    received = _receipt_times([r.received_at for r in batch])
    ids = [_message_id(r, has_handler=bool(handlers) and r.queue in handlers) for r in batch]
    letters: dict[str, tuple] = {}
    for r, message_id, received_at in zip(batch, ids, received):
        if message_id not in letters:
            letters[message_id] = _external_message_row(r, message_id, received_at)
    acked_now = (ACKED, _receipt_times([time.time()])[0])
    settlement = [(RECEIVED, None) if handlers and r.queue in handlers else acked_now for r in batch]
    return Prepared(ids=ids, received=received, letters=letters, settlement=settlement)


def _stored_name(value) -> str:
    """An exchange or routing key as its column stores it: another producer's bytes may not be UTF-8,
    or hold NUL (escaped as six characters, so a 255-byte name can come out longer than its column)."""
    if type(value) is str and "\x00" not in value:
        return value
    return text_value(value)[:255]


def _receipt_times(stamps: list[float]) -> list:
    """Receipt times (epoch seconds) as the database reads them.

    As UTC text, 'YYYY-MM-DD HH:MM:SS[.ffffff]', the date and time formatted once per second:
    SQLite keeps Django's text as it is (USE_TZ, the database in UTC); PostgreSQL reads it with
    its offset, '+00'. A datetime and its adapter per value cost several times more (psycopg's
    datetime dumper alone ~4 µs a value in COPY).
    """
    suffix = _utc_suffix()
    if suffix is None:
        adapt = connection.ops.adapt_datetimefield_value
        return [adapt(datetime.fromtimestamp(t, dt_timezone.utc)) for t in stamps]
    times, second, prefix = [], None, ""
    for t in stamps:
        whole = int(t)
        if whole != second:
            second, prefix = whole, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole))
        micro = int((t - whole) * 1_000_000)
        times.append(f"{prefix}.{micro:06d}{suffix}" if micro else f"{prefix}{suffix}")
    return times


def _utc_suffix() -> str | None:
    """What follows a UTC time written as text, or None where times must go through Django's adapter."""
    if not settings.USE_TZ:
        return None
    if _vendor() == "postgresql":
        return "+00"
    if _vendor() == "sqlite" and connection.timezone_name == "UTC":
        return ""
    return None


# PostgreSQL: the last batch held letters recorded before — Mailroom's own, most likely, which have their
# row already. Such batches look their letters up first; batches of new letters skip the lookup. A hint
# for the next batch (any recording thread's), never a truth: a wrong guess costs one statement more.
_letters_seen_before = False


def _insert(batch: list[Received], prepared: Prepared, *, worker_id: int | None) -> list[Recorded]:
    global _letters_seen_before
    ids, received = prepared.ids, prepared.received
    if _vendor() == "postgresql" and len(batch) < COPY_MIN_ROWS:
        known, fresh = _find_or_insert_letters(prepared.letters)
    elif _vendor() == "postgresql" and not _letters_seen_before and not any(r.redelivered for r in batch):
        known, fresh = _copy_letters(prepared.letters)
    else:
        known = _message_pks(prepared.letters)
        if _vendor() == "postgresql":
            _letters_seen_before = bool(known)
        new = [row for message_id, row in prepared.letters.items() if message_id not in known]
        if new:
            # Conflicts ignored: a competing worker may record the same letter at the same moment.
            known.update(_insert_rows(
                Message, MESSAGE_COLUMNS, new, ignore_conflicts=True, returning=("message_id", "id"),
            ))
        fresh = {row[0] for row in new}
    missing = [m for m in prepared.letters if m not in known]
    if missing:  # recorded by a competing worker at the same moment
        known.update(_message_pks(missing))

    history = _history(batch, ids, known, fresh=fresh)
    first_copies = not history and len(prepared.letters) == len(ids)  # the usual case: nothing seen before
    rows, recorded = [], []
    for r, message_id, received_at, (status, settled_at) in zip(batch, ids, received, prepared.settlement):
        message_pk = known[message_id]
        if first_copies:
            attempt, duplicate = _attempt(r, ()), False
        else:
            previous = history.setdefault((message_pk, r.queue), [])
            attempt, duplicate = _attempt(r, previous), bool(previous) and _handled(previous)
            previous.append((Delivery.Status.ACKED, True))  # a later copy in this batch is a duplicate
        rows.append((
            message_pk, r.queue, r.consumer_tag, r.delivery_tag, r.redelivered, attempt, duplicate, r.exchange,
            r.routing_key, status, worker_id, received_at, settled_at, "",
        ))
        recorded.append(Recorded(pk=0, message_pk=message_pk, attempt=attempt, duplicate=duplicate))
    for item, (pk,) in zip(recorded, _insert_rows(Delivery, DELIVERY_COLUMNS, rows, returning=("id",)), strict=True):
        item.pk = pk
    return recorded


def _copy_letters(letters: dict[str, tuple]) -> tuple[dict[str, int], set[str]]:
    """PostgreSQL, a large batch of letters that are most likely new: COPY them all without looking
    them up first (~3 µs a letter of the database's time). A letter recorded before makes the COPY
    fail, and its savepoint goes back: the letters are then inserted skipping the known ones, which
    are looked up. Returns (the letters' ids, the message_ids of those this batch inserted).

    Taken unless the last batch held letters recorded before (`_letters_seen_before`).
    """
    global _letters_seen_before
    inserted = dict(_insert_rows(
        Message, MESSAGE_COLUMNS, list(letters.values()), ignore_conflicts=True, returning=("message_id", "id"),
    ))
    _letters_seen_before = len(inserted) != len(letters)
    known = dict(inserted)
    if _letters_seen_before:
        known.update(_message_pks([m for m in letters if m not in inserted]))
    return known, set(inserted)


def _record_first_receipts(batch: list[Received], prepared: Prepared | None, *, worker_id: int | None,
                           settled: list[Settlement]) -> tuple[list[Recorded] | None, bool]:
    """PostgreSQL, a small batch of the usual kind (each letter once, none received before): one statement.

    The earlier batches' settlements, the new letters and the deliveries are written by one
    statement (data-modifying CTEs), in one round trip, atomic on its own: no BEGIN, no COMMIT. The
    deliveries are written only if every letter is accounted for; otherwise the statement writes
    the settlements and the new letters alone. A letter Mailroom published has its row already:
    then a second statement looks such letters up (those without a delivery on these queues yet),
    and later batches look up at once until a batch holds new letters only — the lookup costs
    ~0.2 ms of planning and execution that letters from other producers need not pay. A letter
    delivered before goes the general way, which records the batch with its history. Large batches
    go the general way too, by COPY: binding thousands of parameters costs more than round trips.

    Returns the deliveries recorded (None when the general path must record the batch) and whether
    `settled` was written.
    """
    global _letters_seen_before
    if (_vendor() != "postgresql" or not batch or len(batch) >= COPY_MIN_ROWS
            or len(prepared.letters) != len(batch) or any(r.redelivered for r in batch)
            or any(s.error for s in settled)):
        return None, False
    by_action = _ids_by_action(settled)
    settling: list = []
    if by_action:
        now = connection.ops.adapt_datetimefield_value(timezone.now())
        for action, ids in by_action.items():
            settling += (action, now, ids)
    letters = list(chain.from_iterable(prepared.letters.values()))
    lookup = [list(prepared.letters), sorted({r.queue for r in batch})]
    attempts = [_attempt(r, ()) for r in batch]
    receipts: list = []
    for r, message_id, received_at, attempt, (status, settled_at) in zip(
        batch, prepared.ids, prepared.received, attempts, prepared.settlement,
    ):
        receipts += (message_id, r.queue, r.consumer_tag, r.delivery_tag, r.redelivered, attempt, r.exchange,
                     r.routing_key, status, worker_id, received_at, settled_at)
    receipts.append(len(batch))

    def write(*, known: bool, settle: bool) -> list[tuple]:
        sql = _first_receipts_sql(len(by_action) if settle else 0, len(batch), known=known)
        params = (settling if settle else []) + letters + (lookup if known else []) + receipts
        return _execute(sql, params)  # its own transaction, or part of a caller's (tests)

    known = _letters_seen_before
    rows = write(known=known, settle=True)
    if not rows and not known:
        known = True
        rows = write(known=True, settle=False)  # letters recorded before: Mailroom's own, most likely
    if not rows:
        return None, True
    _letters_seen_before = known and not all(fresh for *_, fresh in rows)
    found = {message_id: (pk, message_pk) for message_id, pk, message_pk, _ in rows}
    recorded = []
    for message_id, attempt in zip(prepared.ids, attempts):
        pk, message_pk = found[message_id]
        recorded.append(Recorded(pk=pk, message_pk=message_pk, attempt=attempt, duplicate=False))
    return recorded, True


# The delivery columns `_record_first_receipts` passes, in order; the others are constants of a first receipt.
_FIRST_RECEIPT_VALUES = ("letter", "queue", "consumer_tag", "delivery_tag", "redelivered", "attempt", "exchange",
                         "routing_key", "status", "worker_id", "received_at", "settled_at")


@functools.lru_cache(maxsize=256)
def _first_receipts_sql(settle_groups: int, count: int, *, known: bool) -> str:
    """The statement of `_record_first_receipts` (PostgreSQL) for `count` letters, by batch shape.

    `known`: also take letters recorded before that have no delivery on these queues yet (those
    Mailroom published). The lookup sees the table as the statement began, so a letter inserted by
    the statement comes back once, from the INSERT's RETURNING; one that a competing worker inserts
    at the same instant is skipped by ON CONFLICT and missing from both, which the count check catches.
    """
    message, delivery = Message._meta.db_table, Delivery._meta.db_table
    ctes = [
        f"settled{i} AS (UPDATE {delivery} SET status = %s, settled_at = %s WHERE id = ANY(%s))"
        for i in range(settle_groups)
    ]
    row = "(" + ", ".join(["%s"] * len(MESSAGE_COLUMNS)) + ")"
    ctes.append(
        f"inserted AS (INSERT INTO {message} ({', '.join(MESSAGE_COLUMNS)}) "
        f"VALUES {', '.join([row] * count)} ON CONFLICT DO NOTHING RETURNING message_id, id)"
    )
    ctes.append(
        f"letters AS (SELECT message_id, id, true AS fresh FROM inserted UNION ALL SELECT message_id, id, false "
        f"FROM {message} WHERE message_id = ANY(%s) AND NOT EXISTS (SELECT 1 FROM {delivery} "
        f"WHERE {delivery}.message_id = {message}.id AND queue = ANY(%s)))"
        if known else "letters AS (SELECT message_id, id, true AS fresh FROM inserted)"
    )
    fields = {f.column: f for f in Delivery._meta.concrete_fields}
    typed = {  # VALUES rows are untyped; varchar(n) casts would truncate, so the types without length
        c: f"v.{c}::{fields[c].cast_db_type(connection).split('(')[0]}" for c in _FIRST_RECEIPT_VALUES[1:]
    }
    constants = {"message_id": "letters.id", "duplicate": "false", "error": "''"}
    rows = ", ".join(f"({', '.join(['%s'] * len(_FIRST_RECEIPT_VALUES))}, {position})" for position in range(count))
    ctes.append(  # in batch order, so that delivery ids follow the order of receipt
        f"received AS (INSERT INTO {delivery} ({', '.join(DELIVERY_COLUMNS)}) "
        f"SELECT {', '.join(constants.get(c) or typed[c] for c in DELIVERY_COLUMNS)} "
        f"FROM (VALUES {rows}) AS v({', '.join(_FIRST_RECEIPT_VALUES)}, position) "
        f"JOIN letters ON letters.message_id = v.letter "
        f"WHERE (SELECT count(DISTINCT message_id) FROM letters) = %s ORDER BY v.position "
        f"RETURNING id, message_id)"
    )
    return (f"WITH {', '.join(ctes)} SELECT letters.message_id, received.id, letters.id, letters.fresh "
            f"FROM received JOIN letters ON letters.id = received.message_id")


def _find_or_insert_letters(letters: dict[str, tuple]) -> tuple[dict[str, int], set[str]]:
    """PostgreSQL, small batches: find the known letters and insert the others in one round trip.

    Returns {message_id: pk} and the message_ids inserted now. The outer SELECT does not see the
    CTE's rows (one snapshot), so each letter comes back once.
    """
    table = Message._meta.db_table
    placeholders = "(" + ", ".join(["%s"] * len(MESSAGE_COLUMNS)) + ")"
    sql = (
        f"WITH inserted AS (INSERT INTO {table} ({', '.join(MESSAGE_COLUMNS)}) "
        f"VALUES {', '.join([placeholders] * len(letters))} ON CONFLICT DO NOTHING RETURNING message_id, id) "
        f"SELECT message_id, id, true FROM inserted "
        f"UNION ALL SELECT message_id, id, false FROM {table} WHERE message_id = ANY(%s)"
    )
    found = _execute(sql, [value for row in letters.values() for value in row] + [list(letters)])
    return {m: pk for m, pk, _ in found}, {m for m, _, inserted in found if inserted}


def _insert_rows(model, columns: tuple[str, ...], rows: list[tuple], *, ignore_conflicts: bool = False,
                 returning: tuple[str, ...] = ()) -> list[tuple]:
    """Insert `rows` in one statement: the ORM's per-object cost dominates at thousands a second.

    Values must already be adapted for the database (datetimes, JSON). Returns the `returning`
    columns of the rows inserted, in order (rows skipped as conflicts are left out). Large batches
    on PostgreSQL use COPY; otherwise one multi-row INSERT … RETURNING (SQLite and PostgreSQL keep
    VALUES order, as Django's bulk_create relies on).
    """
    if _vendor() == "postgresql" and len(rows) >= COPY_MIN_ROWS:
        return _copy_rows(model, columns, rows, ignore_conflicts=ignore_conflicts, returning=returning)
    if _vendor() == "sqlite" and returning:
        return _insert_sqlite(model, columns, rows, ignore_conflicts=ignore_conflicts, returning=returning)
    return _insert_values(model, columns, rows, ignore_conflicts=ignore_conflicts, returning=returning)


def _rows_per_statement(columns) -> int:
    """Rows of `columns` one statement binds under MAX_PARAMETERS (a large --batch-size takes several)."""
    return max(1, MAX_PARAMETERS // len(columns))


def _insert_values(model, columns, rows, *, ignore_conflicts: bool, returning: tuple[str, ...]) -> list[tuple]:
    found: list[tuple] = []
    for part in _parts(rows, _rows_per_statement(columns)):
        sql = _insert_sql(model, columns, len(part), ignore_conflicts=ignore_conflicts)
        if returning:
            sql += f" RETURNING {', '.join(connection.ops.quote_name(c) for c in returning)}"
        found += _execute(sql, list(chain.from_iterable(part)))
    return found


def _insert_sql(model, columns, count: int, *, ignore_conflicts: bool) -> str:
    ops = connection.ops
    on_conflict = OnConflict.IGNORE if ignore_conflicts else None
    placeholders = "(" + ", ".join([_param()] * len(columns)) + ")"
    sql = (
        f"{ops.insert_statement(on_conflict=on_conflict)} {ops.quote_name(model._meta.db_table)} "
        f"({', '.join(ops.quote_name(c) for c in columns)}) VALUES {', '.join([placeholders] * count)}"
    )
    if ignore_conflicts:
        suffix = ops.on_conflict_suffix_sql([], on_conflict, [], [])
        sql += f" {suffix}" if suffix else ""
    return sql


def _insert_sqlite(model, columns, rows, *, ignore_conflicts: bool, returning: tuple[str, ...]) -> list[tuple]:
    """SQLite: insert without RETURNING and derive the ids.

    Python's sqlite3 steps a RETURNING statement once per row and gives up the GIL at every step:
    with pika busy on the main thread, each step then waits for the GIL again, which made the
    transaction (and SQLite's write lock) last several times longer. Under our write transaction a
    statement's rows take consecutive rowids in VALUES order, ending at `lastrowid`; rows skipped as
    conflicts break that, and then the ids are looked up by `returning[0]`, a unique column.

    Each statement is written for `statement_slots` rows (the rest NULL rows, which `WHERE column1
    IS NOT NULL` skips): the first column, a letter's message_id or a delivery's letter, is never NULL.
    """
    most = _rows_per_statement(columns)
    found: list[tuple] = []
    for part in _parts(rows, most):
        if any(row[0] is None for row in part):
            raise ValueError(f"{model.__name__} rows need a first column ({columns[0]}) that is not NULL")
        slots = statement_slots(len(part), most)
        sql = _sqlite_insert_sql(model._meta.db_table, columns, slots, ignore_conflicts=ignore_conflicts)
        params = list(chain.from_iterable(part))
        params += [None] * (len(columns) * (slots - len(part)))
        _, inserted, last = _run(sql, params)
        if inserted == len(part):
            ids = range(last - inserted + 1, last + 1)
            if returning == ("id",):
                found += [(pk,) for pk in ids]
            else:
                key, = (columns.index(c) for c in returning[:-1])  # (unique column, "id")
                found += [(row[key], pk) for pk, row in zip(ids, part)]
            continue
        key = returning[0]
        for values in in_lists([row[columns.index(key)] for row in part], pad=True):
            where, params = _in(key, values)
            found += _execute(f"SELECT {', '.join(returning)} FROM {model._meta.db_table} WHERE {where}", params)
    return found


@functools.lru_cache(maxsize=128)
def _sqlite_insert_sql(table: str, columns: tuple[str, ...], slots: int, *, ignore_conflicts: bool) -> str:
    quote = connection.ops.quote_name
    row = "(" + ", ".join(["?"] * len(columns)) + ")"
    return (
        f"{'INSERT OR IGNORE' if ignore_conflicts else 'INSERT'} INTO {quote(table)} "
        f"({', '.join(quote(c) for c in columns)}) "
        f"SELECT {', '.join(f'column{i}' for i in range(1, len(columns) + 1))} "
        f"FROM (VALUES {', '.join([row] * slots)}) WHERE column1 IS NOT NULL"
    )


def _copy_rows(model, columns, rows, *, ignore_conflicts: bool, returning: tuple[str, ...]) -> list[tuple]:
    """COPY `rows` in; ids are drawn from the sequence first so that they can be returned."""
    table = model._meta.db_table
    pk_column = model._meta.pk.column
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT nextval(%s::regclass) FROM generate_series(1, %s)", [_id_sequence(cursor, table, pk_column), len(rows)],
        )
        rows = [(pk, *row) for (pk,), row in zip(cursor.fetchall(), rows)]
        columns = (pk_column, *columns)
        sql = f"COPY {connection.ops.quote_name(table)} ({', '.join(columns)}) FROM STDIN"
        try:
            # A savepoint where a duplicate key is expected: it then undoes the COPY alone (two round trips).
            with transaction.atomic() if ignore_conflicts else nullcontext():
                # psycopg's own cursor: its errors made Django's (IntegrityError) by hand
                with connection.wrap_database_errors, cursor.cursor.copy(sql) as copy:
                    for row in rows:
                        copy.write_row(row)
        except IntegrityError:
            if not ignore_conflicts:
                raise
            # A competing worker recorded one of these letters meanwhile: skip the ones that exist.
            return _insert_values(model, columns, rows, ignore_conflicts=True, returning=returning)
    if len(returning) == 1:
        position = columns.index(returning[0])
        return [(row[position],) for row in rows]
    take = operator.itemgetter(*(columns.index(c) for c in returning))
    return [take(row) for row in rows]


_sequences: dict[tuple[str, str], str] = {}


def _id_sequence(cursor, table: str, column: str) -> str:
    """The sequence behind `table`'s id column, looked up once: pg_get_serial_sequence in the
    SELECT list of `_copy_rows` would run once per row (it is not constant-folded)."""
    key = (table, column)
    if key not in _sequences:
        cursor.execute("SELECT pg_get_serial_sequence(%s, %s)", [table, column])
        _sequences[key] = cursor.fetchone()[0]
    return _sequences[key]


def _message_id(r: Received, *, has_handler: bool) -> str:
    message_id = r.properties.message_id
    if message_id:
        return text_value(message_id)[:255]
    if r.redelivered:
        # A letter without message_id recorded before the consumer died: find it by its content.
        found = _match_by_content(r, has_handler=has_handler)
        if found:
            return found
    return str(uuid.uuid4())


def _match_by_content(r: Received, *, has_handler: bool) -> str | None:
    """The letter whose latest delivery on this queue, of identical content, may have lost its ack.

    That latest delivery (a rejected one aside) decides. If it is 'acked' on a queue with a handler,
    the ack went out (a handler's outcome is written after the broker was told): a redelivered
    identical letter is then another letter, sent twice without a message_id, whose handler must
    run. Without a handler, 'acked' is written with the row, its ack to follow, which a crash may
    have cut off: it matches.
    """
    sha = hashlib.sha256(r.body).hexdigest()
    latest = (
        Delivery.objects.filter(
            queue=r.queue, message__body_sha256=sha, message__origin=Message.Origin.EXTERNAL,
            message__routing_key=r.routing_key,
        )
        .exclude(status=Delivery.Status.REJECTED)
        .order_by("-pk").values_list("message__message_id", "status", "handled_at").first()
    )
    if latest is None:
        return None
    message_id, status, handled_at = latest
    if status == Delivery.Status.ACKED and (has_handler or handled_at is not None):
        return None
    return message_id


def _external_message_row(r: Received, message_id: str, received_at) -> tuple:
    """A `Message` row (MESSAGE_COLUMNS) for a letter Mailroom did not publish.

    `received_at` is already adapted for the database. The JSON columns are given as JSON text,
    as Django's adapter writes them on SQLite (json.dumps, no encoder); PostgreSQL reads that text
    as jsonb, in COPY and in a statement's literals alike. psycopg's Jsonb wrapper would cost
    ~12 µs more a row in COPY.
    """
    p = read_properties(r.properties)
    body = bytes(r.body)
    return (
        message_id, EXTERNAL_ORIGIN, EXTERNAL_STATUS, r.exchange, "", r.routing_key,
        False, body, len(body), hashlib.sha256(body).hexdigest(), p["content_type"][:255],
        p["content_encoding"][:255], p["correlation_id"], p["delivery_mode"],
        json.dumps(p["headers"]) if p["headers"] else "{}",
        json.dumps(p["properties"]) if p["properties"] else "{}", "", 0, received_at,
    )


EXTERNAL_ORIGIN = Message.Origin.EXTERNAL.value
EXTERNAL_STATUS = Message.Status.EXTERNAL.value
RECEIVED = Delivery.Status.RECEIVED.value
ACKED = Delivery.Status.ACKED.value
UNACKED_OR_ACKED_AT_INSERT = (RECEIVED, ACKED)


def _history(batch, ids, known, *, fresh: set[str]) -> dict[tuple[int, str], list]:
    """Earlier deliveries ([status, handled]) per (message, queue), oldest first, for attempts and duplicates."""
    old = {known[i] for i in ids if i not in fresh}
    history: dict[tuple[int, str], list[tuple[str, bool]]] = {}
    if not old:
        return history
    queues = {r.queue for r in batch}
    rows = Delivery.objects.filter(message_id__in=old, queue__in=queues).order_by("pk").values_list(
        "message_id", "queue", "status", "handled_at", "pk",
    )
    latest: dict[tuple[int, str], tuple[str, int]] = {}
    unsettled: dict[tuple[int, str], list[int]] = {}
    for message_pk, queue, status, handled_at, pk in rows:
        history.setdefault((message_pk, queue), []).append([status, handled_at is not None])
        latest[(message_pk, queue)] = (status, pk)
        if status == Delivery.Status.RECEIVED:
            unsettled.setdefault((message_pk, queue), []).append(pk)
    # A redelivered letter was not acked last time, so its latest delivery, if recorded 'acked', lost
    # its ack: written acked with its row and cut off before the ack left (kill -9), or acked as the
    # connection died (a basic.ack is not confirmed). And a delivery of it still 'received' was never
    # acked: the broker requeued it. (A copy that is not redelivered proves neither: the same
    # message_id published twice may be in another worker's handler right now.)
    stale = []
    for key in {(known[i], r.queue) for r, i in zip(batch, ids) if r.redelivered}:
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
    # `x-delivery-count: 0` on a classic queue would requeue a poison letter for ever).
    attempt = len(previous) + 1
    if isinstance(count, int) and not isinstance(count, bool) and 0 <= count < MAX_ATTEMPT:  # pika's `long` too
        return max(count + 1, attempt)
    return attempt


MAX_ATTEMPT = 2**31 - 1  # `Delivery.attempt`'s range (a PositiveIntegerField) on every database


def _handled(previous: list[tuple[str, bool]]) -> bool:
    return any(status == Delivery.Status.ACKED or handled for status, handled in previous)


# --- handlers -------------------------------------------------------------------------------------
def _handle(r: Received, delivery: Recorded, *, handler: Handler, max_retries: int) -> Settlement:
    settle = Settlement(
        delivery_tag=r.delivery_tag, delivery_id=delivery.pk, message_id=delivery.message_pk,
        action=Delivery.Status.ACKED,
    )
    # SQLite has one writer: a transaction around the handler would hold the database-wide write
    # lock for as long as the handler runs, starving every other worker. There the handler's writes
    # commit as it makes them (handlers must be idempotent anyway: delivery is at-least-once).
    atomic = nullcontext() if _vendor() == "sqlite" else transaction.atomic()
    try:
        with atomic:
            handler(Message.objects.get(pk=delivery.message_pk))
            Delivery.objects.filter(pk=delivery.pk).update(handled_at=timezone.now())
    except Exception:  # noqa: BLE001 — any handler error is recorded, never lost
        error = traceback.format_exc()
        settle.error = json_safe_str(error[-10000:])  # a NUL in the handler's message: PostgreSQL refuses it in text
        retries_left = delivery.attempt <= max_retries
        settle.action = Delivery.Status.REQUEUED if retries_left else Delivery.Status.REJECTED
        logger.warning(
            "delivery=%s message=%s handler failed attempt=%s action=%s",
            delivery.pk, delivery.message_pk, delivery.attempt, settle.action,
        )
    return settle
