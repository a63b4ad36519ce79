"""The `consume` worker: receive → record → commit → ack, in batches; reconnect; drain on a signal.

The main thread owns the pika connection and never touches the database; database threads record
batches and run handlers while the main thread keeps pika's I/O (and heartbeats) serviced. Without
handlers two batches (three on PostgreSQL) are recorded at once, each on its own connection, so that
one batch's Python work overlaps another's database work; their acks still go out in the order the
batches were received.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from django.db import DataError, close_old_connections
from django.db import (
    Error as DatabaseError,  # also InterfaceError: "connection already closed"
)
from django.db import connection as db_connection
from django.utils import timezone
from django.utils.module_loading import import_string

from messaging import conf
from messaging.amqp.connection import (
    FATAL_REPLY_CODES,
    PIKA_ERRORS,
    connect,
    declare_exchange,
    declare_queue,
    describe,
)
from messaging.backoff import backoff_delays
from messaging.consumer import recording
from messaging.errors import ChannelLost, FatalBrokerError, QueueGone
from messaging.models import Delivery
from messaging.models import Worker as WorkerRow
from messaging.stopping import StopFlag

logger = logging.getLogger(__name__)

WORKER_HEARTBEAT_SECONDS = 5.0
CONNECTION_CHECK_SECONDS = 30.0
# Batches recorded at once when no handler runs (handlers run one batch at a time), by database:
# SQLite has one writer, where a third thread only adds to the GIL's traffic; PostgreSQL's backends
# work in parallel (seven interleaved rounds of bench/consume.py's throughput measure: 0.46× against
# 0.44× with two, and no round below 0.41× against 0.37×).
RECORDING_THREADS = {"sqlite": 2, "postgresql": 3}
# The cycle collector while consuming: the youngest generation collected every 50,000 allocations
# rather than 700, and what was alive at the start left out of its walks (see `fewer_gc_passes`).
GC_THRESHOLDS = (50_000, 20, 100)


@dataclass(frozen=True, kw_only=True)
class ConsumeOptions:
    queues: tuple[str, ...] = ()
    prefetch: int = 2000  # what bench/consume.py shows best on both databases, with batch_size 500
    batch_size: int = 500
    max_messages: int | None = None
    inactivity_timeout: float | None = None
    handler: str = ""
    max_retries: int = 5
    dead_letter_exchange: str = ""
    exchange: str = ""
    exchange_type: str = "direct"
    binding_keys: tuple[str, ...] = ()
    queue_type: str = ""
    heartbeat: int = 30


@dataclass(frozen=True, kw_only=True)
class InFlight:
    future: Future
    batch: list[recording.Received]
    settled: list[recording.Settlement]
    recorder: ThreadPoolExecutor
    # A letter in this batch, or among the settlements it writes, waits for it to commit before it is
    # recorded again: its attempt number and duplicate check must see the earlier delivery, settled.
    message_ids: frozenset
    settling_ids: frozenset


@dataclass
class Counts:
    received: int = 0
    acked: int = 0
    requeued: int = 0
    rejected: int = 0
    duplicates: int = 0
    reconnects: int = 0


class Worker:
    """Consume `options.queues` until stopped, recording every delivery before it is acked."""

    def __init__(self, options: ConsumeOptions) -> None:
        self.options = options
        self.stop_requested = StopFlag()
        self.counts = Counts()
        self._handler_paths = self._handler_paths_by_queue()
        self._handlers: dict[str, recording.Handler] = {}  # by the queue's real (maybe server-made) name
        # One executor per thread, each with its own database connection. The worker registry has a
        # thread of its own, so that its heartbeat is not held up behind a long handler.
        threads = 1 if self._handler_paths else RECORDING_THREADS.get(db_connection.vendor, 2)
        self._recorders = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mailroom-db{i}") for i in range(threads)]
        self._registry = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailroom-registry")
        self._pending: list[recording.Received] = []
        self._one_by_one = 0  # the first letters of _pending to record alone (a batch the database refused)
        self._unsettled: list[recording.Settlement] = []  # acked/nacked, settlement not yet written
        self._unsettled_ids: frozenset = frozenset()  # their letters' message_id properties
        self._in_flight: deque[InFlight] = deque()  # batches being recorded, oldest first
        self._db_delays = backoff_delays(cap=10.0)
        self._db_retry_at = 0.0
        self._connections_checked_at: dict[int, float] = {}  # per database thread
        self._worker_id: int | None = None
        self._last_activity = time.monotonic()
        self._last_heartbeat = 0.0
        self._heartbeat_saving: Future | None = None
        self._connection = None
        self._channel = None
        self._consumers = 0  # consumers on the channel; fewer means the broker cancelled one
        self._draining = False  # stopping: record nothing more, only finish the batch in hand
        self._database_down = False  # it failed while starting or stopping: do not wait for it again
        self._settled_below = 1
        self._settled_above: set[int] = set()

    # --- lifecycle -------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the delivery in hand, then stop (safe to call from a signal handler)."""
        self.stop_requested.set()

    def run(self) -> int:
        """Consume until stopped, `max_messages` or `inactivity_timeout`; return the exit code."""
        with fewer_gc_passes():
            return self._run()

    def _run(self) -> int:
        self._worker_id = self._register_until_done()
        delays = backoff_delays()
        code = 0
        try:
            while not self._done():
                try:
                    self._consume()
                    delays = backoff_delays()
                except FatalBrokerError as exc:
                    logger.error("cannot consume: %s (check RABBITMQ_URL's user, password and vhost)", exc)
                    code = 1
                    break
                except (QueueGone, ChannelLost, *PIKA_ERRORS) as exc:
                    if getattr(exc, "reply_code", None) in FATAL_REPLY_CODES:
                        # e.g. no permission on the queue (403): retrying cannot help.
                        logger.error("cannot consume: %s (check the user's permissions)", describe(exc))
                        self._drop_connection(reason=describe(exc))
                        code = 1
                        break
                    if self._consumers:  # it was consuming: start the backoff afresh
                        delays = backoff_delays()
                    self._drop_connection(reason=describe(exc))
                    if self._done():
                        break
                    delay = next(delays)
                    self.counts.reconnects += 1
                    logger.warning("connection lost (%s); reconnecting in %.1fs", describe(exc), delay)
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
            for executor in (*self._recorders, self._registry):
                executor.submit(lambda: db_connection.close())  # the database thread's own connection
                executor.shutdown(wait=True)
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
        self._connection = connect(heartbeat=o.heartbeat, client_name=f"mailroom-consume {socket.gethostname()}")
        channel = self._connection.channel()
        queues = []
        for name in o.queues or ("",):
            # A declaration that mismatches an existing queue closes the channel (406) and we go
            # on with another: so declare everything first, then set QoS and consume on the last.
            channel, queue = self._declare(channel, name)
            queues.append(queue)
        prefetch = o.prefetch if o.max_messages is None else max(1, min(o.prefetch, o.max_messages))
        channel.basic_qos(prefetch_count=prefetch)
        for queue in queues:
            channel.basic_consume(queue=queue, on_message_callback=self._receiver(queue))
        self._channel = channel
        self._consumers = len(channel.consumer_tags)
        if list(queues) != list(o.queues):  # server-named queues: the registry shows their real names
            self._registry.submit(self._in_db_thread, WorkerRow.objects.filter(pk=self._worker_id).update, queues=queues)
        self._draining = False
        self._settled_below = 1  # every delivery tag below this one is settled on this channel
        self._settled_above: set[int] = set()
        logger.info("consuming queues=%s prefetch=%s batch=%s", ",".join(o.queues) or "(server-named)", prefetch, o.batch_size)
        while not self._done():
            # Returns on deliveries, or when a database thread finishes a batch (see _submit).
            self._connection.process_data_events(time_limit=0.5)
            self._pump()
            if self._channel.is_closed:
                # e.g. a delivery unacked past consumer_timeout (406): its deliveries are requeued.
                raise ChannelLost("the broker closed the channel (consumer_timeout?); opening another")
            if len(self._channel.consumer_tags) < self._consumers:
                raise QueueGone("the broker cancelled a consumer (queue deleted?); declaring it again")
            self._heartbeat()
        self._finish()

    def _declare(self, channel, name: str):
        o = self.options
        arguments = {}
        if o.queue_type:
            arguments["x-queue-type"] = o.queue_type
        if o.dead_letter_exchange:
            arguments["x-dead-letter-exchange"] = o.dead_letter_exchange
            channel = declare_exchange(self._connection, channel, o.dead_letter_exchange, exchange_type="fanout")
        channel, state = declare_queue(self._connection, channel, name, arguments=arguments, exclusive=not name)
        if o.exchange:
            channel = declare_exchange(self._connection, channel, o.exchange, exchange_type=o.exchange_type)
            for key in o.binding_keys or ("",):
                channel.queue_bind(queue=state.name, exchange=o.exchange, routing_key=key)
        path = self._handler_paths.get(name)
        if path:
            self._handlers[state.name] = import_string(path)
        logger.info(
            "queue=%s ready=%s consumers=%s handler=%s", state.name, state.message_count, state.consumer_count,
            path or "-",
        )
        return channel, state.name

    def _receiver(self, queue: str):
        pending = self._pending
        limit = self.options.max_messages

        def on_delivery(_channel, method, properties, body) -> None:
            if self._draining or (limit is not None and self.counts.received >= limit):
                return  # left unacked: the broker gives it back when we close
            self.counts.received += 1
            pending.append(recording.Received(
                queue=queue, consumer_tag=method.consumer_tag, delivery_tag=method.delivery_tag,
                redelivered=method.redelivered, exchange=method.exchange, routing_key=method.routing_key,
                properties=properties, body=body,
            ))

        return on_delivery

    def _finish(self) -> None:
        """Finish the batch in hand (record, ack, write the acks), then close.

        Deliveries buffered but not yet recorded are left unacked: the broker requeues them on close.
        """
        self._draining = True
        self._pending.clear()
        while self._in_flight or self._unsettled:
            self._connection.process_data_events(time_limit=0.2)
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
        try:
            if self._connection is not None and self._connection.is_open:
                self._connection.close()
        except PIKA_ERRORS:
            pass
        self._connection = self._channel = None
        self._consumers = 0

    # --- batches: recorded on the database threads while pika keeps receiving ------------------------
    def _pump(self) -> None:
        """Ack the batches whose rows were committed, oldest first; start recording the next ones."""
        retried = 0  # failed batches go back to the front of the buffer, in the order they came
        while self._in_flight and self._in_flight[0].future.done():
            in_flight = self._in_flight.popleft()
            try:
                settlements = in_flight.future.result()
            except DatabaseError as exc:
                # No delivery of this batch was committed (at most its new letters and the earlier
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
                    self._settle(settlements)
                except PIKA_ERRORS:
                    self._in_flight.appendleft(in_flight)  # _drop_connection marks them lost
                    raise
                unwritten = [s for s in settlements if not s.recorded]  # handlers' outcomes
                if unwritten:
                    self._unsettled.extend(unwritten)
                    self._unsettled_ids |= in_flight.message_ids
        if time.monotonic() < self._db_retry_at:
            return
        while len(self._in_flight) < len(self._recorders):
            if self._in_flight and len(self._pending) < self.options.batch_size // 2:
                return  # a second batch only when enough is waiting: small batches cost more than they save
            batch = self._next_batch() if not self._draining else []
            if batch:
                self._last_activity = time.monotonic()
                self._submit(batch)
            elif self._unsettled and not self._in_flight:
                self._submit([])  # idle: write the acks now rather than with the next batch
                return
            else:
                return

    def _set_aside(self, batch: list[recording.Received], exc: DataError, *, at: int) -> bool:
        """The database refused a value of this batch (not the database being down): record its letters
        one by one, and the one it refuses alone as rejected (`recording.record_refused`).

        Returns whether that was done; if the refused letter cannot be recorded even so, the batch
        goes the way of a database that is down (retried with backoff, nothing acked).
        """
        if len(batch) > 1:
            logger.warning("the database refused a value of a batch of %s letters (%s); recording them one by one",
                           len(batch), exc.__class__.__name__)
            self._pending[at:at] = batch
            self._one_by_one = max(self._one_by_one, at + len(batch))
            return True
        [r] = batch
        reason = f"the database refused this letter as it came ({exc.__class__.__name__}: {exc})"[:2000]
        try:
            settlement = self._db_call(recording.record_refused, r, worker_id=self._worker_id, reason=reason)
        except DatabaseError as again:
            logger.error("could not record a letter the database refuses (%s)", again)
            return False
        logger.error("delivery=%s message=%s rejected: %s", settlement.delivery_id, settlement.message_id, reason)
        self._settle([settlement])
        return True

    def _next_batch(self) -> list[recording.Received]:
        """Take up to `batch_size` deliveries off the buffer, stopping at a letter that a batch still
        being recorded holds: it is recorded after that batch committed, so that its attempt number
        and duplicate check see the earlier delivery (a letter without message_id is matched by
        content, so it waits for every batch)."""
        pending = self._pending[: 1 if self._one_by_one else self.options.batch_size]
        if self._in_flight and pending:
            busy = frozenset().union(*(item.message_ids | item.settling_ids for item in self._in_flight))
            for i, r in enumerate(pending):
                message_id = r.properties.message_id
                if (message_id in busy) if message_id else r.redelivered:
                    del pending[i:]
                    break
        del self._pending[: len(pending)]
        self._one_by_one = max(0, self._one_by_one - len(pending))
        return pending

    def _submit(self, batch: list[recording.Received]) -> None:
        """Record `batch` (and the earlier batches' settlements) on a free database thread."""
        settled, self._unsettled = self._unsettled, []
        settling_ids, self._unsettled_ids = self._unsettled_ids, frozenset()
        busy = {item.recorder for item in self._in_flight}
        recorder = next(r for r in self._recorders if r not in busy)
        future = recorder.submit(
            self._in_db_thread, recording.record_batch, batch, worker_id=self._worker_id,
            handlers=self._handlers, max_retries=self.options.max_retries, settled=settled,
        )
        # message_id properties as received (ids that only the truncation to 255 characters makes
        # equal are not held back: their letter row is still one, by the unique constraint).
        message_ids = frozenset([r.properties.message_id for r in batch]) if len(self._recorders) > 1 else frozenset()
        self._in_flight.append(InFlight(
            future=future, batch=batch, settled=settled, recorder=recorder, message_ids=message_ids,
            settling_ids=settling_ids,
        ))
        connection = self._connection
        future.add_done_callback(lambda _: self._wake(connection))

    @staticmethod
    def _wake(connection) -> None:
        """Make the main thread's process_data_events return (called from a database thread)."""
        try:
            connection.add_callback_threadsafe(lambda: None)
        except Exception:  # noqa: BLE001 — the connection is gone; the main loop finds out by itself
            pass

    def _settle(self, settlements: list[recording.Settlement]) -> None:
        channel = self._channel
        tags = sorted(s.delivery_tag for s in settlements)
        acked = Delivery.Status.ACKED
        all_acked = all(s.action == acked for s in settlements)
        if all_acked and tags[0] == self._settled_below and tags[-1] - tags[0] + 1 == len(tags):
            # One ack for the whole batch — but only when it covers nothing else: `multiple` also
            # acks every earlier unsettled tag, e.g. a delivery dropped unrecorded while stopping.
            channel.basic_ack(delivery_tag=tags[-1], multiple=True)
        else:
            for s in settlements:
                if s.action == acked:
                    channel.basic_ack(delivery_tag=s.delivery_tag)
                else:
                    channel.basic_nack(delivery_tag=s.delivery_tag, requeue=s.action == Delivery.Status.REQUEUED)
        self._settled_above.update(tags)
        while self._settled_below in self._settled_above:
            self._settled_above.discard(self._settled_below)
            self._settled_below += 1
        if all_acked:
            self.counts.acked += len(settlements)
        else:
            for s in settlements:
                setattr(self.counts, s.action, getattr(self.counts, s.action) + 1)
        self.counts.duplicates += sum(s.duplicate for s in settlements)
        if logger.isEnabledFor(logging.DEBUG):
            for s in settlements:
                logger.debug("delivery=%s tag=%s %s", s.delivery_id, s.delivery_tag, s.action)

    def _write_settlements(self) -> None:
        try:
            self._db_call(recording.record_settled, self._unsettled)
            self._unsettled, self._unsettled_ids = [], frozenset()
        except DatabaseError as exc:
            # The rows exist (status 'received'); their settlement is written with the next batch.
            logger.error("could not record %s settlements yet: %s", len(self._unsettled), exc)

    # --- the database thread --------------------------------------------------------------------
    def _db_call(self, fn, *args, **kwargs):
        """Run `fn` on the registry's database thread (the recording threads may be busy or stuck on a
        batch); keep pika's I/O serviced while it runs."""
        future: Future = self._registry.submit(self._in_db_thread, fn, *args, **kwargs)
        while True:
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                self._service_io(0)

    def _in_db_thread(self, fn, *args, **kwargs):
        # Respect CONN_MAX_AGE now and then, not per batch: reconnecting per batch would cost more
        # than recording it.
        now, thread = time.monotonic(), threading.get_ident()
        if now - self._connections_checked_at.get(thread, 0.0) > CONNECTION_CHECK_SECONDS:
            self._connections_checked_at[thread] = now
            close_old_connections()
        try:
            return fn(*args, **kwargs)
        except DatabaseError:
            db_connection.close()  # reconnect on the next call
            raise

    def _service_io(self, seconds: float) -> None:
        """Let pika answer heartbeats (deliveries that arrive meanwhile are only buffered)."""
        if self._connection is not None and self._connection.is_open:
            self._connection.process_data_events(time_limit=seconds)
        elif seconds:
            self.stop_requested.wait(seconds)

    # --- worker registry --------------------------------------------------------------------------
    def _register_until_done(self) -> int | None:
        delays = backoff_delays(cap=10.0)
        while not self.stop_requested.is_set():
            try:
                return self._db_call(self._register)
            except DatabaseError as exc:
                delay = next(delays)
                logger.error("database unavailable (%s); retrying in %.1fs", exc, delay)
                self.stop_requested.wait(delay)
        self._database_down = True
        return None

    def _register(self) -> int:
        host = socket.gethostname()
        # Workers of this host that died without a clean exit (kill -9, OOM) still say 'running'.
        for pk, pid, heartbeat_at in WorkerRow.objects.filter(host=host, status=WorkerRow.Status.RUNNING).values_list(
            "pk", "pid", "heartbeat_at",
        ):
            if pid != os.getpid() and not _process_exists(pid):
                WorkerRow.objects.filter(pk=pk, status=WorkerRow.Status.RUNNING).update(
                    status=WorkerRow.Status.STOPPED, stopped_at=heartbeat_at,
                )
                logger.info("worker %s:%s died without stopping; marked stopped", host, pid)
        row = WorkerRow.objects.create(host=host, pid=os.getpid(), queues=list(self.options.queues))
        return row.pk

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < WORKER_HEARTBEAT_SECONDS:
            return
        if self._heartbeat_saving is not None and not self._heartbeat_saving.done():
            return  # the last one still waits for the database: do not queue more behind it
        self._last_heartbeat = now
        # On the registry's own thread, never waited for: neither a long handler nor a batch in
        # flight holds it up, and it does not hold up pika.
        c = self.counts
        self._heartbeat_saving = self._registry.submit(
            self._in_db_thread, self._save_heartbeat, acked=c.acked, requeued=c.requeued, rejected=c.rejected,
        )

    def _save_heartbeat(self, **counts) -> None:
        try:
            WorkerRow.objects.filter(pk=self._worker_id).update(heartbeat_at=timezone.now(), **counts)
        except DatabaseError as exc:
            logger.warning("worker heartbeat not saved: %s", exc)
            raise

    def _save_counts(self, **extra) -> None:
        WorkerRow.objects.filter(pk=self._worker_id).update(
            heartbeat_at=timezone.now(), acked=self.counts.acked, requeued=self.counts.requeued,
            rejected=self.counts.rejected, **extra,
        )

    def _unregister(self) -> None:
        if self._unsettled:
            recording.record_settled(self._unsettled)
            self._unsettled = []
        self._save_counts(status=WorkerRow.Status.STOPPED, stopped_at=timezone.now())

    def _handler_paths_by_queue(self) -> dict[str, str]:
        """Dotted handler paths per queue name: MAILROOM_QUEUE_HANDLERS, overridden by --handler."""

        paths = {q: p for q, p in conf.get("MAILROOM_QUEUE_HANDLERS").items() if q in self.options.queues}
        if self.options.handler:
            paths.update({q: self.options.handler for q in self.options.queues or ("",)})
        for path in paths.values():
            import_string(path)  # fail at start, not at the first letter
        return paths


