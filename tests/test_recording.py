"""The database side of consuming, on the real database: one letter per message_id, one row per delivery."""
from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta, timezone

import pika
import pytest
from django.db import connection, transaction

from messaging import statements
from messaging.consumer import filing, recording
from messaging.consumer.recording import (
    Received,
    record_batch,
    record_lost,
    record_settled,
)
from messaging.consumer.writers import PostgreSQLWriter, SQLiteWriter, writer_for
from messaging.models import Delivery, Message

pytestmark = pytest.mark.django_db(transaction=True)


def received(tag: int, *, message_id: str | None = None, body: bytes = b"hello", redelivered: bool = False,
             queue: str = "q", headers: dict | None = None, **props) -> Received:
    return Received(
        queue=queue, consumer_tag="ctag", delivery_tag=tag, redelivered=redelivered, exchange="", routing_key=queue,
        properties=pika.BasicProperties(message_id=message_id, headers=headers, **props), body=body,
    )


def ack_all(settlements):
    record_settled(settlements)


def test_outside_letter_gets_message_and_delivery_with_its_properties():
    headers = {"s": "x", "n": 7, "b": b"\xff\x00", "nested": {"k": [1, "two"]}, "nul": "a\x00b"}
    [s] = record_batch([received(1, message_id="ext-1", body=b"\x00\x01binary", headers=headers,
                                 content_type="application/octet-stream", correlation_id="c-1", priority=3,
                                 app_id="send.py")], worker_id=None)
    letter = Message.objects.get(message_id="ext-1")
    assert letter.origin == Message.Origin.EXTERNAL and letter.status == Message.Status.EXTERNAL
    assert bytes(letter.body) == b"\x00\x01binary"
    assert letter.body_sha256 == hashlib.sha256(b"\x00\x01binary").hexdigest() and letter.body_size == 8
    assert letter.content_type == "application/octet-stream" and letter.correlation_id == "c-1"
    assert letter.headers == {"s": "x", "n": 7, "b": {"$bytes": "/wA="}, "nested": {"k": [1, "two"]},
                              "nul": {"$nul_joined": ["a", "b"]}}  # as messaging.amqp.stored writes them
    assert letter.properties == {"priority": 3, "app_id": "send.py"}
    delivery = Delivery.objects.get(pk=s.delivery_id)
    # No handler: nothing can change the outcome, so the row is written acked, with the ack to follow.
    assert (delivery.status, delivery.attempt, delivery.duplicate) == (Delivery.Status.ACKED, 1, False)
    assert delivery.settled_at is not None and s.recorded and s.action == Delivery.Status.ACKED


def test_a_handlers_delivery_is_received_until_its_settlement_is_written():
    [s] = record_batch([received(1, message_id="h-1")], worker_id=None, handlers={"q": lambda message: None})
    delivery = Delivery.objects.get(pk=s.delivery_id)
    assert (delivery.status, delivery.settled_at, delivery.handled_at is not None) == ("received", None, True)
    assert not s.recorded
    ack_all([s])
    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.ACKED and delivery.settled_at is not None


def test_letter_without_message_id_gets_a_generated_one():
    settlements = record_batch([received(1), received(2)], worker_id=None)
    assert Message.objects.count() == 2
    assert all(len(m.message_id) == 36 for m in Message.objects.all())
    assert len({s.message_id for s in settlements}) == 2


def test_mailroom_letter_is_matched_not_duplicated():
    letter = Message(message_id="ours-1", routing_key="q", status=Message.Status.PUBLISHED)
    letter.set_body(b"hi")
    letter.save()
    [s] = record_batch([received(1, message_id="ours-1")], worker_id=None)
    assert Message.objects.count() == 1
    assert s.message_id == letter.pk
    assert Message.objects.get().status == Message.Status.PUBLISHED  # the publish outcome is kept


