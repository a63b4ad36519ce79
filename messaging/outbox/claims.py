"""How relays share the pending messages: claim a batch, record its outcomes, release what is left.

`Claims` is the contract; each database has one small implementation, chosen once by `claims_for`:

* `RowLockClaims` (PostgreSQL): `SELECT ... FOR NO KEY UPDATE SKIP LOCKED` in a transaction that
  stays open until the batch's outcomes are written and committed. Other relays skip the locked
  rows; a relay that dies releases them at once (its transaction rolls back). Two connections of
  its own take turns, so the next batch is claimed while this one is in flight. (NO KEY: a worker
  recording a delivery of a message in flight checks its foreign key with a KEY SHARE lock, which
  this lock lets through; another relay's claim and the web's UPDATE wait or skip.)
* `LeaseClaims` (SQLite: no row locks, BEGIN IMMEDIATE serializes writers): the claim pushes the
  rows' `next_attempt_at` forward as a lease in one statement, and the outcomes are written after.

Outcomes are written over messages still pending only, one UPDATE per (status, reason, attempts).
"""
from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.db import (
    Error as DatabaseError,  # also InterfaceError: "connection already closed"
)
from django.utils import timezone

from messaging.models import Message
from messaging.outbox.publishing import outcome_fields, outcome_params, outcome_update
from messaging.statements import padded, parts

logger = logging.getLogger(__name__)

COLUMNS = (
    "pk", "message_id", "exchange", "exchange_type", "routing_key", "declare", "body", "content_type",
    "content_encoding", "correlation_id", "delivery_mode", "headers", "properties", "attempts",
)

# (status, reason, attempts) -> the pks of the batch's messages with that outcome
Outcomes = dict[tuple[str, str, int], list[int]]


def _json(value):
    # JSON columns come back as text from a raw cursor (Django's JSONField decodes them itself).
    if isinstance(value, (str, bytes)):
        return json.loads(value) if value not in ("{}", "", b"{}") else {}
    return value or {}


class ClaimedMessage:
    """A claimed row: what `Publisher.publish` and `build_properties` read."""

    __slots__ = COLUMNS

    def __init__(self, row: tuple) -> None:
        for name, value in zip(COLUMNS, row):
            setattr(self, name, value)
        self.body = bytes(self.body)
        self.declare = bool(self.declare)
        self.headers = _json(self.headers)
        self.properties = _json(self.properties)


class Batch:
    """Messages claimed together on one database connection, and their outcomes as (status, reason)."""

    def __init__(self, db, messages: list[ClaimedMessage]) -> None:
        self.db = db  # on PostgreSQL, in the open transaction that holds the messages' row locks
        self.messages = messages
        self.outcomes: list[tuple[str, str] | None] = [None] * len(messages)
        self.sendable: list[int] = []  # indexes of the messages that go to the broker


def _columns(db) -> str:
    """The claimed columns (`COLUMNS`), quoted for `db`."""
    meta, quote = Message._meta, db.ops.quote_name
    return ", ".join(quote(meta.pk.column if name == "pk" else meta.get_field(name).column) for name in COLUMNS)


def _due(db, *, select: str, now, limit: int) -> tuple[str, list[Any]]:
    """`SELECT <select>` of up to `limit` messages due at `now`, oldest due first (read in that order
    from the partial index of pending messages), and its parameters."""
    meta, quote = Message._meta, db.ops.quote_name
    due_at = meta.get_field("next_attempt_at")
    due, status = quote(due_at.column), quote(meta.get_field("status").column)
    sql = f"SELECT {select} FROM {quote(meta.db_table)} WHERE {status} = %s AND {due} <= %s ORDER BY {due} LIMIT %s"
    return sql, [Message.Status.PENDING, due_at.get_db_prep_value(now, db), limit]


class Claims:
    """The contract between the relay and the database: every implementation provides these."""

    def claim(self, *, limit: int) -> Batch | None:
        """Claim up to `limit` due messages, oldest due first, for this relay alone; None when none is due."""
        raise NotImplementedError

    def record(self, batch: Batch, outcomes: Outcomes) -> None:
        """Write `batch`'s outcomes over its messages still pending, and end its claim."""
        raise NotImplementedError

    def release(self, unsent: Batch | None) -> None:
        """After an error, end every claim still open; `unsent` (claimed, never sent) is due again at once."""
        raise NotImplementedError

    def refresh(self) -> None:
        """Between passes: close the connections of its own that are broken or past their age."""

    def close(self) -> None:
        """Close the connections of its own (claims still open end with them)."""


