"""Stream taps: `consume S --queue-type stream` records each stream message once per tap, across
restarts and kill -9, takes nothing from the stream's other readers, and stores its offset in the
batch's own transaction (a failing offset write rolls the batch's rows back)."""
from __future__ import annotations

import signal
import urllib.request
import uuid
from urllib.parse import quote

import pika
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import Count
from django.urls import reverse

from messaging.models import Delivery, Message, StreamOffset
from tests.conftest import (
    delete_queue,
    management_api,
    management_request,
    rabbitmq_url,
    wait_for,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def stream():
    """A stream of this test's own (declared by the test or by `consume`), deleted afterwards."""
    name = f"stream-{uuid.uuid4().hex[:10]}"
    yield name
    delete_queue(name)


def declare_stream(name: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url()))
    try:
        conn.channel().queue_declare(queue=name, durable=True, arguments={"x-queue-type": "stream"})
    finally:
        conn.close()


def publish(queue: str, count: int, *, prefix: str, exchange: str = "", routing_key: str | None = None) -> list[str]:
    """Publish `count` persistent messages with message_ids in one AMQP transaction (all or none); return the ids."""
    ids = [f"{prefix}-{i}" for i in range(count)]
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url()))
    try:
        channel = conn.channel()
        channel.tx_select()
        for i, message_id in enumerate(ids):
            channel.basic_publish(exchange=exchange, routing_key=queue if routing_key is None else routing_key,
                                  body=f"message {i}".encode(),
                                  properties=pika.BasicProperties(message_id=message_id, delivery_mode=2))
        channel.tx_commit()
    finally:
        conn.close()
    return ids


def read_plainly(name: str, count: int) -> list[bytes]:
    """What an ordinary reader gets from the stream's first offset (pika, no Mailroom)."""
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url()))
    got: list[bytes] = []
    try:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=100)

        def on_message(ch, method, _properties, body):
            got.append(body)
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(name, on_message, arguments={"x-stream-offset": "first"})
        wait_for(lambda: conn.process_data_events(0.2) or len(got) >= count, timeout=20, interval=0,
                 message=f"{count} messages read plainly")
    finally:
        conn.close()
    return got


def recorded(stream: str, tap: str = "default"):
    return Delivery.objects.filter(queue=stream, consumer_tag=f"tap:{tap}:{stream}")


def assert_each_once(stream: str, ids: list[str], *, tap: str = "default") -> None:
    """Every message of `ids` has one `Message` and exactly one acked delivery by `tap`, and no other."""
    deliveries = recorded(stream, tap)
    assert Message.objects.filter(message_id__in=ids).count() == len(ids)
    per_message = dict(deliveries.values_list("message__message_id").annotate(n=Count("id")).order_by())
    assert set(per_message) == set(ids), f"{len(set(ids) - set(per_message))} not recorded"
    assert set(per_message.values()) == {1}, {k: n for k, n in per_message.items() if n > 1}
    assert set(deliveries.values_list("status", flat=True)) == {Delivery.Status.ACKED}
    assert not deliveries.filter(duplicate=True).exists()


def stored_offset(stream: str, tap: str = "default") -> int | None:
    row = StreamOffset.objects.filter(stream=stream, tap=tap).first()
    return None if row is None else row.offset


def test_a_tap_records_each_message_once_across_runs_and_kill_9(stream, manage):
    declare_stream(stream)
    first = publish(stream, 1000, prefix=f"{stream}-a")
    run = manage("consume", stream, "--queue-type", "stream", "--offset", "first", "--max-messages", "1000")
    assert run.wait(timeout=60) == 0, run.output[-3000:]
    assert_each_once(stream, first)
    assert stored_offset(stream) == 999

    # Without --offset the tap resumes after the last message it recorded: exactly the new ones.
    second = publish(stream, 500, prefix=f"{stream}-b")
    run = manage("consume", stream, "--queue-type", "stream", "--inactivity-timeout", "3")
    assert run.wait(timeout=60) == 0, run.output[-3000:]
    assert "offset=1000 (after the last message recorded)" in run.output
    assert_each_once(stream, first + second)
    assert stored_offset(stream) == 1499

    # kill -9 in the middle of the third run's batches, then a restart.
    third = publish(stream, 3000, prefix=f"{stream}-c")
    victim = manage("consume", stream, "--queue-type", "stream", "--batch-size", "50", "--prefetch", "200")
    wait_for(lambda: recorded(stream).count() >= 2200, timeout=60, interval=0.02, message="some of the third run")
    victim.proc.kill()
    victim.proc.wait()
    assert recorded(stream).count() < 4500, "the third run ended before the kill: nothing was injected"
    offset = stored_offset(stream)
    assert recorded(stream).count() == offset + 1  # the offset is exactly what was committed

    successor = manage("consume", stream, "--queue-type", "stream", "--inactivity-timeout", "3")
    assert successor.wait(timeout=60) == 0, successor.output[-3000:]
    assert f"offset={offset + 1} (after the last message recorded)" in successor.output
    assert_each_once(stream, first + second + third)
    assert stored_offset(stream) == 4499
    assert not Delivery.objects.filter(queue=stream, redelivered=True).exists()