def test_same_message_id_twice_is_one_letter_and_a_duplicate_delivery():
    first = record_batch([received(1, message_id="dup"), received(2, message_id="dup")], worker_id=None)
    ack_all(first)
    second = record_batch([received(3, message_id="dup")], worker_id=None)
    assert Message.objects.filter(message_id="dup").count() == 1
    attempts = list(Delivery.objects.order_by("pk").values_list("attempt", "duplicate"))
    assert attempts == [(1, False), (2, True), (3, True)]
    assert [s.duplicate for s in first + second] == [False, True, True]


def test_a_small_batch_with_a_known_letter_is_recorded_whole_with_the_earlier_settlements():
    # On PostgreSQL a small batch of new letters is one statement; a known letter in it undoes that
    # statement and the general path records the whole batch (and the settlements) once.
    handlers = {"q": lambda message: None}  # their outcomes are written after the ack, with the next batch
    first = record_batch([received(1, message_id="known")], worker_id=None, handlers=handlers)
    second = record_batch([received(2, message_id="new-1"), received(3, message_id="known"),
                           received(4, message_id="new-2")], worker_id=None, handlers=handlers, settled=first)
    third = record_batch([received(5, message_id="new-3")], worker_id=None, handlers=handlers, settled=second)
    assert Message.objects.count() == 4
    rows = list(Delivery.objects.order_by("pk").values_list("message__message_id", "attempt", "duplicate", "status"))
    assert rows == [("known", 1, False, "acked"), ("new-1", 1, False, "acked"), ("known", 2, True, "acked"),
                    ("new-2", 1, False, "acked"), ("new-3", 1, False, "received")]
    ids = list(Delivery.objects.order_by("pk").values_list("pk", flat=True))
    assert [s.delivery_id for s in second + third] == ids[1:]
    assert {s.message_id for s in third} == {Message.objects.get(message_id="new-3").pk}


def test_first_receipts_and_messages_published_by_mailroom_are_recorded_with_their_history():
    ours = Message(message_id="ours-2", routing_key="q", status=Message.Status.PUBLISHED)  # published by Mailroom
    ours.set_body(b"ours")
    ours.save()
    handlers = {"q": lambda message: None}
    first = record_batch([received(1, message_id="ext-a"), received(2, message_id="ours-2")], worker_id=None,
                         handlers=handlers)
    acked, requeued = (recording.Settlement(delivery_tag=s.delivery_tag, delivery_id=s.delivery_id,
                                            message_id=s.message_id, action=action)
                       for s, action in zip(first, (Delivery.Status.ACKED, Delivery.Status.REQUEUED)))
    second = record_batch([received(3, message_id="ext-b", queue="plain")], worker_id=None, handlers=handlers,
                          settled=[acked, requeued])  # a queue without a handler: written acked at once
    again = record_batch([received(4, message_id="ext-a")], worker_id=None)  # delivered on this queue before
    rows = list(Delivery.objects.order_by("pk").values_list("message__message_id", "attempt", "duplicate", "status"))
    assert rows == [("ext-a", 1, False, "acked"), ("ours-2", 1, False, "requeued"), ("ext-b", 1, False, "acked"),
                    ("ext-a", 2, True, "acked")]
    assert [s.recorded for s in first + second + again] == [False, False, True, True]
    assert [s.message_id for s in first + second + again] == list(Delivery.objects.order_by("pk").values_list(
        "message_id", flat=True))
    assert Message.objects.count() == 3 and Message.objects.get(message_id="ours-2").status == Message.Status.PUBLISHED


@pytest.mark.skipif(connection.vendor != "postgresql", reason="prepared statements are PostgreSQL's")
@pytest.mark.parametrize("threshold", [5, None])
def test_small_batches_statement_is_prepared_on_postgresql_unless_turned_off(threshold):
    connection.ensure_connection()
    before = connection.connection.prepare_threshold
    connection.connection.prepare_threshold = threshold  # what MAILROOM_PG_PREPARED_STATEMENTS sets
    try:
        for tag in range(1, 8):
            record_batch([received(tag, message_id=f"prep-{tag}")], worker_id=None)
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
                           ["SELECT message_id, id, body_sha256, % FROM messaging_message WHERE message_id = ANY%"])
            prepared = cursor.fetchone()[0]
    finally:
        connection.connection.prepare_threshold = before
    assert prepared == (1 if threshold else 0)
    assert Delivery.objects.filter(status=Delivery.Status.ACKED).count() == 7 == Message.objects.count()


