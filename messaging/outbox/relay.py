"""The outbox relay: publish every letter still pending, in batches with pipelined confirms.

A letter stays pending when the web request that wrote it crashed before publishing, when the
broker was down or blocked, or when it nacked. The relay claims a batch of due rows so that
several relays never publish a letter at once:

* PostgreSQL: `SELECT ... FOR NO KEY UPDATE SKIP LOCKED` in a transaction that stays open until the
  batch's outcomes are written and committed. Other relays skip the locked rows; a relay that
  dies releases them at once (its transaction rolls back). Each letter is written once. Two
  connections take turns, so the next batch is claimed while this one is in flight. (NO KEY: a
  worker recording a delivery of a letter in flight checks its foreign key with a KEY SHARE
  lock, which this lock lets through; another relay's claim and the web's UPDATE wait or skip.)
* SQLite (no row locks; BEGIN IMMEDIATE serializes writers): the claim pushes the rows'
  `next_attempt_at` forward as a lease in one statement, and the outcomes are written after.

It publishes a batch with confirms in flight and records the outcomes with one UPDATE per
outcome; the database work overlaps the broker's.
"""
from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import timedelta

from django.db import DEFAULT_DB_ALIAS, close_old_connections, connection, connections
from django.db import (
    Error as DatabaseError,  # also InterfaceError: "connection already closed"
)
from django.utils import timezone

from messaging import conf
from messaging.amqp.codec import build_properties
from messaging.amqp.pipeline import Outcome, PipelinedPublisher
from messaging.amqp.publisher import publisher
from messaging.backoff import backoff_delays
from messaging.consumer.recording import in_lists
from messaging.errors import BrokerError, FatalBrokerError, PublishRefused
from messaging.models import Message
from messaging.outbox.publishing import (
    outcome_fields,
    outcome_params,
    outcome_sql,
    publish_once,
    relaxed_commit,
)
from messaging.stopping import StopFlag

logger = logging.getLogger(__name__)

COLUMNS = (
    "pk", "message_id", "exchange", "exchange_type", "routing_key", "declare", "body", "content_type",
    "content_encoding", "correlation_id", "delivery_mode", "headers", "properties", "attempts",
)


@dataclass(frozen=True, kw_only=True)
class RelayOptions:
    batch_size: int = 1000
    once: bool = False
    idle_seconds: float = 1.0
    lease_seconds: float = 60.0
    window: int = 1000
    timeout: float | None = None  # broker timeout; MAILROOM_PUBLISH_TIMEOUT when None


def _json(value):
    # JSON columns come back as text from a raw cursor (Django's JSONField decodes them itself).
    if isinstance(value, (str, bytes)):
        return json.loads(value) if value not in ("{}", "", b"{}") else {}
    return value or {}


class Letter:
    """A claimed row: what `Publisher.publish`, `build_properties` and the pipelined publisher read."""

    __slots__ = COLUMNS

    def __init__(self, row: tuple) -> None:
        for name, value in zip(COLUMNS, row):
            setattr(self, name, value)
        self.body = bytes(self.body)
        self.declare = bool(self.declare)
        self.headers = _json(self.headers)
        self.properties = _json(self.properties)


class Outgoing:
    """A letter as the pipelined publisher sends it (properties built once)."""

    __slots__ = ("message_id", "exchange", "routing_key", "body", "properties")

    def __init__(self, letter: Letter) -> None:
        self.message_id = letter.message_id
        self.exchange = letter.exchange
        self.routing_key = letter.routing_key
        self.body = letter.body
        self.properties = build_properties(letter)


class Batch:
    """Letters claimed together on one database connection, and their outcomes as (status, reason)."""

    def __init__(self, db, letters: list[Letter]) -> None:
        self.db = db  # on PostgreSQL, in the open transaction that holds the letters' row locks
        self.letters = letters
        self.outcomes: list[tuple[str, str] | None] = [None] * len(letters)
        self.sendable: list[int] = []