@contextlib.contextmanager
def fewer_gc_passes():
    """Tune Python's cycle collector for a stream of short-lived objects; restore it on the way out.

    pika makes a few dozen objects per delivery and the recording a few more, all freed by their
    reference counts. With the default thresholds the collector ran every 700 allocations, and up to
    every hundredth run walked every object Django and the app had loaded: in interleaved rounds of
    bench/consume.py's throughput measure the worker read 0.46× bare pika on SQLite with the defaults
    and 0.55× with this (0.40× and 0.41× on PostgreSQL). The objects alive at the start are frozen
    out of the collector's walks (`gc.freeze`, as long-running servers do after loading), and the
    youngest generation is collected every 50,000 allocations. Cycles are still collected, later.
    On the way out everything frozen goes back to the collector and the thresholds are restored: by
    the last of the workers running at once in the process (the collector is the process's own).
    """
    global _gc_tuned, _gc_thresholds
    with _gc_lock:
        if not _gc_tuned:
            _gc_thresholds = gc.get_threshold()
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
        _gc_tuned += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_tuned -= 1
            if not _gc_tuned:
                gc.set_threshold(*_gc_thresholds)
                gc.unfreeze()


_gc_lock = threading.Lock()
_gc_tuned = 0  # workers running in this process with the collector tuned
_gc_thresholds = gc.get_threshold()  # the process's own, restored by the last of them


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