@pytest.mark.skipif(connection.vendor != "postgresql" or "MAILROOM_PG_PREPARED_STATEMENTS" in os.environ,
                    reason="prepared statements are PostgreSQL's; the default is what is checked")
def test_settings_prepare_the_consumers_statements_on_postgresql_by_default(settings):
    assert settings.DATABASES["default"]["OPTIONS"]["prepare_threshold"] == 5


def test_recording_inside_a_callers_transaction_rolls_back_with_it():
    with pytest.raises(RuntimeError), transaction.atomic():
        record_batch([received(1, message_id="in-tx")], worker_id=None)
        assert Delivery.objects.filter(message__message_id="in-tx").exists()
        raise RuntimeError("the caller changes its mind")
    assert not Message.objects.filter(message_id="in-tx").exists() and not Delivery.objects.exists()


@pytest.mark.parametrize("handler", [False, True], ids=["written-acked", "handler"])
def test_redelivery_after_a_crash_is_a_new_delivery_and_the_old_one_is_marked_requeued(handler):
    handlers = {"q": lambda message: None} if handler else None
    # Recorded, never acked (kill -9 between the commit and the ack): 'acked' without a handler
    # (written with the row), 'received' with one.
    record_batch([received(1, message_id="crash")], worker_id=None, handlers=handlers)
    record_batch([received(2, message_id="other")], worker_id=None, handlers=handlers)
    [s] = record_batch([received(1, message_id="crash", redelivered=True)], worker_id=None, handlers=handlers)
    old, other, new = Delivery.objects.order_by("pk")
    assert old.status == Delivery.Status.REQUEUED and "redelivered" in old.error
    assert other.status == (Delivery.Status.RECEIVED if handler else Delivery.Status.ACKED)  # left alone
    # With a handler its earlier success (handled_at) makes the redelivery a duplicate; without one,
    # the earlier delivery now reads requeued, so the redelivery is the letter's first ack.
    assert (new.redelivered, new.attempt, new.duplicate) == (True, 2, handler)
    assert Message.objects.count() == 2


def test_a_letter_delivered_again_without_the_redelivered_flag_keeps_the_earlier_ack():
    [first] = record_batch([received(1, message_id="twice")], worker_id=None)
    [second] = record_batch([received(2, message_id="twice")], worker_id=None)  # published twice
    assert list(Delivery.objects.order_by("pk").values_list("status", "attempt", "duplicate")) == [
        ("acked", 1, False), ("acked", 2, True)]


def test_a_copy_published_twice_leaves_a_delivery_in_another_workers_handler_alone():
    """Not redelivered, the second copy says nothing of the first one's fate: that delivery may be in
    another worker's handler right now (it was marked requeued, 'never acked', and its ack kept the note)."""
    handlers = {"q": lambda message: None}
    [first] = record_batch([received(1, message_id="twice-h")], worker_id=None, handlers=handlers)  # worker A
    record_batch([received(1, message_id="twice-h", queue="q")], worker_id=None, handlers=handlers)  # worker B
    old = Delivery.objects.get(pk=first.delivery_id)
    assert (old.status, old.error) == (Delivery.Status.RECEIVED, "")
    record_settled([first])  # worker A's handler finishes and acks
    old.refresh_from_db()
    assert (old.status, old.error) == (Delivery.Status.ACKED, "")


def test_redelivered_outside_letter_without_message_id_is_matched_by_content():
    record_batch([received(1, body=b"no id here")], worker_id=None)
    record_batch([received(1, body=b"no id here", redelivered=True)], worker_id=None)
    assert Message.objects.count() == 1
    assert Delivery.objects.count() == 2


