"""Faults injected for real into a running `consume` (see RELIABILITY.md's fault table).

Each test asserts the contract afterwards: exactly N distinct letters recorded, each acked once,
earlier deliveries recorded as requeued (attempt n, redelivered), the queue empty.
Node-wide injections (close_all_connections, stop_app) are marked `node` and restore the broker.
"""
from __future__ import annotations

import itertools
import logging
import signal
import sqlite3
import struct
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import pika
import psycopg
import pytest
from django.db import DataError, OperationalError, connection

from messaging.amqp.codec import stored_message_id
from messaging.consumer import recording
from messaging.consumer.worker import ConsumeOptions
from messaging.consumer.worker import Consumer as ConsumeWorker
from messaging.models import Delivery, Message, Worker
from tests.conftest import subprocess_env, wait_for
from tests.consuming_checks import (
    acked_count,
    assert_exactly_once,
    connect,
    consumers,
    publish,
    queue_counts,
    rabbitmqctl,
)

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

N = 200


def consuming(queue: str):
    def check():
        try:
            return consumers(queue) >= 1
        except Exception:  # noqa: BLE001 — the broker may be restarting
            return False
    return check


def test_kill_9_mid_stream_then_restart(queue_name, manage):
    ids = publish(queue_name, N, declare=True)
    args = ["consume", queue_name, "--handler", "tests.handlers.pause", "--batch-size", "20", "--prefetch", "50"]
    victim = manage(*args)
    wait_for(lambda: acked_count(queue_name) >= 40, timeout=30, message="a few batches acked")
    victim.proc.kill()
    victim.proc.wait()
    assert acked_count(queue_name) < N, "the stream ended before the kill: nothing was injected"

    successor = manage("consume", queue_name, "--inactivity-timeout", "3")
    assert successor.wait(timeout=60) == 0, successor.output
    # An ack may reach the broker an instant before the kill, its settlement never written: at
    # most one batch can stay 'received' (the letter is not redelivered, so it is not lost).
    figures = assert_exactly_once(queue_name, ids, settled_unknown_ok=20)
    assert figures["redelivered"] >= 1, "the deliveries in hand at the kill were not redelivered"
    assert Delivery.objects.filter(queue=queue_name, status="requeued", redelivered=False).exists()
    # The registry tells the truth: the successor marked its dead predecessor stopped.
    assert Worker.objects.get(pid=victim.proc.pid).status == Worker.Status.STOPPED
    assert Worker.objects.get(pid=successor.proc.pid).status == Worker.Status.STOPPED


def test_sigterm_mid_stream_exits_0_with_nothing_half_written(queue_name, manage):
    ids = publish(queue_name, N, declare=True)
    worker = manage("consume", queue_name, "--handler", "tests.handlers.pause", "--batch-size", "20",
                    "--prefetch", "50")
    wait_for(lambda: acked_count(queue_name) >= 40, timeout=30, message="a few batches acked")
    worker.signal(signal.SIGTERM)
    started = time.monotonic()
    assert worker.wait(timeout=10) == 0, worker.output
    logger.info("SIGTERM to exit: %.2fs", time.monotonic() - started)
    acked = acked_count(queue_name)
    assert acked < N, "the stream ended before the signal: nothing was injected"
    assert set(Delivery.objects.filter(queue=queue_name).values_list("status", flat=True)) == {"acked"}
    # rows + ready + unacked = published: what was buffered but not recorded went back to the queue.
    assert queue_counts(queue_name) == (N - acked, 0)
    assert Worker.objects.get().status == Worker.Status.STOPPED

    successor = manage("consume", queue_name, "--inactivity-timeout", "3")
    assert successor.wait(timeout=60) == 0, successor.output
    assert_exactly_once(queue_name, ids)


