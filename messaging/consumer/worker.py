"""The `consume` worker: receive → record → commit → ack, in batches; reconnect; drain on a signal.

The main thread owns the broker connection (`amqp.subscription`) and never touches the database;
database threads record batches and run handlers while the main thread keeps the connection (and
its heartbeats) serviced. Without handlers several batches are recorded at once, each on its own
connection, so that one batch's Python work overlaps another's database work; their acks still go
out in the order the batches were received.
"""
from __future__ import annotations

import logging
import socket
import time
from collections import deque
from concurrent.futures import wait as wait_for_any

from django.db import DataError
from django.db import (
    Error as DatabaseError,  # also InterfaceError: "connection already closed"
)
from django.db import connection as db_connection
from django.utils.module_loading import import_string

from messaging.amqp.connection import FATAL_REPLY_CODES, NOT_DURABLE, Nodes
from messaging.amqp.subscription import Received, Subscription
from messaging.backoff import backoff_delays
from messaging.conf import unmigrated
from messaging.consumer import recording, registry, streams
from messaging.consumer.acks import Acks, Counts
from messaging.consumer.buffer import ByteBudget, InFlight, body_bytes, next_batch
from messaging.consumer.handlers import Handler, handler_paths
from messaging.consumer.options import ConsumeOptions
from messaging.consumer.recording import Settlement
from messaging.consumer.threads import RECORDING_THREADS, DatabaseThreads
from messaging.consumer.writers import writer_for
from messaging.errors import ConnectionLost, FatalBrokerError, NotMigrated
from messaging.stopping import StopFlag

logger = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 1.0  # how often an unread connection is serviced all the same (heartbeats)