def test_an_identical_letter_after_one_handled_and_acked_is_another_letter_and_is_handled():
    handled = []
    handlers = {"q": lambda message: handled.append(message.pk)}
    settlements = record_batch([received(1, body=b"same, no id")], worker_id=None, handlers=handlers)
    ack_all(settlements)  # handled, acked, and the ack recorded
    # The same content again, redelivered (the second letter was in the prefetch buffer when the
    # connection dropped): not the first one coming back, which was acked.
    [second] = record_batch([received(1, body=b"same, no id", redelivered=True)], worker_id=None, handlers=handlers)
    assert Message.objects.count() == 2 and len(set(handled)) == 2
    assert not second.duplicate and second.action == Delivery.Status.ACKED
    assert list(Delivery.objects.order_by("pk").values_list("status", "attempt")) == [("acked", 1), ("received", 1)]


def test_an_identical_letter_after_a_retried_then_handled_one_is_another_letter():
    attempts = []

    def fails_once(message):
        attempts.append(message.pk)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")

    handlers = {"q": fails_once}
    ack_all(record_batch([received(1, body=b"retried, no id")], worker_id=None, handlers=handlers))  # requeued
    again = record_batch([received(2, body=b"retried, no id", redelivered=True)], worker_id=None, handlers=handlers)
    ack_all(again)  # the same letter again (matched by content), handled and acked
    assert Message.objects.count() == 1 and len(attempts) == 2
    # Another letter with the same body, redelivered after a dropped channel: the latest delivery of
    # the first was acked after its handler ran, so this is not the first one coming back.
    [other] = record_batch([received(3, body=b"retried, no id", redelivered=True)], worker_id=None, handlers=handlers)
    assert Message.objects.count() == 2 and len(attempts) == 3 and not other.duplicate
    assert list(Delivery.objects.order_by("pk").values_list("status", "attempt")) == [
        ("requeued", 1), ("acked", 2), ("received", 1)]  # the first letter's trail is left as it was


def test_a_handled_letter_whose_ack_was_lost_is_matched_by_content_and_not_handled_again():
    handled = []
    handlers = {"q": lambda message: handled.append(message.pk)}
    record_batch([received(1, body=b"no id, ack lost")], worker_id=None, handlers=handlers)  # killed before the ack
    [again] = record_batch([received(1, body=b"no id, ack lost", redelivered=True)], worker_id=None, handlers=handlers)
    assert Message.objects.count() == 1 and len(handled) == 1
    assert again.duplicate and again.action == Delivery.Status.ACKED


def test_names_with_nul_longer_than_their_column_once_escaped_are_cut_not_retried_forever():
    # A 210-byte routing key (AMQP allows 255) whose NULs are stored as six characters each.
    key = "a" * 200 + "\x00" * 10
    letter = received(1, message_id="nul-key")
    letter.exchange, letter.routing_key = "x" * 250 + "\x00", key
    [s] = record_batch([letter], worker_id=None)
    stored = Message.objects.get(message_id="nul-key")
    assert stored.routing_key == ("a" * 200 + "\\u0000" * 10)[:255] and len(stored.exchange) == 255
    assert Delivery.objects.get(pk=s.delivery_id).routing_key == stored.routing_key


def test_quorum_delivery_count_header_gives_the_attempt():
    [s] = record_batch([received(1, message_id="qq", headers={"x-delivery-count": 3})], worker_id=None)
    assert Delivery.objects.get(pk=s.delivery_id).attempt == 4


def test_a_producers_constant_delivery_count_header_never_counts_below_the_history():
    """A classic queue never rewrites x-delivery-count: a producer's 0 came back as attempt 1 each
    time, so a poison letter was requeued for ever instead of rejected after max_retries."""
    def poison(message):
        raise ValueError("cannot handle")

    actions = []
    for tag in range(1, 5):
        [s] = record_batch([received(tag, message_id="fixed-count", redelivered=tag > 1,
                                     headers={"x-delivery-count": 0})],
                           worker_id=None, handlers={"q": poison}, max_retries=2)
        record_settled([s])
        actions.append(s.action)
        if s.action == Delivery.Status.REJECTED:
            break
    assert actions == ["requeued", "requeued", "rejected"]
    assert list(Delivery.objects.order_by("pk").values_list("attempt", flat=True)) == [1, 2, 3]