@pytest.mark.node
def test_close_all_connections_three_times(queue_name, manage):
    worker = manage("consume", queue_name, "--handler", "tests.handlers.pause", "--batch-size", "20",
                    "--prefetch", "50")
    wait_for(consuming(queue_name), message="the worker to consume")
    ids = []
    for round_ in range(3):
        ids += publish(queue_name, N // 4, prefix=f"round{round_}-{queue_name}")
        wait_for(lambda: acked_count(queue_name) >= len(ids) - 30, timeout=30, message="letters acked")
        rabbitmqctl("close_all_connections", "mailroom fault test")
        time.sleep(0.5)
        wait_for(consuming(queue_name), timeout=20, message="the worker to reconnect")
    ids += publish(queue_name, N // 4, prefix=f"last-{queue_name}")
    wait_for(lambda: acked_count(queue_name) == len(ids), timeout=30, message="all letters acked")
    assert worker.proc.poll() is None, "the worker exited instead of reconnecting"
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, worker.output
    assert worker.output.count("CONNECTION_FORCED") >= 3, worker.output[-3000:]
    assert "reconnects=3" in worker.output
    assert_exactly_once(queue_name, ids)


@pytest.mark.node
def test_broker_stop_app_and_start_app(queue_name, manage):
    ids = publish(queue_name, N // 2, declare=True)  # durable: the letters must outlive the restart
    worker = manage("consume", queue_name, "--durable", "--handler", "tests.handlers.pause", "--batch-size", "20",
                    "--prefetch", "50")
    wait_for(lambda: acked_count(queue_name) >= 20, timeout=30, message="a first batch acked")
    assert "does not survive a broker restart" not in worker.output
    try:
        rabbitmqctl("stop_app")
        time.sleep(3)
        assert worker.proc.poll() is None, worker.output
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")
    wait_for(consuming(queue_name), timeout=40, message="the worker to reconnect after the restart")
    ids += publish(queue_name, N // 2, prefix=f"after-{queue_name}")
    wait_for(lambda: acked_count(queue_name) == N, timeout=40, message="all letters acked")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, worker.output
    assert "reconnecting in" in worker.output
    assert_exactly_once(queue_name, ids)


# --- the database goes away ---------------------------------------------------------------------
@contextmanager
def database_outage(queue: str):
    """Lock the database against the worker (and on PostgreSQL, kill its sessions) while inside.

    Yields a function that counts the letters acked on `queue`, read through the lock holder.
    """
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        holder = sqlite3.connect(s["NAME"], isolation_level=None, timeout=10)
        holder.execute("BEGIN EXCLUSIVE")
        kill = None
    else:
        holder = psycopg.connect(host=s["HOST"] or "127.0.0.1", port=s["PORT"] or 5432, user=s["USER"],
                                 password=s["PASSWORD"] or None, dbname=s["NAME"])
        holder.execute(f"LOCK TABLE {Delivery._meta.db_table}, messaging_worker IN ACCESS EXCLUSIVE MODE")
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            mine = cursor.fetchone()[0]

        def kill():
            # Everyone on this test database but us: the worker's sessions die mid-query.
            return holder.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid NOT IN (pg_backend_pid(), %s)", [mine],
            ).fetchone()[0]

    def acked() -> int:
        return holder.execute(
            f"SELECT count(DISTINCT message_id) FROM {Delivery._meta.db_table} WHERE queue = %s AND status = 'acked'"
            .replace("%s", "?" if kill is None else "%s"), [queue],
        ).fetchone()[0]

    try:
        yield acked, kill
    finally:
        holder.rollback() if kill else holder.execute("ROLLBACK")
        holder.close()


def test_database_locked_or_killed_nothing_acked_then_resumes(queue_name, manage):
    before = publish(queue_name, 20, declare=True, prefix=f"before-{queue_name}")
    worker = manage("consume", queue_name, "--batch-size", "50", env=subprocess_env(MAILROOM_SQLITE_TIMEOUT="1"))
    wait_for(lambda: acked_count(queue_name) == 20, timeout=30, message="the first letters acked")
    published = 20
    with database_outage(queue_name) as (acked, kill):
        during = publish(queue_name, N // 2, prefix=f"during-{queue_name}")
        published += len(during)
        wait_for(lambda: queue_counts(queue_name) == (0, len(during)), timeout=15, message="all delivered, unacked")
        if kill:
            time.sleep(1)
            assert kill() >= 1, "no worker session to terminate"
        for _ in range(4):
            ready, unacked = queue_counts(queue_name)
            rows = acked()
            assert rows == 20, "a letter was acked while the database was down"
            assert rows + ready + unacked == published
            time.sleep(0.5)
        assert worker.proc.poll() is None, worker.output
    wait_for(lambda: acked_count(queue_name) == published, timeout=40, message="all letters acked after the outage")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, worker.output
    assert "database unavailable" in worker.output
    assert_exactly_once(queue_name, before + during)


def test_a_lock_held_on_the_tables_is_waited_out_with_backoff_not_forever(queue_name, manage):
    """The database answers but a lock blocks the worker's writes: it gives up after the lock timeout
    (SQLite's busy timeout, PostgreSQL's lock_timeout), acks nothing, and resumes once it is released."""
    before = publish(queue_name, 5, declare=True, prefix=f"before-{queue_name}")
    worker = manage("consume", queue_name, env=subprocess_env(MAILROOM_SQLITE_TIMEOUT="1", MAILROOM_PG_LOCK_TIMEOUT="1"))
    wait_for(lambda: acked_count(queue_name) == 5, timeout=30, message="the first letters acked")
    with database_outage(queue_name) as (acked, _kill):
        during = publish(queue_name, 10, prefix=f"during-{queue_name}")
        wait_for(lambda: "database unavailable" in worker.output, timeout=15, message="the lock wait to end")
        assert acked() == 5 and queue_counts(queue_name) == (0, 10)
        assert worker.proc.poll() is None, worker.output
    wait_for(lambda: acked_count(queue_name) == 15, timeout=40, message="all letters acked after the lock")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, worker.output
    assert_exactly_once(queue_name, before + during)


def test_sigterm_during_a_database_outage_exits_without_acking(queue_name, manage):
    before = publish(queue_name, 5, declare=True, prefix=f"before-{queue_name}")
    worker = manage("consume", queue_name, env=subprocess_env(MAILROOM_SQLITE_TIMEOUT="1"))
    wait_for(lambda: acked_count(queue_name) == 5, timeout=30, message="the first letters acked")
    with database_outage(queue_name) as (acked, kill):
        during = publish(queue_name, 20, prefix=f"during-{queue_name}")
        wait_for(lambda: queue_counts(queue_name) == (0, 20), timeout=15, message="all delivered, unacked")
        worker.signal(signal.SIGTERM)
        if kill:
            time.sleep(0.5)
            kill()
        assert worker.wait(timeout=10) == 0, worker.output
        assert queue_counts(queue_name) == (20, 0)  # nothing acked, all back in the queue
        assert acked() == 5
    assert "database unavailable" in worker.output
    successor = manage("consume", queue_name, "--inactivity-timeout", "3")
    assert successor.wait(timeout=60) == 0, successor.output
    assert_exactly_once(queue_name, before + during)


# --- slow handlers, deleted queues ----------------------------------------------------------------
def test_handler_sleeping_past_the_heartbeat_keeps_the_connection(queue_name, manage, tmp_path):
    slow = publish(queue_name, 1, body=b"slow", declare=True)
    quick = publish(queue_name, 5)
    worker = manage("consume", queue_name, "--heartbeat", "2", "--handler", "tests.handlers.sleep_on_slow",
                    env=subprocess_env(HANDLER_LOG=str(tmp_path / "log"), HANDLER_SLEEP="12"))
    wait_for(lambda: Delivery.objects.filter(queue=queue_name, message__message_id=slow[0]).exists(), timeout=30,
             message="the slow letter recorded, its handler running")
    row = Worker.objects.get(pid=worker.proc.pid)
    started = row.heartbeat_at
    # The worker registry keeps beating (every 5 s) while the handler sleeps: the worker looks alive.
    wait_for(lambda: Worker.objects.get(pk=row.pk).heartbeat_at >= started + timedelta(seconds=5), timeout=11,
             message="a registry heartbeat during the handler")
    assert Delivery.objects.get(queue=queue_name, message__message_id=slow[0]).handled_at is None
    wait_for(lambda: acked_count(queue_name) == 6, timeout=30, message="all letters acked")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, worker.output
    assert "reconnects=0" in worker.output and "connection lost" not in worker.output
    assert_exactly_once(queue_name, slow + quick)
    assert Delivery.objects.filter(queue=queue_name).count() == 6  # acked once, never redelivered


def test_queue_deleted_under_the_worker_is_declared_again(queue_name, manage):
    first = publish(queue_name, 5, declare=True)
    worker = manage("consume", queue_name)
    wait_for(lambda: acked_count(queue_name) == 5, timeout=30, message="the first letters acked")
    conn = connect()
    conn.channel().queue_delete(queue=queue_name)
    conn.close()
    wait_for(consuming(queue_name), timeout=20, message="the queue declared again and consumed")
    second = publish(queue_name, 5)
    wait_for(lambda: acked_count(queue_name) == 10, timeout=30, message="letters on the new queue acked")
    assert worker.proc.poll() is None, worker.output
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, worker.output
    assert "queue deleted?" in worker.output
    assert_exactly_once(queue_name, first + second)


def test_channel_closed_by_the_broker_opens_another(queue_name, caplog):
    """A 406 channel close (what consumer_timeout does, minutes late on 3.10) while connected."""
    first = publish(queue_name, 10, declare=True)
    worker = ConsumeWorker(ConsumeOptions(queues=(queue_name,), batch_size=5))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: acked_count(queue_name) == 10, timeout=30, message="the first letters acked")
        subscription = worker._subscription
        # An ack of a tag never delivered: the broker closes the channel with 406 PRECONDITION_FAILED.
        subscription._connection.add_callback_threadsafe(lambda: subscription.ack(10_000))
        wait_for(lambda: worker.counts.reconnects == 1, timeout=20, message="the worker to open another channel")
        second = publish(queue_name, 10)
        wait_for(lambda: acked_count(queue_name) == 20, timeout=30, message="letters after the close acked")
    finally:
        worker.request_stop()
        thread.join(timeout=15)
    assert not thread.is_alive()
    assert "the broker closed the channel" in caplog.text
    assert_exactly_once(queue_name, first + second)


def test_stopping_while_a_batch_fails_leaves_the_other_batch_in_flight_unacked_and_says_so(queue_name, monkeypatch):
    """Two batches being recorded; the first fails (the database), a stop arrives, the second commits
    later: its rows must not say 'acked', since the worker closes without acking them."""
    ids = publish(queue_name, 20, declare=True)
    worker = ConsumeWorker(ConsumeOptions(queues=(queue_name,), batch_size=10, prefetch=20))
    original, second_started, release = recording.record_batch, threading.Event(), threading.Event()
    calls, numbers = {}, itertools.count(1)  # batch sizes by call number, numbered atomically across threads

    def record_batch(batch, **kwargs):
        n = next(numbers)
        calls[n] = len(batch)
        if n == 1:  # the first batch fails once the second is being recorded, and a stop comes
            assert second_started.wait(10)
            worker.request_stop()
            threading.Timer(1.0, release.set).start()  # the second commits after the worker gave up
            raise OperationalError("injected: database unavailable")
        if n == 2:
            second_started.set()
            assert release.wait(10)
        return original(batch, **kwargs)

    monkeypatch.setattr(recording, "record_batch", record_batch)
    assert worker.run() == 0
    # The first batch may be the first delivery alone (one socket read), and on PostgreSQL a third
    # thread may take a third batch before the stop: every batch after the failing one was committed.
    assert len(calls) >= 2
    committed = sum(size for n, size in calls.items() if n > 1)
    rows = list(Delivery.objects.filter(queue=queue_name).values_list("status", flat=True))
    assert len(rows) == committed and set(rows) == {Delivery.Status.REQUEUED}, rows  # not 'acked': no ack went out
    assert queue_counts(queue_name) == (20, 0)  # every letter back in the queue
    assert Message.objects.filter(message_id__in=ids).count() == committed


def test_max_messages_counts_letters_delivered_again_after_a_lost_channel(queue_name, monkeypatch):
    """Deliveries dropped with the channel come back: --max-messages must not count them twice (and
    stop having acked none of them)."""
    ids = publish(queue_name, 10, declare=True)
    worker = ConsumeWorker(ConsumeOptions(queues=(queue_name,), batch_size=10, max_messages=10))
    original, calls = recording.record_batch, []

    def record_batch(batch, **kwargs):
        calls.append(len(batch))
        if len(calls) == 1:  # the channel closes (406) while the first batch is being recorded
            worker._subscription._connection.add_callback_threadsafe(lambda: worker._subscription.ack(10_000))
            time.sleep(0.5)
        return original(batch, **kwargs)

    monkeypatch.setattr(recording, "record_batch", record_batch)
    assert worker.run() == 0
    assert worker.counts.reconnects == 1 and worker.counts.acked == 10
    assert queue_counts(queue_name) == (0, 0)
    assert_exactly_once(queue_name, ids)


def test_headers_pika_cannot_decode_are_recorded_not_a_lost_connection_forever(queue_name, manage, monkeypatch):
    """Two headers made pika drop the connection, again at every redelivery: tables nested 2,000
    deep (a few kB; pika decodes them recursively) and a timestamp past the year 9999."""
    deep = {"leaf": 1}
    for _ in range(2000):
        deep = {"t": deep}
    encode_value = pika.data.encode_value

    def far_future(pieces, value):  # what another client may send: a 'T' field of 2**40 seconds
        if value == "far future":
            pieces.append(struct.pack(">cQ", b"T", 2**40))
            return 9
        return encode_value(pieces, value)

    conn = connect()
    channel = conn.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue=queue_name, durable=True)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pika's encoder recurses too: this producer needs the room
    monkeypatch.setattr(pika.data, "encode_value", far_future)
    try:
        channel.basic_publish(exchange="", routing_key=queue_name, body=b"deep", properties=pika.BasicProperties(
            message_id=f"{queue_name}-deep", headers={"deep": deep, "plain": "kept"}, delivery_mode=2))
        channel.basic_publish(exchange="", routing_key=queue_name, body=b"when", properties=pika.BasicProperties(
            message_id=f"{queue_name}-when", headers={"when": "far future"}, delivery_mode=2))
    finally:
        monkeypatch.undo()
        sys.setrecursionlimit(limit)
        conn.close()
    following = publish(queue_name, 3)
    worker = manage("consume", queue_name)
    wait_for(lambda: acked_count(queue_name) == 5, timeout=30, message="all five letters acked")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, worker.output
    assert "reconnecting" not in worker.output
    assert_exactly_once(queue_name, [f"{queue_name}-deep", f"{queue_name}-when", *following])
    headers = Message.objects.get(message_id=f"{queue_name}-deep").headers
    assert headers["plain"] == "kept"
    level, value = 0, headers["deep"]
    while isinstance(value, dict) and "t" in value:
        level, value = level + 1, value["t"]
    assert level == 64 and value["$not_decoded"].startswith("(not decoded: nested deeper than 64 levels")
    # Its seconds, tagged so that a republished copy sends a timestamp again (messaging/amqp/stored.py).
    assert Message.objects.get(message_id=f"{queue_name}-when").headers == {"when": {"$timestamp": 2**40}}


@pytest.mark.parametrize("handler", ["", "tests.handlers.note"])
def test_a_letter_the_database_refuses_is_recorded_rejected_alone_and_the_rest_go_on(queue_name, monkeypatch, handler):
    """A value the database refuses (a DataError: the letter, not the database being down) was
    retried for ever, holding up everything behind it. With a handler, the batch also carries the
    earlier batches' outcomes: they are written first, on their own."""
    ids = publish(queue_name, 10, declare=True)
    poison = ids[7]
    original, batches = recording.record_batch, []

    def record_batch(batch, **kwargs):
        batches.append(len(batch))
        if any(r.properties.message_id == poison for r in batch):
            raise DataError("injected: value too long for type character varying(255)")
        return original(batch, **kwargs)

    monkeypatch.setattr(recording, "record_batch", record_batch)
    worker = ConsumeWorker(ConsumeOptions(queues=(queue_name,), batch_size=5, max_messages=10, handler=handler))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    stuck = thread.is_alive()
    if stuck:
        worker.request_stop()
        thread.join(timeout=30)
    assert not stuck, f"the worker was still retrying the refused batch: {batches[:5]}"
    assert 1 in batches and sum(batches) > 10  # the refused batch again, one by one
    assert (worker.counts.acked, worker.counts.rejected) == (9, 1)
    assert queue_counts(queue_name) == (0, 0)
    refused = Delivery.objects.select_related("message").get(message__message_id=poison)
    assert refused.status == Delivery.Status.REJECTED and "DataError" in refused.error
    assert bytes(refused.message.body) == b"letter 7" and "DataError" in refused.message.last_error  # the body kept
    acked = Delivery.objects.filter(queue=queue_name, status=Delivery.Status.ACKED)
    assert sorted(acked.values_list("message__message_id", flat=True)) == sorted(set(ids) - {poison})


def test_a_forged_delivery_count_is_ignored_not_a_batch_refused_forever(queue_name, manage):
    """x-delivery-count is the broker's on quorum queues, but any producer can send a header of that
    name: a negative count broke `Delivery.attempt`'s CHECK (an IntegrityError, retried for ever) and
    one past 2**63 could not be bound on SQLite. Such a count is ignored: the attempt is counted."""
    forged = [-5, 2**40, True, "3"]
    conn = connect()
    channel = conn.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue=queue_name, durable=True)
    try:
        for i, count in enumerate(forged):
            channel.basic_publish(exchange="", routing_key=queue_name, body=f"forged {i}".encode(),
                                  properties=pika.BasicProperties(message_id=f"{queue_name}-forged-{i}",
                                                                  headers={"x-delivery-count": count}))
    finally:
        conn.close()
    following = publish(queue_name, 2)
    worker = manage("consume", queue_name)
    wait_for(lambda: acked_count(queue_name) == len(forged) + 2, timeout=30, message="every letter acked")
    assert worker.proc.poll() is None, worker.output
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, worker.output
    ids = [f"{queue_name}-forged-{i}" for i in range(len(forged))]
    assert_exactly_once(queue_name, [*ids, *following])
    assert set(Delivery.objects.filter(queue=queue_name).values_list("attempt", flat=True)) == {1}


def test_hostile_properties_and_routing_key_are_recorded_not_fatal(queue_name, manage):
    """Another producer's short strings that are not UTF-8, or hold NUL, are stored as text, not a crash
    (pika hands such properties over as bytes) nor a batch the database refuses forever."""
    exchange = f"{queue_name}-x"
    conn = connect()
    channel = conn.channel()
    channel.confirm_delivery()
    channel.exchange_declare(exchange=exchange, exchange_type="topic")
    channel.queue_declare(queue=queue_name, durable=True)
    channel.queue_bind(queue=queue_name, exchange=exchange, routing_key="#")
    try:
        channel.basic_publish(exchange=exchange, routing_key=b"k\x00\xff", body=b"hostile", properties=pika.BasicProperties(
            message_id=b"hostile-\xff", content_type=b"text/\xff", content_encoding=b"\x00gzip",
            correlation_id=b"\xfe", headers={"n": 1},
        ))
        following = publish(queue_name, 3)
        worker = manage("consume", queue_name)
        wait_for(lambda: acked_count(queue_name) == 4, timeout=30, message="all four letters acked")
        assert worker.proc.poll() is None, worker.output
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=10) == 0, worker.output
    finally:
        channel.exchange_delete(exchange=exchange)
        conn.close()
    # Not valid UTF-8: stored readable, with the digest of its raw bytes that keeps it apart from other ids.
    hostile_id, raw = stored_message_id(b"hostile-\xff")
    assert hostile_id.startswith("hostile-\ufffd~sha256:") and raw == b"hostile-\xff"
    hostile = Delivery.objects.select_related("message").get(message__message_id=hostile_id)
    assert bytes(hostile.message.raw_message_id) == raw
    assert hostile.routing_key == "k\\u0000\ufffd" and hostile.exchange == exchange
    letter = hostile.message
    assert (letter.content_type, letter.content_encoding, letter.correlation_id) == ("text/\ufffd", "\\u0000gzip", "\ufffd")
    assert (letter.routing_key, bytes(letter.body)) == ("k\\u0000\ufffd", b"hostile")
    assert_exactly_once(queue_name, [hostile_id, *following])