class Consumer:
    """Consume `options.queues` until stopped, recording every delivery before it is acked."""

    def __init__(self, options: ConsumeOptions) -> None:
        self.options = options
        self.stop_requested = StopFlag()
        self.counts = Counts()
        self._handler_paths = handler_paths(options.queues, override=options.handler)
        self._writer = writer_for(db_connection.vendor)  # shared by the recording threads
        self._handlers: dict[str, Handler] = {}  # by the queue's real (maybe server-made) name
        self._tap = streams.tap_for(options)  # reading streams: their batches are recorded one at a time, in order
        self._threads = DatabaseThreads(recorders=1 if self._handler_paths or self._tap else RECORDING_THREADS[db_connection.vendor])
        self._pending: list[Received] = []
        self._budget = ByteBudget(options.max_unacked_bytes)  # bodies in _pending and _in_flight
        self._one_by_one = 0  # the first deliveries of _pending to record alone (a batch the database refused)
        self._unsettled: list[Settlement] = []  # acked/nacked, settlement not yet written
        self._unsettled_ids: frozenset = frozenset()  # their message_id properties
        self._in_flight: deque[InFlight] = deque()  # batches being recorded, oldest first
        self._db_delays = backoff_delays(cap=10.0)
        self._db_retry_at = 0.0
        self._worker_id: int | None = None
        self._last_activity = time.monotonic()
        self._last_read = 0.0  # when the connection was last serviced
        self._heartbeat = registry.Heartbeat(self._threads.submit)
        self._subscription: Subscription | None = None
        self._logged_in = False  # connected to the broker before (see `handshake_error`)
        self._nodes = Nodes()  # which broker node to connect to: spread, then the next after a loss
        self._draining = False  # stopping: record nothing more, only finish the batch in hand
        self._database_down = False  # it failed while starting or stopping: do not wait for it again
        self._acks: Acks | None = None
        self._warned: set[str] = set()  # queues (as named) already said not to survive a broker restart

    def request_stop(self) -> None:
        """Finish the delivery in hand, then stop (safe to call from a signal handler)."""
        self.stop_requested.set()

    def run(self) -> int:
        """Consume until stopped, `max_messages` or `inactivity_timeout`; return the exit code."""
        try:
            self._worker_id = self._register_until_done()
        except NotMigrated as exc:
            logger.error("cannot consume: %s", exc)
            self._threads.close()
            return 1
        delays = backoff_delays()
        code = 0
        try:
            while not self._done():
                try:
                    self._consume()
                    delays = backoff_delays()
                except FatalBrokerError as exc:
                    logger.error("cannot consume: %s (%s)", exc, exc.hint)
                    code = 1
                    break
                except ConnectionLost as exc:
                    if exc.reply_code in FATAL_REPLY_CODES:
                        # e.g. no permission on the queue (403): retrying cannot help.
                        logger.error("cannot consume: %s (check the user's permissions)", exc)
                        self._drop_connection(reason=str(exc))
                        code = 1
                        break
                    if self._subscription is not None and self._subscription.consuming:
                        delays = backoff_delays()  # it was consuming: start the backoff afresh
                    self._drop_connection(reason=str(exc))
                    if self._done():
                        break
                    delay = next(delays)
                    self.counts.reconnects += 1
                    logger.warning("connection lost (%s); reconnecting in %.1fs", exc, delay)
                    self.stop_requested.wait(delay)
        finally:
            self._close()
            try:
                if self._database_down:
                    logger.error("database unavailable: the worker row is not marked stopped")
                else:
                    self._db_call(self._unregister)
            except DatabaseError as exc:
                logger.error("could not mark the worker stopped: %s", exc)
            self._threads.close()
        logger.info(
            "consume stopped: received=%s acked=%s requeued=%s rejected=%s duplicates=%s reconnects=%s",
            self.counts.received, self.counts.acked, self.counts.requeued, self.counts.rejected,
            self.counts.duplicates, self.counts.reconnects,
        )
        return code

    def _done(self) -> bool:
        if self.stop_requested.is_set():
            return True
        limit = self.options.max_messages
        drained = not self._pending and not self._in_flight and not self._unsettled
        if limit is not None and self.counts.received >= limit and drained:
            return True
        timeout = self.options.inactivity_timeout
        if timeout is not None and time.monotonic() - self._last_activity >= timeout:
            logger.info("no delivery for %ss; stopping", timeout)
            return True
        return False

    # --- the connection ----------------------------------------------------------------------------
    def _consume(self) -> None:
        o = self.options
        self._subscription = subscription = Subscription(
            heartbeat=o.heartbeat, client_name=f"mailroom-consume {socket.gethostname()}",
            logged_in_before=self._logged_in, nodes=self._nodes)
        self._logged_in = True
        queues = []
        for name, state in zip(o.queues or ("",), subscription.declare(o.topology())):
            path = self._handler_paths.get(name)
            if path:
                self._handlers[state.name] = import_string(path)
            logger.info("queue=%s ready=%s consumers=%s handler=%s", state.name, state.message_count,
                        state.consumer_count, path or "-")
            if not state.survives_restart and name not in self._warned:
                self._warned.add(name)
                logger.warning("queue=%s %s", state.name, NOT_DURABLE)
            queues.append(state.name)
        prefetch = o.prefetch if o.max_messages is None else max(1, min(o.prefetch, o.max_messages))
        subscription.consume(queues, prefetch=prefetch, on_delivery=self._on_delivery,
                             streams=self._db_call(self._tap.starts) if self._tap else {})
        if queues != list(o.queues):  # server-named queues: the registry shows their real names
            self._threads.submit(registry.set_queues, self._worker_id, queues)
        self._draining = False
        self._acks = Acks(subscription, self.counts)
        logger.info("consuming queues=%s prefetch=%s batch=%s max_unacked_bytes=%s", ",".join(o.queues) or "(server-named)",
                    prefetch, o.batch_size, o.max_unacked_bytes)
        while not self._done():
            self._read()
            self._pump()
            self._heartbeat.beat(self._worker_id, self.counts)
        self._finish()

    def _on_delivery(self, received: Received) -> None:
        limit = self.options.max_messages
        if self._draining or (limit is not None and self.counts.received >= limit):
            return  # left unacked: the broker gives it back when we close
        self.counts.received += 1
        self._pending.append(received)
        self._budget.take(received)

    def _read(self) -> None:
        """Service the connection (deliveries, heartbeats, wake-ups: see _submit), or leave it unread, the
        broker's sends waiting in the socket, while the worker holds its limit in bytes (see `buffer`)."""
        if not self._budget.full:
            self._subscription.process(0.5)
        else:
            if self._in_flight:
                wait_for_any([self._in_flight[0].future], timeout=KEEPALIVE_SECONDS)
            else:  # waiting for the database to come back (see _pump)
                self.stop_requested.wait(min(KEEPALIVE_SECONDS, max(0.0, self._db_retry_at - time.monotonic())))
            if time.monotonic() - self._last_read < KEEPALIVE_SECONDS:
                return
            self._subscription.process(0)  # one read at most, for the heartbeats
        self._last_read = time.monotonic()

    def _finish(self) -> None:
        """Finish the batch in hand (record, ack, write the acks), then close.

        Deliveries buffered but not yet recorded are left unacked: the broker requeues them on close.
        """
        self._draining = True
        self._budget.release(body_bytes(self._pending))
        self._pending.clear()
        while self._in_flight or self._unsettled:
            self._subscription.process(0.2)
            self._pump()
            if self._db_retry_at > time.monotonic():
                # Stopping is not worth waiting for a database that fails: what was not committed
                # stays unacked (the broker requeues it); handlers' acks already sent stay 'received' rows.
                logger.error(
                    "database unavailable while stopping: %s buffered deliveries left unacked, %s acks not written",
                    len(self._pending), len(self._unsettled),
                )
                self._database_down = True
                # A batch still being recorded may yet commit, its rows written 'acked' with no ack
                # to follow: wait for it, and mark what it committed lost (the broker requeues it).
                self._drop_connection(reason="the worker stopped while the database failed")
                return
        self._close()

    def _drop_connection(self, *, reason: str) -> None:
        """The connection died: nothing in hand can be acked any more; the broker requeues it."""
        in_flight, self._in_flight = self._in_flight, deque()
        # Never acked, so delivered again: they count (for --max-messages) when they come back.
        self.counts.received -= len(self._pending) + sum(len(item.batch) for item in in_flight)
        self._pending.clear()  # never recorded
        self._budget.clear()
        self._one_by_one = 0
        self._close()
        try:
            lost = []
            for item in in_flight:
                try:
                    lost += [s.delivery_id for s in item.future.result()]
                except DatabaseError:
                    self._unsettled[:0] = item.settled
            if lost:
                self._db_call(recording.record_lost, lost, reason=f"not acked: {reason}; the broker requeues it")
            if self._unsettled:
                self._write_settlements()
        except DatabaseError as exc:
            logger.error("could not record the state after the connection loss: %s", exc)

    def _close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    # --- batches: recorded on the database threads while pika keeps receiving ------------------------
    def _pump(self) -> None:
        """Ack the batches whose rows were committed, oldest first; start recording the next ones."""
        retried = 0  # failed batches go back to the front of the buffer, in the order they came
        while self._in_flight and self._in_flight[0].future.done():
            in_flight = self._in_flight.popleft()
            try:
                settlements = in_flight.future.result()
            except DatabaseError as exc:
                # No delivery of this batch was committed (at most its new messages and the earlier
                # settlements, which are written again harmlessly), so nothing is acked: try it again later.
                self._unsettled[:0] = in_flight.settled
                self._unsettled_ids |= in_flight.settling_ids
                if isinstance(exc, DataError) and self._unsettled:
                    self._write_settlements()  # alone: the refused value may have been one of theirs
                if isinstance(exc, DataError) and not self._unsettled and self._set_aside(in_flight.batch, exc, at=retried):
                    retried += len(in_flight.batch) if len(in_flight.batch) > 1 else 0
                    continue
                self._pending[retried:retried] = in_flight.batch
                retried += len(in_flight.batch)
                delay = next(self._db_delays)
                self._db_retry_at = time.monotonic() + delay
                logger.error("database unavailable (%s); nothing acked, retrying in %.1fs", exc, delay)
                continue
            self._db_delays = backoff_delays(cap=10.0)
            if settlements:
                try:
                    self._acks.settle(settlements, batch=in_flight.batch)
                except ConnectionLost:
                    self._in_flight.appendleft(in_flight)  # _drop_connection marks them lost
                    raise
                self._budget.release(in_flight.size)
                unwritten = [s for s in settlements if not s.recorded]  # handlers' outcomes
                if unwritten:
                    self._unsettled.extend(unwritten)
                    self._unsettled_ids |= in_flight.message_ids
        if time.monotonic() < self._db_retry_at:
            return
        while len(self._in_flight) < len(self._threads.recorders):
            if not self._budget.worth_a_batch(len(self._pending), self._in_flight, batch_size=self.options.batch_size):
                return
            batch = self._next_batch() if not self._draining else []
            if batch:
                self._last_activity = time.monotonic()
                self._submit(batch)
            elif self._unsettled and not self._in_flight:
                self._submit([])  # idle: write the acks now rather than with the next batch
                return
            else:
                return

    def _set_aside(self, batch: list[Received], exc: DataError, *, at: int) -> bool:
        """The database refused a value of this batch (not the database being down): record its messages
        one by one, and the one it refuses alone as rejected (`recording.record_refused`).

        Returns whether that was done; if the refused message cannot be recorded even so, the batch
        goes the way of a database that is down (retried with backoff, nothing acked).
        """
        if len(batch) > 1:
            logger.warning("the database refused a value of a batch of %s messages (%s); recording them one by one",
                           len(batch), exc.__class__.__name__)
            self._pending[at:at] = batch
            self._one_by_one = max(self._one_by_one, at + len(batch))
            return True
        [r] = batch
        reason = f"the database refused this message as it came ({exc.__class__.__name__}: {exc})"[:2000]
        try:
            settlement = self._db_call(recording.record_refused, r, worker_id=self._worker_id, reason=reason, tap=self._tap)
        except DatabaseError as again:
            logger.error("could not record a message the database refuses (%s)", again)
            return False
        logger.error("delivery=%s message=%s rejected: %s", settlement.delivery_id, settlement.message_id, reason,
                     extra={"message_id": r.properties.message_id, "queue": r.queue})
        self._acks.settle([settlement])
        self._budget.release(len(r.body))
        return True

    def _next_batch(self) -> list[Received]:
        """Take the next batch off the buffer (see `buffer.next_batch`)."""
        pending = next_batch(self._pending, count=1 if self._one_by_one else self.options.batch_size,
                             budget=self._budget, in_flight=self._in_flight)
        del self._pending[: len(pending)]
        self._one_by_one = max(0, self._one_by_one - len(pending))
        return pending

    def _submit(self, batch: list[Received]) -> None:
        """Record `batch` (and the earlier batches' settlements) on a free database thread."""
        settled, self._unsettled = self._unsettled, []
        settling_ids, self._unsettled_ids = self._unsettled_ids, frozenset()
        busy = {item.recorder for item in self._in_flight}
        recorder = next(r for r in self._threads.recorders if r not in busy)
        future = self._threads.record(
            recorder, recording.record_batch, batch, writer=self._writer, worker_id=self._worker_id, settled=settled,
            handlers=self._handlers, max_retries=self.options.max_retries, retry_delays=self.options.retry_delays, tap=self._tap,
        )
        # message_ids as received (ids equal only once cut to 255 characters still share one row, by the unique constraint).
        message_ids = frozenset([r.properties.message_id for r in batch]) if len(self._threads.recorders) > 1 else frozenset()
        self._in_flight.append(InFlight(
            future=future, batch=batch, size=body_bytes(batch), settled=settled, recorder=recorder, message_ids=message_ids,
            settling_ids=settling_ids,
        ))
        future.add_done_callback(lambda _, subscription=self._subscription: subscription.wake())

    def _write_settlements(self) -> None:
        try:
            self._db_call(recording.record_settled, self._unsettled, writer=self._writer)
            self._unsettled, self._unsettled_ids = [], frozenset()
        except DatabaseError as exc:
            # The rows exist (status 'received'); their settlement is written with the next batch.
            logger.error("could not record %s settlements yet: %s", len(self._unsettled), exc)

    def _db_call(self, fn, *args, **kwargs):
        """Run `fn` on the registry's database thread (the recorders may be busy or stuck on a batch)."""
        return self._threads.call(fn, *args, meanwhile=lambda: self._service_io(0), **kwargs)

    def _service_io(self, seconds: float) -> None:
        """Let pika answer heartbeats (deliveries that arrive meanwhile are only buffered)."""
        if self._subscription is not None:
            try:
                self._subscription.process(seconds)
            except ConnectionLost:
                pass  # the main loop finds out at its next `process`
        elif seconds:
            self.stop_requested.wait(seconds)

    def _register_until_done(self) -> int | None:
        delays = backoff_delays(cap=10.0)
        while not self.stop_requested.is_set():
            try:
                return self._db_call(registry.register, list(self.options.queues))
            except DatabaseError as exc:
                problem = self._db_call(unmigrated)  # reachable but without our tables: waiting cannot help
                if problem:
                    raise NotMigrated(problem) from exc
                delay = next(delays)
                logger.error("database unavailable (%s); retrying in %.1fs", exc, delay)
                self.stop_requested.wait(delay)
        self._database_down = True
        return None

    def _unregister(self) -> None:
        if self._unsettled:
            recording.record_settled(self._unsettled, writer=self._writer)
            self._unsettled = []
        c = self.counts
        registry.save_counts(self._worker_id, acked=c.acked, requeued=c.requeued, rejected=c.rejected, stopped=True)