def test_record_lost_marks_unacked_deliveries_requeued_and_keeps_a_recorded_reject():
    a, b = record_batch([received(1, message_id="a"), received(2, message_id="b")], worker_id=None,
                        handlers={"q": lambda message: None})
    [c] = record_batch([received(3, message_id="c")], worker_id=None)  # written acked, its ack never sent
    record_settled([recording.Settlement(delivery_tag=1, delivery_id=a.delivery_id, message_id=a.message_id,
                                         action=Delivery.Status.REJECTED)])
    record_lost([a.delivery_id, b.delivery_id, c.delivery_id], reason="connection closed")
    statuses = dict(Delivery.objects.values_list("pk", "status"))
    assert [statuses[x.delivery_id] for x in (a, b, c)] == ["rejected", "requeued", "requeued"]


def test_handler_failure_requeues_then_rejects_and_success_is_not_rerun():
    calls = []

    def flaky(message):
        calls.append(message.message_id)
        if bytes(message.body) == b"poison":
            raise ValueError("cannot handle")
        Message.objects.filter(pk=message.pk).update(correlation_id="handled")  # the handler's own write

    handlers = {"q": flaky}
    for tag in range(1, 4):
        [s] = record_batch([received(tag, message_id="p", body=b"poison", redelivered=tag > 1)], worker_id=None,
                           handlers=handlers, max_retries=2)
        record_settled([s])
    statuses = list(Delivery.objects.filter(message__message_id="p").order_by("pk").values_list("status", flat=True))
    assert statuses == ["requeued", "requeued", "rejected"]
    assert "ValueError: cannot handle" in Delivery.objects.filter(message__message_id="p").first().error

    [ok] = record_batch([received(9, message_id="good")], worker_id=None, handlers=handlers)
    record_settled([ok])
    [again] = record_batch([received(10, message_id="good", redelivered=True)], worker_id=None, handlers=handlers)
    assert again.duplicate and again.action == Delivery.Status.ACKED
    assert calls.count("good") == 1
    assert Message.objects.get(message_id="good").correlation_id == "handled"


def test_a_handler_error_with_a_nul_is_written_not_refused_by_the_database():
    def fails(message):
        raise ValueError("bad byte \x00 in the input")

    [s] = record_batch([received(1, message_id="nul-error")], worker_id=None, handlers={"q": fails})
    record_settled([s])  # PostgreSQL refused the NUL: every later batch carrying it failed
    error = Delivery.objects.get(pk=s.delivery_id).error
    assert "bad byte \\u0000 in the input" in error and "\x00" not in error


def test_a_batch_over_one_statements_parameters_is_recorded_whole(monkeypatch):
    monkeypatch.setattr(statements, "MAX_PARAMETERS", 30)  # a statement per letter or two, as 30,000 does for big batches
    [first] = record_batch([received(1, message_id="many-0")], worker_id=None)
    batch = [received(tag, message_id=f"many-{tag - 2}") for tag in range(2, 42)]  # many-0 again: the general way
    settlements = record_batch(batch, worker_id=None)
    rows = list(Delivery.objects.order_by("pk").values_list("pk", "message__message_id", "attempt", "duplicate"))
    assert [row[0] for row in rows] == [s.delivery_id for s in [first, *settlements]]
    assert [row[1] for row in rows] == ["many-0"] + [f"many-{i}" for i in range(40)]
    assert rows[1][2:] == (2, True) and all(row[2:] == (1, False) for row in rows[2:])
    assert Message.objects.count() == 40


def test_a_batch_of_2000_letters_fits_the_databases_parameter_limit():
    """2000 letters × 19 columns is more values than SQLite binds in one statement as built upstream
    (32,766; Debian's build allows 250,000, so the test sets the upstream limit)."""
    if connection.vendor == "sqlite":
        import sqlite3

        connection.ensure_connection()
        connection.connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32766)
    settlements = record_batch([received(tag, message_id=f"big-{tag}") for tag in range(1, 2001)], worker_id=None)
    assert len(settlements) == 2000 == Delivery.objects.filter(status=Delivery.Status.ACKED).count()
    assert Message.objects.filter(message_id__startswith="big-").count() == 2000