class Relay:
    """Claims due letters, publishes them with pipelined confirms, records the outcomes."""

    def __init__(self, options: RelayOptions) -> None:
        self.options = options
        self.stop_requested = StopFlag()
        self.totals: Counter[str] = Counter()
        timeout = options.timeout or conf.get("MAILROOM_PUBLISH_TIMEOUT")
        self.pipeline = PipelinedPublisher(timeout=timeout, window=options.window)
        # A batch is at most one window, so a whole batch is in flight at once.
        self.batch_size = min(options.batch_size, options.window)
        # Row locks where the database has them (PostgreSQL): two connections of the relay's own,
        # one per batch in hand, each batch's transaction open until its outcomes are committed.
        self.holds_locks = connection.vendor == "postgresql"
        self._databases: list = []  # opened by the thread that claims (a connection belongs to its thread)

    def request_stop(self) -> None:
        self.stop_requested.set()

    def run(self) -> int:
        """Relay until stopped (or, with `once`, until nothing is due). Returns the exit code."""
        logger.info("relay started batch_size=%s once=%s", self.batch_size, self.options.once)
        delays, code = None, 0
        try:
            while not self.stop_requested.is_set():
                close_old_connections()
                for db in self._databases:
                    db.close_if_unusable_or_obsolete()
                try:
                    self.relay_due()
                    delays = None
                except FatalBrokerError as exc:  # the claimed letters roll back: they stay pending
                    logger.error("cannot publish: %s (check RABBITMQ_URL's user, password and vhost); "
                                 "the letters stay pending", exc)
                    code = 1
                    break
                except DatabaseError as exc:  # nothing claimed is lost: the letters stay pending
                    if self.options.once:
                        logger.error("database unavailable (%s); the rest stays pending", exc)
                        code = 1
                        break
                    delays = delays or backoff_delays()
                    delay = next(delays)
                    logger.error("database unavailable (%s); retrying in %.1fs", exc, delay)
                    self.stop_requested.wait(delay)
                    continue
                if self.options.once:
                    break
                self.stop_requested.wait(self.options.idle_seconds)
        finally:
            self.close()
        logger.info("relay stopped %s", " ".join(f"{k}={v}" for k, v in sorted(self.totals.items())) or "relayed=0")
        return code

    def close(self) -> None:
        """Close the relay's broker connections and its own database connections (open claims roll back)."""
        self.pipeline.close()
        publisher().close()
        for db in self._databases:
            db.close()

    def relay_due(self) -> int:
        """Publish batches until nothing is due (or a stop is requested); returns how many were relayed.

        The next batch is claimed while the broker confirms this one, and this one is recorded
        while the broker works on the next. On any error the open claims roll back: their
        letters are due again at once, for this relay or another.
        """
        relayed, unsent = 0, None  # unsent: claimed, and its sending has not succeeded (yet)
        try:
            unsent = self.claim()
            current, unsent = self._send(unsent), None
            while current is not None:
                unsent = self.claim() if not self.stop_requested.is_set() else None
                self._collect(current)
                try:
                    following, unsent = self._send(unsent), None
                finally:  # what the broker confirmed is written, even if the next batch cannot go (a refused login)
                    self._record(current)
                relayed += len(current.letters)
                current = following
        finally:
            for db in self._databases:  # nothing is open after a clean pass; after an error, release the claims
                if db.connection is not None and not db.get_autocommit():
                    try:
                        db.rollback()
                        db.set_autocommit(True)
                    except DatabaseError:  # the connection itself is broken: closing it ends the transaction
                        db.close()
            if unsent is not None and not self.holds_locks:
                self._lift_lease(unsent)
        return relayed

    @staticmethod
    def _lift_lease(batch: Batch) -> None:
        """SQLite: a claimed batch that never went out is due again at once, as a rolled-back claim is
        on PostgreSQL: a relay restarted after a refused login does not wait out the lease."""
        pks = [letter.pk for letter in batch.letters]
        try:
            with relaxed_commit():
                Message.objects.filter(pk__in=pks, status=Message.Status.PENDING).update(next_attempt_at=timezone.now())
        except DatabaseError as exc:
            logger.warning("%s claimed letters stay claimed until their lease ends: %s", len(pks), exc)

    def claim(self) -> Batch | None:
        """Due letters, oldest due first, claimed for this relay (see the module's docstring).

        `ORDER BY next_attempt_at LIMIT n` is read in order from the partial index of pending
        letters. PostgreSQL is told not to sort instead: with statistics that lag a burst of pending
        letters (a broker that was down), the planner expects a few rows, fetches the whole backlog
        and sorts it for every batch, so each claim cost O(backlog).
        """
        now = timezone.now()
        meta = Message._meta
        quote = connection.ops.quote_name
        columns = ", ".join(quote(meta.pk.column if name == "pk" else meta.get_field(name).column) for name in COLUMNS)
        table, pk = quote(meta.db_table), quote(meta.pk.column)
        due_at = meta.get_field("next_attempt_at")
        due, status = quote(due_at.column), quote(meta.get_field("status").column)
        due_letters = f"SELECT {{}} FROM {table} WHERE {status} = %s AND {due} <= %s ORDER BY {due} LIMIT %s"
        if self.holds_locks:
            if not self._databases:
                self._databases = [connections.create_connection(DEFAULT_DB_ALIAS) for _ in range(2)]
            db = next(db for db in self._databases if db.get_autocommit())  # not holding a batch
            db.set_autocommit(False)
            with db.cursor() as cursor:
                # Losing an outcome in a PostgreSQL crash only means the letter is published again.
                cursor.execute("SET LOCAL synchronous_commit TO OFF; SET LOCAL enable_sort TO OFF")
                cursor.execute(due_letters.format(columns) + " FOR NO KEY UPDATE SKIP LOCKED",
                               [Message.Status.PENDING, due_at.get_db_prep_value(now, db), self.batch_size])
                rows = cursor.fetchall()
            if not rows:
                db.commit()
                db.set_autocommit(True)
                return None
            return Batch(db, [Letter(row) for row in rows])
        lease = now + timedelta(seconds=self.options.lease_seconds)
        sql = f"UPDATE {table} SET {due} = %s WHERE {pk} IN ({due_letters.format(pk)}) RETURNING {columns}"
        params = [due_at.get_db_prep_value(lease, connection), Message.Status.PENDING,
                  due_at.get_db_prep_value(now, connection), self.batch_size]
        with relaxed_commit(), connection.cursor() as cursor:  # losing a lease only means an earlier retry
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        return Batch(connection, [Letter(row) for row in rows]) if rows else None

    def _send(self, batch: Batch | None) -> Batch | None:
        if batch is None:
            return None
        batch.sendable = self._prepare_destinations(batch)
        if batch.sendable:
            self.pipeline.send([Outgoing(batch.letters[i]) for i in batch.sendable])
        return batch

    def _collect(self, batch: Batch) -> None:
        if batch.sendable:
            for index, result in zip(batch.sendable, self.pipeline.collect()):
                batch.outcomes[index] = self._translate(batch.letters[index], result)

    def _prepare_destinations(self, batch: Batch) -> list[int]:
        """Declare or check each exchange once per batch; letters to a missing one fail without publishing."""
        verdicts: dict[tuple, tuple[str, str] | None] = {}
        sendable = []
        for index, letter in enumerate(batch.letters):
            if not (letter.declare or letter.exchange):
                sendable.append(index)
                continue
            key = (letter.exchange, "" if letter.exchange else letter.routing_key, letter.declare, letter.exchange_type)
            if key not in verdicts:
                try:
                    publisher().prepare(exchange=letter.exchange, routing_key=letter.routing_key,
                                               declare=letter.declare, exchange_type=letter.exchange_type)
                    verdicts[key] = None
                except PublishRefused as exc:
                    verdicts[key] = (Message.Status.FAILED, str(exc))
                except BrokerError as exc:
                    if isinstance(exc.__cause__, FatalBrokerError):
                        raise exc.__cause__ from None  # the login or vhost: the relay stops (see run)
                    verdicts[key] = (Message.Status.PENDING, str(exc))
            if verdicts[key] is None:
                sendable.append(index)
            else:
                batch.outcomes[index] = verdicts[key]
        return sendable

    def _translate(self, letter: Letter, result: Outcome) -> tuple[str, str]:
        if result.status == Outcome.PUBLISHED:
            return Message.Status.PUBLISHED, ""
        if result.status == Outcome.UNROUTABLE:
            if letter.declare and not letter.exchange:
                # Its queue, declared by this relay before, may have been deleted since: the
                # blocking publisher declares it again and publishes the letter once more.
                return publish_once(letter)
            return Message.Status.UNROUTABLE, f"returned by the broker: {result.reason}"
        if result.status == Outcome.REFUSED:
            # The broker closed the channel (e.g. a letter over its size limit): publish each
            # unconfirmed letter alone on the blocking channel to learn which one it was.
            return publish_once(letter)
        return Message.Status.PENDING, result.reason

    def _record(self, batch: Batch) -> None:
        """One UPDATE per outcome (status, reason) of the batch, then the batch's commit."""
        groups: dict[tuple[str, str, int], list[int]] = defaultdict(list)
        for letter, (status, reason) in zip(batch.letters, batch.outcomes):
            attempts = letter.attempts + 1 if status == Message.Status.PENDING else 0
            groups[(status, reason, attempts)].append(letter.pk)
        if self.holds_locks:  # in the claim's transaction
            self._write_outcomes(batch.db, groups)
            batch.db.commit()  # and the row locks go
            batch.db.set_autocommit(True)
        else:  # the lease path: the batch's outcomes in one transaction
            with relaxed_commit():
                self._write_outcomes(batch.db, groups)
        for (status, reason, _), pks in groups.items():
            self.totals[status] += len(pks)
            log = logger.info if status == Message.Status.PUBLISHED else logger.warning
            log("relay %s=%s%s", status, len(pks), f" reason={reason}" if reason else "")

    @staticmethod
    def _write_outcomes(db, groups: dict[tuple[str, str, int], list[int]]) -> None:
        with db.cursor() as cursor:
            for (status, reason, attempts), pks in groups.items():
                fields = outcome_fields(status, reason, attempts=attempts)
                for part in in_lists(pks, pad=db.vendor == "sqlite"):  # a few statement shapes on SQLite
                    cursor.execute(outcome_sql(tuple(fields), letters=len(part)),
                                   [*outcome_params(db, fields), *part, Message.Status.PENDING])