def tap_connection(tag: str) -> str | None:
    """The name of the connection consuming under consumer tag `tag` (the management API lags by seconds)."""
    for consumer in management_api("consumers"):
        details = consumer.get("channel_details")  # [] until the statistics know the channel
        if consumer.get("consumer_tag") == tag and isinstance(details, dict) and details.get("connection_name"):
            return details["connection_name"]
    return None


def test_a_dropped_connection_resumes_after_what_this_process_recorded(stream, manage):
    declare_stream(stream)
    first = publish(stream, 500, prefix=f"{stream}-a")
    tap = manage("consume", stream, "--queue-type", "stream", "--offset", "first")
    wait_for(lambda: recorded(stream).count() >= 500, timeout=60, message="the first messages recorded")
    name = wait_for(lambda: tap_connection(f"tap:default:{stream}"), timeout=30, message="the tap's connection")
    with urllib.request.urlopen(management_request(f"connections/{quote(name, safe='')}", method="DELETE"), timeout=10):
        pass
    wait_for(lambda: "reconnecting" in tap.output and tap.output.count("consuming queues=") == 2, timeout=60,
             message="the tap to reconnect")
    # Not from --offset first again: after what it recorded before the connection dropped.
    assert "offset=500 (after the last message this process recorded)" in tap.output
    second = publish(stream, 500, prefix=f"{stream}-b")
    wait_for(lambda: recorded(stream).count() >= 1000, timeout=60, message="the next messages recorded")
    tap.signal(signal.SIGTERM)
    assert tap.wait(timeout=20) == 0, tap.output[-3000:]
    assert_each_once(stream, first + second)
    assert stored_offset(stream) == 999


def test_two_taps_and_a_plain_reader_each_read_every_message(stream, manage, admin_client):
    declare_stream(stream)
    ids = publish(stream, 50, prefix=stream)
    taps = [manage("consume", stream, "--queue-type", "stream", "--tap", tap, "--offset", "first",
                   "--max-messages", "50") for tap in ("audit-a", "audit-b")]
    for tap in taps:
        assert tap.wait(timeout=60) == 0, tap.output[-3000:]

    # One Message per stream message, one Delivery per tap; each tap keeps its own offset.
    assert Message.objects.filter(message_id__in=ids).count() == 50
    assert_each_once(stream, ids, tap="audit-a")
    assert recorded(stream, "audit-b").count() == 50
    assert Delivery.objects.filter(queue=stream).count() == 100
    assert {stored_offset(stream, "audit-a"), stored_offset(stream, "audit-b")} == {49}
    page = admin_client.get(reverse("admin:messaging_streamoffset_changelist"), {"q": stream})
    assert page.status_code == 200 and b"audit-a" in page.content and b"audit-b" in page.content
    # Nothing was taken: an ordinary reader still reads every message.
    assert len(read_plainly(stream, 50)) == 50


# A fault at the database, not a mock: a trigger refuses the offset of the tap named 'broken'.
SQLITE_FAULT = (
    "CREATE TRIGGER stream_offset_fault BEFORE INSERT ON {table} WHEN NEW.tap = 'broken' "
    "BEGIN SELECT RAISE(ABORT, 'injected fault: offset write refused'); END"
)
POSTGRESQL_FAULT_FUNCTION = (
    "CREATE FUNCTION stream_offset_fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF NEW.tap = 'broken' THEN RAISE EXCEPTION 'injected fault: offset write refused'; END IF; RETURN NEW; END $$"
)
POSTGRESQL_FAULT = (
    "CREATE TRIGGER stream_offset_fault BEFORE INSERT OR UPDATE ON {table} "
    "FOR EACH ROW EXECUTE FUNCTION stream_offset_fault()"
)