def test_batches_of_every_size_share_a_few_statements(monkeypatch):
    """Python's sqlite3 keeps a connection's last 128 statements compiled, by their text: a statement
    per batch size grew a worker by 20–30 MB (bench/consume.py's memory figure)."""
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's statement shapes")
    statements = []
    run = SQLiteWriter.execute
    monkeypatch.setattr(SQLiteWriter, "execute", staticmethod(lambda sql, params: statements.append(sql) or run(sql, params)))
    tag, settled = 0, []
    for size in range(1, 41):
        batch = [received(tag + i, message_id=f"shape-{tag + i}") for i in range(size)]
        settlements = record_batch(batch, worker_id=None, handlers={"q": lambda message: None})  # 'received'
        tag += size
        assert len(settlements) == size
        chosen = [s for s in settlements if s.delivery_id % 3]  # IN lists of many lengths
        record_settled(chosen)
        settled += [s.delivery_id for s in chosen]
    for table in (Message._meta.db_table, Delivery._meta.db_table):
        inserts = {sql for sql in statements if sql.startswith("INSERT") and f"INTO {table} " in sql}
        assert 1 < len(inserts) <= 7  # for 1, 2, 4 … 64 rows
    assert 1 < len({sql for sql in statements if sql.startswith(("SELECT", "UPDATE"))}) <= 2 * 7
    assert list(Delivery.objects.order_by("pk").values_list("message__message_id", flat=True)) == [
        f"shape-{i}" for i in range(tag)
    ]
    assert sorted(Delivery.objects.filter(status=Delivery.Status.ACKED, settled_at__isnull=False)
                  .values_list("pk", flat=True)) == sorted(settled)
    assert Delivery.objects.filter(status=Delivery.Status.RECEIVED).count() == tag - len(settled)


def test_a_big_batch_keeps_order_of_ids():
    batch = [received(i, message_id=f"m{i}", body=f"body {i}".encode()) for i in range(1, 121)]
    settlements = record_batch(batch, worker_id=None)
    for s, r in zip(settlements, batch):
        d = Delivery.objects.select_related("message").get(pk=s.delivery_id)
        assert d.delivery_tag == r.delivery_tag and d.message.message_id == r.properties.message_id
        assert bytes(d.message.body) == r.body
    assert PostgreSQLWriter.copy_min_rows < 120  # the COPY path ran on PostgreSQL


@pytest.mark.parametrize("handler", [False, True])
def test_a_big_batch_of_new_letters_then_one_holding_known_ones_records_each_letter_once(handler):
    """A big batch (COPY on PostgreSQL) that holds letters recorded before (published twice, or
    Mailroom's own) finds them, counts their attempts and spots the duplicates."""
    handlers = {"q": lambda message: None} if handler else None
    record_batch([received(i, message_id=f"big-{i}") for i in range(60)], worker_id=None, handlers=handlers)
    known = Message.objects.create(message_id="ours-1", routing_key="q", status=Message.Status.PUBLISHED)
    batch = [received(100 + i, message_id=f"big-{i}") for i in range(0, 60, 2)]  # 30 letters seen before
    batch += [received(200 + i, message_id=f"new-{i}") for i in range(30)] + [received(300, message_id="ours-1")]
    settlements = record_batch(batch, worker_id=None, handlers=handlers)
    assert len(settlements) == len(batch)
    assert Message.objects.count() == 60 + 30 + 1
    assert Message.objects.get(message_id="ours-1").pk == known.pk
    seen = {(d.message.message_id, d.attempt, d.duplicate) for d in Delivery.objects.select_related("message")
            .filter(delivery_tag__gte=100)}
    # Delivered again: attempt 2; acked before (no handler), or handled before: a duplicate.
    assert seen == ({(f"big-{i}", 2, True) for i in range(0, 60, 2)}
                    | {(f"new-{i}", 1, False) for i in range(30)} | {("ours-1", 1, False)})
    assert [s.duplicate for s in settlements] == [True] * 30 + [False] * 31
    record_batch([received(400 + i, message_id=f"fresh-{i}") for i in range(60)], worker_id=None)
    assert Message.objects.count() == 60 + 30 + 1 + 60