class RowLockClaims(Claims):
    """PostgreSQL: a batch is held by row locks in a transaction open until its outcomes are committed."""

    def __init__(self) -> None:
        self.databases: list = []  # opened by the thread that claims (a connection belongs to its thread)

    def claim(self, *, limit: int) -> Batch | None:
        if not self.databases:
            self.databases = [connections.create_connection(DEFAULT_DB_ALIAS) for _ in range(2)]
        db = next(db for db in self.databases if db.get_autocommit())  # the one not holding a batch
        db.set_autocommit(False)
        with db.cursor() as cursor:
            # An outcome lost in a crash only means publishing again; without sorting, statistics that
            # lag a burst of pending messages cannot make the planner fetch and sort the whole backlog.
            cursor.execute("SET LOCAL synchronous_commit TO OFF; SET LOCAL enable_sort TO OFF")
            sql, params = _due(db, select=_columns(db), now=timezone.now(), limit=limit)
            cursor.execute(sql + " FOR NO KEY UPDATE SKIP LOCKED", params)
            rows = cursor.fetchall()
        if not rows:
            self._end(db, commit=True)
            return None
        return Batch(db, [ClaimedMessage(row) for row in rows])

    def record(self, batch: Batch, outcomes: Outcomes) -> None:
        meta, quote = Message._meta, batch.db.ops.quote_name
        where = f" WHERE {quote(meta.pk.column)} = ANY(%s) AND {quote(meta.get_field('status').column)} = %s"
        with batch.db.cursor() as cursor:  # in the claim's transaction
            for (status, reason, attempts), pks in outcomes.items():
                fields = outcome_fields(status, reason, attempts=attempts)
                cursor.execute(outcome_update(tuple(fields)) + where,
                               [*outcome_params(batch.db, fields), pks, Message.Status.PENDING])
        self._end(batch.db, commit=True)  # and the row locks go

    def release(self, unsent: Batch | None) -> None:
        for db in self.databases:  # a rolled-back claim is due again at once, unsent or not
            if db.connection is not None and not db.get_autocommit():
                try:
                    self._end(db, commit=False)
                except DatabaseError:  # the connection itself is broken: closing it ends the transaction
                    db.close()

    def refresh(self) -> None:
        for db in self.databases:
            db.close_if_unusable_or_obsolete()

    def close(self) -> None:
        for db in self.databases:
            db.close()

    @staticmethod
    def _end(db, *, commit: bool) -> None:
        if commit:
            db.commit()
        else:
            db.rollback()
        db.set_autocommit(True)


class LeaseClaims(Claims):
    """SQLite: a claim pushes the batch's next attempt forward by a lease; the outcomes are written after."""

    def __init__(self, *, lease_seconds: float) -> None:
        self.lease = timedelta(seconds=lease_seconds)

    def claim(self, *, limit: int) -> Batch | None:
        meta, quote = Message._meta, connection.ops.quote_name
        now, due_at = timezone.now(), meta.get_field("next_attempt_at")
        table, pk, due = quote(meta.db_table), quote(meta.pk.column), quote(due_at.column)
        due_sql, due_params = _due(connection, select=pk, now=now, limit=limit)
        sql = f"UPDATE {table} SET {due} = %s WHERE {pk} IN ({due_sql}) RETURNING {_columns(connection)}"
        params = [due_at.get_db_prep_value(now + self.lease, connection), *due_params]
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        return Batch(connection, [ClaimedMessage(row) for row in rows]) if rows else None

    def record(self, batch: Batch, outcomes: Outcomes) -> None:
        meta, quote = Message._meta, connection.ops.quote_name
        pk, status_column = quote(meta.pk.column), quote(meta.get_field("status").column)
        with transaction.atomic(), connection.cursor() as cursor:  # the batch's outcomes in one transaction
            for (status, reason, attempts), pks in outcomes.items():
                fields = outcome_fields(status, reason, attempts=attempts)
                sql = outcome_update(tuple(fields))
                for part in map(padded, parts(pks)):
                    cursor.execute(f"{sql} WHERE {pk} IN ({', '.join(['%s'] * len(part))}) AND {status_column} = %s",
                                   [*outcome_params(connection, fields), *part, Message.Status.PENDING])

    def release(self, unsent: Batch | None) -> None:
        """A claimed batch that never went out is due again at once, as a rolled-back claim is on
        PostgreSQL: a relay restarted after a refused login does not wait out the lease."""
        if unsent is None:
            return
        pks = [message.pk for message in unsent.messages]
        try:
            Message.objects.filter(pk__in=pks, status=Message.Status.PENDING).update(next_attempt_at=timezone.now())
        except DatabaseError as exc:
            logger.warning("%s claimed messages stay claimed until their lease ends: %s", len(pks), exc)


def claims_for(db, *, lease_seconds: float) -> Claims:
    """The implementation for the database of connection `db`: row locks where it has them, else a lease."""
    return RowLockClaims() if db.vendor == "postgresql" else LeaseClaims(lease_seconds=lease_seconds)