def offset_write_fault(vendor: str, *, install: bool) -> list[str]:
    """The SQL that installs (or removes) the fault on this database."""
    table = StreamOffset._meta.db_table
    if vendor == "sqlite":
        return [SQLITE_FAULT.format(table=table)] if install else ["DROP TRIGGER IF EXISTS stream_offset_fault"]
    if install:
        return [POSTGRESQL_FAULT_FUNCTION, POSTGRESQL_FAULT.format(table=table)]
    return [f"DROP TRIGGER IF EXISTS stream_offset_fault ON {table}", "DROP FUNCTION IF EXISTS stream_offset_fault()"]


def run_sql(statements: list[str]) -> None:
    with connection.cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)


def test_a_failing_offset_write_rolls_the_batch_back(stream, manage):
    declare_stream(stream)
    ids = publish(stream, 30, prefix=stream)
    run_sql(offset_write_fault(connection.vendor, install=True))
    try:
        worker = manage("consume", stream, "--queue-type", "stream", "--tap", "broken", "--offset", "first",
                        "--batch-size", "10")
        wait_for(lambda: "database unavailable" in worker.output, timeout=30, message="the offset write to fail")
        # The batch's rows went with its offset: nothing recorded, nothing acked.
        assert not Delivery.objects.filter(queue=stream).exists()
        assert not Message.objects.filter(message_id__in=ids).exists()
        assert stored_offset(stream, "broken") is None
    finally:
        run_sql(offset_write_fault(connection.vendor, install=False))
    # The database takes it again: the same batches are recorded, once, in order.
    wait_for(lambda: recorded(stream, "broken").count() >= 30, timeout=30, message="the batches recorded after all")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0, worker.output[-3000:]
    assert_each_once(stream, ids, tap="broken")
    assert stored_offset(stream, "broken") == 29


def test_tap_an_exchange_without_touching_its_queue(stream, manage, amqp):
    exchange, queue = f"{stream}-x", f"{stream}-orders"
    amqp.exchange_declare(exchange=exchange, exchange_type="fanout")
    amqp.queue_declare(queue=queue, durable=True)
    amqp.queue_bind(queue=queue, exchange=exchange)
    try:
        tap = manage("consume", stream, "--exchange", exchange, "--exchange-type", "fanout", "--queue-type", "stream")
        # (A stream reports no consumer count on a passive declare: the tap's log says it consumes.)
        wait_for(lambda: "consuming queues=" in tap.output, timeout=30, message="the tap consuming its stream")
        ids = publish("", 20, prefix=stream, exchange=exchange, routing_key="order.created")
        wait_for(lambda: recorded(stream).count() >= 20, timeout=30, message="the exchange's traffic recorded")
        tap.signal(signal.SIGTERM)
        assert tap.wait(timeout=20) == 0, tap.output[-3000:]
        assert_each_once(stream, ids)
        assert set(recorded(stream).values_list("exchange", "routing_key")) == {(exchange, "order.created")}
        # The real consumers' queue still holds every message: the tap took nothing from it.
        assert amqp.queue_declare(queue=queue, passive=True).method.message_count == 20
    finally:
        delete_queue(queue)
        amqp.exchange_delete(exchange=exchange)


def test_a_queue_that_is_not_a_stream_is_refused_at_once(queue_name, manage, amqp):
    amqp.queue_declare(queue=queue_name, durable=True)  # classic: a tap on it would take its messages
    worker = manage("consume", queue_name, "--queue-type", "stream")
    assert worker.wait(timeout=30) == 1, worker.output[-3000:]
    assert f"queue '{queue_name}' is not a stream" in worker.output
    assert "consume it without --queue-type stream" in worker.output


@pytest.mark.parametrize(("args", "says"), [
    (["--exchange", "logs", "--queue-type", "stream"], "A stream needs a name"),
    (["stream-x", "--queue-type", "stream", "--handler", "tests.handlers.pause"], "runs no handler"),
    (["stream-x", "--queue-type", "stream", "--dead-letter-exchange", "dlx"], "no --dead-letter-exchange"),
    (["stream-x", "--offset", "first"], "add --queue-type stream"),
    (["stream-x", "--queue-type", "stream", "--offset", "yesterday"], "not first, last, next"),
])
def test_options_a_tap_cannot_take_are_refused(args, says):
    with pytest.raises(CommandError, match=says):
        call_command("consume", *args)