def test_receipt_times_are_stored_as_taken_and_sort_in_time_order():
    stamps = [1764200000.123456, 1764200000.5, 1764200001.0, 1764203599.999999, 1764203600.000001]
    batch = [received(i, message_id=f"t{i}") for i in range(1, len(stamps) + 1)]
    for r, t in zip(batch, stamps):
        r.received_at = t
    record_batch(batch, worker_id=None)
    stored = list(Delivery.objects.filter(message__message_id__startswith="t").order_by("received_at"))
    assert [d.delivery_tag for d in stored] == [1, 2, 3, 4, 5]
    for d, t in zip(stored, stamps):
        assert abs(d.received_at - datetime.fromtimestamp(t, timezone.utc)) <= timedelta(microseconds=1)
    # Django's own lookups compare with what the fast path wrote.
    assert Delivery.objects.filter(received_at__gte=datetime.fromtimestamp(stamps[2], timezone.utc)).count() == 3


def test_insert_skipping_a_conflict_returns_the_new_letters_ids():
    [first] = record_batch([received(1, message_id="dup-a")], worker_id=None)
    rows = [filing.external_message_row(received(2, message_id=m), m, "2026-01-01 00:00:00")
            for m in ("dup-a", "dup-b")]
    with transaction.atomic():
        ids = writer_for(connection.vendor).insert_messages(rows)
    assert ids["dup-b"] == Message.objects.get(message_id="dup-b").pk
    assert ids.get("dup-a", first.message_id) == first.message_id  # skipped: left out, or its own id


@pytest.mark.parametrize("size", [3, 60], ids=["insert", "copy"])
def test_each_delivery_records_its_bodys_digest_and_keeps_a_body_that_differs(size):
    """Both ways a writer writes (a multi-row INSERT, and COPY from 50 rows on PostgreSQL) fill the
    delivery's digest, size and mark, the bytes of a body that differs, and a message's raw id."""
    batch = [received(i, message_id=f"d-{i}", body=b"body %d" % i) for i in range(size - 2)]
    batch += [received(100, message_id="d-0", body=b"another body"),  # filed under d-0, which has another
              received(101, message_id=b"raw-\xff", body=b"raw")]
    settlements = record_batch(batch, worker_id=None)
    rows = {d.pk: d for d in Delivery.objects.all()}
    for s, r in zip(settlements, batch):
        d = rows[s.delivery_id]
        assert (d.body_size, d.body_sha256) == (len(r.body), hashlib.sha256(r.body).hexdigest())
        if r.delivery_tag == 100:
            assert d.anomaly == Delivery.Anomaly.BODY and bytes(d.body) == b"another body"
        else:
            assert d.anomaly == Delivery.Anomaly.NONE and d.body is None
    assert bytes(Message.objects.get(message_id="d-0").body) == b"body 0"
    raw = Message.objects.get(raw_message_id__isnull=False)
    assert bytes(raw.raw_message_id) == b"raw-\xff" and raw.message_id.startswith("raw-\ufffd~sha256:")
    assert Message.objects.filter(raw_message_id__isnull=True).count() == size - 2
    # Known messages are compared too (read with their look-up): the same body again is not marked.
    [again, other] = record_batch([received(200, message_id="d-0", body=b"body 0"),
                                   received(201, message_id=b"raw-\xff", body=b"not raw")], worker_id=None)
    assert Delivery.objects.get(pk=again.delivery_id).anomaly == Delivery.Anomaly.NONE
    assert Delivery.objects.get(pk=other.delivery_id).anomaly == Delivery.Anomaly.BODY
    assert Message.objects.count() == size - 1
