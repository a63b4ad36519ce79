"""The outbox relay: publish every message still pending, in batches with pipelined confirms.

A message stays pending when the web request that wrote it crashed before publishing, when the
broker was down or blocked, or when it nacked. The relay claims a batch of due messages so that
several relays never publish one at once (how, per database: `messaging.outbox.claims`), publishes
the batch with confirms in flight and records the outcomes; the database work overlaps the broker's.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

from django.db import (
    Error as DatabaseError,  # also InterfaceError: "connection already closed"
)
from django.db import close_old_connections, connection

from messaging import conf
from messaging.amqp.codec import build_properties
from messaging.amqp.pipeline import Outcome, PipelinedPublisher
from messaging.amqp.publisher import publisher
from messaging.backoff import backoff_delays
from messaging.errors import BrokerError, FatalBrokerError, PublishRefused
from messaging.models import Message
from messaging.outbox.claims import Batch, ClaimedMessage, Outcomes, claims_for
from messaging.outbox.publishing import publish_once
from messaging.stopping import StopFlag

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RelayOptions:
    batch_size: int = 1000
    once: bool = False
    idle_seconds: float = 1.0
    lease_seconds: float = 60.0  # SQLite: how long a claimed batch is kept from other relays
    window: int = 1000
    timeout: float | None = None  # broker timeout; MAILROOM_PUBLISH_TIMEOUT when None


class OutgoingMessage:
    """A claimed message as the pipelined publisher sends it (properties built once)."""

    __slots__ = ("message_id", "exchange", "routing_key", "body", "properties")

    def __init__(self, message: ClaimedMessage) -> None:
        self.message_id = message.message_id
        self.exchange = message.exchange
        self.routing_key = message.routing_key
        self.body = message.body
        self.properties = build_properties(message)


class Relay:
    """Claims due messages, publishes them with pipelined confirms, records the outcomes."""

    def __init__(self, options: RelayOptions) -> None:
        self.options = options
        self.stop_requested = StopFlag()
        self.totals: Counter[str] = Counter()
        timeout = options.timeout or conf.get("MAILROOM_PUBLISH_TIMEOUT")
        self.pipeline = PipelinedPublisher(timeout=timeout, window=options.window)
        # A batch is at most one window, so a whole batch is in flight at once.
        self.batch_size = min(options.batch_size, options.window)
        self.claims = claims_for(connection, lease_seconds=options.lease_seconds)

    def request_stop(self) -> None:
        self.stop_requested.set()

    def run(self) -> int:
        """Relay until stopped (or, with `once`, until nothing is due). Returns the exit code."""
        logger.info("relay started batch_size=%s once=%s", self.batch_size, self.options.once)
        delays, code = None, 0
        try:
            while not self.stop_requested.is_set():
                close_old_connections()
                self.claims.refresh()
                try:
                    self.relay_due()
                    delays = None
                except FatalBrokerError as exc:  # the claimed messages are released: they stay pending
                    logger.error("cannot publish: %s (check RABBITMQ_URL's user, password and vhost); "
                                 "the letters stay pending", exc)
                    code = 1
                    break
                except DatabaseError as exc:  # nothing claimed is lost: the messages stay pending
                    if problem := conf.unmigrated():  # reachable but without our tables: waiting cannot help
                        logger.error("cannot relay: %s", problem)
                        code = 1
                        break
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
        """Close the relay's broker connections and its own database connections (open claims end)."""
        self.pipeline.close()
        publisher().close()
        self.claims.close()

    def claim(self) -> Batch | None:
        """Due messages, oldest due first, claimed for this relay (see `messaging.outbox.claims`)."""
        return self.claims.claim(limit=self.batch_size)

    def relay_due(self) -> int:
        """Publish batches until nothing is due (or a stop is requested); returns how many were relayed.

        The next batch is claimed while the broker confirms this one, and this one is recorded
        while the broker works on the next. On any error the open claims are released: their
        messages are due again, for this relay or another.
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
                relayed += len(current.messages)
                current = following
        finally:
            self.claims.release(unsent)  # nothing is open after a clean pass
        return relayed

    def _send(self, batch: Batch | None) -> Batch | None:
        if batch is None:
            return None
        batch.sendable = self._prepare_destinations(batch)
        if batch.sendable:
            self.pipeline.send([OutgoingMessage(batch.messages[i]) for i in batch.sendable])
        return batch

    def _collect(self, batch: Batch) -> None:
        if batch.sendable:
            for index, result in zip(batch.sendable, self.pipeline.collect()):
                batch.outcomes[index] = self._translate(batch.messages[index], result)

    def _prepare_destinations(self, batch: Batch) -> list[int]:
        """Declare or check each exchange once per batch; messages to a missing one fail without publishing."""
        verdicts: dict[tuple, tuple[str, str] | None] = {}
        sendable = []
        for index, message in enumerate(batch.messages):
            if not (message.declare or message.exchange):
                sendable.append(index)
                continue
            key = (message.exchange, "" if message.exchange else message.routing_key, message.declare,
                   message.exchange_type)
            if key not in verdicts:
                try:
                    publisher().prepare(exchange=message.exchange, routing_key=message.routing_key,
                                        declare=message.declare, exchange_type=message.exchange_type)
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

    def _translate(self, message: ClaimedMessage, result: Outcome) -> tuple[str, str]:
        if result.status == Outcome.PUBLISHED:
            return Message.Status.PUBLISHED, ""
        if result.status == Outcome.UNROUTABLE:
            if message.declare and not message.exchange:
                # Its queue, declared by this relay before, may have been deleted since: the
                # blocking publisher declares it again and publishes the message once more.
                return publish_once(message)
            return Message.Status.UNROUTABLE, f"returned by the broker: {result.reason}"
        if result.status == Outcome.REFUSED:
            # The broker closed the channel (e.g. a message over its size limit): publish each
            # unconfirmed message alone on the blocking channel to learn which one it was.
            return publish_once(message)
        return Message.Status.PENDING, result.reason

    def _record(self, batch: Batch) -> None:
        """Write the batch's outcomes, grouped by (status, reason, attempts), and end its claim."""
        outcomes: Outcomes = defaultdict(list)
        for message, (status, reason) in zip(batch.messages, batch.outcomes):
            attempts = message.attempts + 1 if status == Message.Status.PENDING else 0
            outcomes[(status, reason, attempts)].append(message.pk)
        self.claims.record(batch, outcomes)
        for (status, reason, _), pks in outcomes.items():
            self.totals[status] += len(pks)
            log = logger.info if status == Message.Status.PUBLISHED else logger.warning
            log("relay %s=%s%s", status, len(pks), f" reason={reason}" if reason else "")
